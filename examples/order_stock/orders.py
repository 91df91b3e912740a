"""The order service: orders in PostgreSQL, created by a saga action and cancelled by its
compensation. A cancelled order stays, with its status, as a record of the attempt."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from coordinator.client import BranchInfo, PostgresBarrier, branch_handler
from examples.common import Journal, barrier_call

TABLE = "ex_order"


class OrderService:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.barrier = PostgresBarrier(pool)
        self.journal = Journal()

    async def reset(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            await conn.execute(f"CREATE TABLE {TABLE} (id text PRIMARY KEY, gid text NOT NULL, "
                               "lines text NOT NULL, status text NOT NULL)")

    async def orders(self) -> dict[str, str]:
        """order id → status"""
        rows = await self.pool.fetch(f"SELECT id, status FROM {TABLE} ORDER BY id")
        return {r["id"]: r["status"] for r in rows}

    async def ordered(self) -> dict[str, int]:
        """item → units in orders that stand (not cancelled)"""
        totals: dict[str, int] = {}
        for row in await self.pool.fetch(f"SELECT lines FROM {TABLE} WHERE status = 'created'"):
            for line in orjson.loads(row["lines"]):
                totals[line["item"]] = totals.get(line["item"], 0) + int(line["qty"])
        return totals

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/CreateOrder", branch_handler(self.create))
        app.router.add_post("/CancelOrder", branch_handler(self.cancel))
        return app

    async def create(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()

        async def insert(conn: Any) -> None:
            await conn.execute(
                f"INSERT INTO {TABLE} (id, gid, lines, status) VALUES ($1, $2, $3, 'created')",
                body["order"], branch.gid, orjson.dumps(body["lines"]).decode())

        await barrier_call(self.journal, "CreateOrder", branch, self.barrier, insert)

    async def cancel(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()

        async def mark(conn: Any) -> None:
            await conn.execute(f"UPDATE {TABLE} SET status = 'cancelled' WHERE id = $1",
                               body["order"])

        await barrier_call(self.journal, "CancelOrder", branch, self.barrier, mark)
