"""Driver: four orders against a small stock; two succeed, two are rolled back.

    python -m examples.order_stock
"""

from __future__ import annotations

import contextlib

from coordinator.client import DtmClient, Saga, TransactionFailed, TransOptions, local_gid
from examples.common import (
    Checks,
    Server,
    cli,
    describe,
    final_status,
    mysql_pool,
    pg_pool,
    run_example,
)
from examples.order_stock.orders import OrderService
from examples.order_stock.stock import StockService

NAME = "order_stock"
START = {"gadget": 1, "widget": 5}


async def place_order(
    dtm: DtmClient, orders: Server, stock: Server, order: str, lines: dict[str, int]
) -> tuple[str, str]:
    """One saga: create the order, then one deduction per line. Its gid and the rollback
    reason ("" if it succeeded)."""
    gid = local_gid("order-")
    body = {"order": order, "lines": [{"item": i, "qty": q} for i, q in lines.items()]}
    saga = Saga(dtm, gid, TransOptions(wait_result=True))
    saga.add(orders.url("CreateOrder"), orders.url("CancelOrder"), body)
    for item, qty in lines.items():
        saga.add(stock.url("Deduct"), stock.url("Restore"), {"item": item, "qty": qty})
    try:
        await saga.submit()
    except TransactionFailed as exc:
        return gid, str(exc)
    return gid, ""


async def scenario(dtm: DtmClient, checks: Checks) -> None:
    async with contextlib.AsyncExitStack() as stack:
        order_service = OrderService(await stack.enter_async_context(pg_pool()))
        stock_service = StockService(await stack.enter_async_context(mysql_pool()))
        await order_service.reset()
        await stock_service.reset(START)
        orders = await stack.enter_async_context(Server(order_service.app()))
        stock = await stack.enter_async_context(Server(stock_service.app()))
        print(f"order service (PostgreSQL) {orders.url()}, "
              f"stock service (MariaDB) {stock.url()}; stock {START}")

        checks.section("order-1: 2 widgets")
        gid, _ = await place_order(dtm, orders, stock, "order-1", {"widget": 2})
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "succeed")
        checks.equal("orders", await order_service.orders(), {"order-1": "created"})
        checks.equal("stock", await stock_service.stock(), {"gadget": 1, "widget": 3})

        checks.section("order-2: 1 widget and 3 gadgets, but only 1 gadget is left")
        gid, reason = await place_order(dtm, orders, stock, "order-2", {"widget": 1, "gadget": 3})
        checks.note(await describe(dtm, gid))
        checks.check("submit raised TransactionFailed: out of stock", "out of stock" in reason,
                     reason)
        checks.equal("status", await final_status(dtm, gid), "failed")
        checks.equal("order service saw", order_service.journal.of(gid),
                     ["CreateOrder: applied", "CancelOrder: applied"])
        checks.equal("stock service saw", stock_service.journal.of(gid),
                     ["Deduct widget: applied", "Deduct gadget: refused",
                      "Restore gadget: null_compensation", "Restore widget: applied"])
        checks.equal("orders", await order_service.orders(),
                     {"order-1": "created", "order-2": "cancelled"})
        checks.equal("stock (the widget is back)", await stock_service.stock(),
                     {"gadget": 1, "widget": 3})

        checks.section("order-3: the last 3 widgets")
        gid, _ = await place_order(dtm, orders, stock, "order-3", {"widget": 3})
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "succeed")
        checks.equal("stock", await stock_service.stock(), {"gadget": 1, "widget": 0})

        checks.section("order-4: 1 widget, none left")
        gid, reason = await place_order(dtm, orders, stock, "order-4", {"widget": 1})
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "failed")
        checks.equal("stock service saw", stock_service.journal.of(gid),
                     ["Deduct widget: refused", "Restore widget: null_compensation"])
        checks.equal("orders", await order_service.orders(), {
            "order-1": "created", "order-2": "cancelled", "order-3": "created",
            "order-4": "cancelled"})
        checks.equal("stock (never below zero)", await stock_service.stock(),
                     {"gadget": 1, "widget": 0})

        checks.section("Totals")
        left = await stock_service.stock()
        sold = {item: START[item] - n for item, n in left.items() if START[item] != n}
        checks.equal("units that left the stock", sold, {"widget": 5})
        checks.equal("units in orders that stand", await order_service.ordered(), sold)


async def main() -> bool:
    return await run_example(NAME, scenario)


if __name__ == "__main__":
    cli(main)
