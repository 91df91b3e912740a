"""Driver: three checkouts by ann. One succeeds; one is refused by shipping (MariaDB)
after the stock (Redis) and the wallet (PostgreSQL) were changed, which are then undone;
one asks for more than the Redis stock holds.

    python -m examples.mixed_branches
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from coordinator.client import DtmClient, Saga, TransactionFailed, TransOptions, local_gid
from examples.common import (
    Checks,
    Server,
    cli,
    describe,
    final_status,
    key_prefix,
    mysql_pool,
    pg_pool,
    redis_client,
    run_example,
)
from examples.mixed_branches.services import ShippingService, StockService, WalletService

NAME = "mixed_branches"
SKU, PRICE, STOCK = "sku-1", 20, 10
ACCOUNT, FUNDS = "ann", 100


@dataclass
class Shop:
    stock: StockService
    wallet: WalletService
    shipping: ShippingService
    stock_server: Server
    wallet_server: Server
    shipping_server: Server

    async def checkout(self, dtm: DtmClient, gid: str, order: str, qty: int, city: str) -> str:
        """One saga: stock (Redis), then payment (PostgreSQL), then shipment (MariaDB).
        The rollback reason, or "" if it succeeded."""
        saga = Saga(dtm, gid, TransOptions(wait_result=True))
        saga.add(self.stock_server.url("Deduct"), self.stock_server.url("Restore"),
                 {"sku": SKU, "qty": qty})
        saga.add(self.wallet_server.url("Debit"), self.wallet_server.url("Refund"),
                 {"account": ACCOUNT, "amount": qty * PRICE})
        saga.add(self.shipping_server.url("Ship"), self.shipping_server.url("CancelShipment"),
                 {"order": order, "qty": qty, "city": city})
        try:
            await saga.submit()
        except TransactionFailed as exc:
            return str(exc)
        return ""

    async def state(self) -> dict[str, object]:
        return {"stock": await self.stock.stock(SKU), "wallet": await self.wallet.balance(ACCOUNT),
                "shipments": await self.shipping.shipments()}

    def journals(self, gid: str) -> dict[str, list[str]]:
        return {"redis": self.stock.journal.of(gid), "postgres": self.wallet.journal.of(gid),
                "mariadb": self.shipping.journal.of(gid)}


async def scenario(dtm: DtmClient, checks: Checks) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stock = StockService(await stack.enter_async_context(redis_client()), key_prefix(NAME))
        wallet = WalletService(await stack.enter_async_context(pg_pool()))
        shipping = ShippingService(await stack.enter_async_context(mysql_pool()))
        await stock.reset({SKU: STOCK})
        await wallet.reset({ACCOUNT: FUNDS})
        await shipping.reset()
        shop = Shop(stock, wallet, shipping,
                    *[await stack.enter_async_context(Server(s.app()))
                      for s in (stock, wallet, shipping)])
        print(f"stock (Redis) {shop.stock_server.url()}, wallet (PostgreSQL) "
              f"{shop.wallet_server.url()}, shipping (MariaDB) {shop.shipping_server.url()}")

        checks.section(f"order-A: 2 x {SKU} at {PRICE}, shipped to Berlin")
        gid = local_gid("mixed-")
        await shop.checkout(dtm, gid, "order-A", 2, "Berlin")
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "succeed")
        checks.equal("state", await shop.state(),
                     {"stock": 8, "wallet": 60, "shipments": {"order-A": "created"}})

        checks.section("order-B: 1 x sku-1, shipped to Atlantis (not served)")
        gid = local_gid("mixed-")
        reason = await shop.checkout(dtm, gid, "order-B", 1, "Atlantis")
        checks.note(await describe(dtm, gid))
        checks.check("submit raised TransactionFailed: no delivery", "no delivery" in reason,
                     reason)
        checks.equal("status", await final_status(dtm, gid), "failed")
        checks.equal("the services saw", shop.journals(gid), {
            "redis": ["Deduct: applied", "Restore: applied"],
            "postgres": ["Debit: applied", "Refund: applied"],
            "mariadb": ["Ship: refused", "CancelShipment: null_compensation"]})
        checks.equal("state (stock and money back)", await shop.state(),
                     {"stock": 8, "wallet": 60, "shipments": {"order-A": "created"}})

        checks.section("order-C: 9 x sku-1, but 8 are left (the Redis amount check)")
        gid = local_gid("mixed-")
        reason = await shop.checkout(dtm, gid, "order-C", 9, "Oslo")
        checks.note(await describe(dtm, gid))
        checks.check("submit raised TransactionFailed: not enough in stock",
                     "not enough" in reason, reason)
        checks.equal("status", await final_status(dtm, gid), "failed")
        checks.equal("the services saw", shop.journals(gid), {
            "redis": ["Deduct: refused", "Restore: null_compensation"],
            "postgres": [], "mariadb": []})
        checks.equal("state", await shop.state(),
                     {"stock": 8, "wallet": 60, "shipments": {"order-A": "created"}})

        checks.section("Totals")
        shipped = await shipping.units_shipped()
        checks.equal("units shipped", shipped, 2)
        checks.equal("stock left (Redis) + units shipped (MariaDB)",
                     await stock.stock(SKU) + shipped, STOCK)
        checks.equal("money left (PostgreSQL) + price of the units shipped",
                     await wallet.balance(ACCOUNT) + shipped * PRICE, FUNDS)


async def main() -> bool:
    return await run_example(NAME, scenario)


if __name__ == "__main__":
    cli(main)
