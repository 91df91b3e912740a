"""The stock service: quantities in MariaDB; Deduct refuses to go below zero."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from coordinator.client import BranchInfo, MysqlBarrier, TransactionFailed, branch_handler
from examples.common import Journal, affected, barrier_call, mysql_execute, mysql_rows

TABLE = "ex_stock"


class StockService:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.barrier = MysqlBarrier(pool)
        self.journal = Journal()

    async def reset(self, stock: Mapping[str, int]) -> None:
        await mysql_execute(
            self.pool,
            f"DROP TABLE IF EXISTS {TABLE}",
            f"CREATE TABLE {TABLE} (item varchar(64) PRIMARY KEY, available int NOT NULL) "
            "ENGINE = InnoDB",
            *((f"INSERT INTO {TABLE} (item, available) VALUES (%s, %s)", (item, n))
              for item, n in stock.items()),
        )

    async def stock(self) -> dict[str, int]:
        rows = await mysql_rows(self.pool, f"SELECT item, available FROM {TABLE} ORDER BY item")
        return {str(r[0]): int(r[1]) for r in rows}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/Deduct", branch_handler(self.deduct))
        app.router.add_post("/Restore", branch_handler(self.restore))
        return app

    async def deduct(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()
        item, qty = str(body["item"]), int(body["qty"])

        async def take(conn: Any) -> None:
            if not await affected(conn, f"UPDATE {TABLE} SET available = available - %s "
                                        "WHERE item = %s AND available >= %s", qty, item, qty):
                raise TransactionFailed(f"out of stock: {qty} {item} wanted")

        await barrier_call(self.journal, f"Deduct {item}", branch, self.barrier, take)

    async def restore(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()
        item, qty = str(body["item"]), int(body["qty"])

        async def put_back(conn: Any) -> None:
            await affected(conn, f"UPDATE {TABLE} SET available = available + %s "
                                 "WHERE item = %s", qty, item)

        await barrier_call(self.journal, f"Restore {item}", branch, self.barrier, put_back)
