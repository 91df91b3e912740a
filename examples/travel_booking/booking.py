"""One booking service (flight, hotel or car): an inventory and the holds/bookings on it.

Try takes one unit of the inventory and records a ``held`` booking; confirm marks it
``confirmed``; cancel deletes it and gives the unit back. The barrier makes each of them
happen at most once per trip, and makes a cancel whose try never took effect do nothing.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.client import BranchInfo, PostgresBarrier, TransactionFailed, branch_handler
from examples.common import Journal, barrier_call


class BookingService:
    def __init__(self, kind: str, pool: Any) -> None:
        self.kind = kind
        self.pool = pool
        self.barrier = PostgresBarrier(pool)
        self.journal = Journal()
        # Names are fixed strings, never input: they are safe to put into SQL.
        self.inventory = f"ex_travel_{kind}"
        self.bookings_table = f"ex_travel_{kind}_booking"

    async def reset(self, resource: str, units: int) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for table in (self.inventory, self.bookings_table):
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.execute(f"CREATE TABLE {self.inventory} "
                               "(resource text PRIMARY KEY, free int NOT NULL)")
            await conn.execute(f"CREATE TABLE {self.bookings_table} (gid text PRIMARY KEY, "
                               "resource text NOT NULL, status text NOT NULL)")
            await conn.execute(f"INSERT INTO {self.inventory} VALUES ($1, $2)", resource, units)

    async def free(self) -> int:
        return int(await self.pool.fetchval(f"SELECT sum(free) FROM {self.inventory}"))

    async def bookings(self) -> dict[str, str]:
        """gid → held/confirmed"""
        rows = await self.pool.fetch(f"SELECT gid, status FROM {self.bookings_table}")
        return {r["gid"]: r["status"] for r in rows}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/try", branch_handler(self.try_))
        app.router.add_post("/confirm", branch_handler(self.confirm))
        app.router.add_post("/cancel", branch_handler(self.cancel))
        return app

    async def try_(self, request: web.Request, branch: BranchInfo) -> None:
        resource = str((await request.json())["resource"])

        async def hold(conn: Any) -> None:
            taken = await conn.execute(f"UPDATE {self.inventory} SET free = free - 1 "
                                       "WHERE resource = $1 AND free >= 1", resource)
            if taken != "UPDATE 1":
                raise TransactionFailed(f"no {self.kind} available: {resource}")
            await conn.execute(f"INSERT INTO {self.bookings_table} VALUES ($1, $2, 'held')",
                               branch.gid, resource)

        await barrier_call(self.journal, "try", branch, self.barrier, hold)

    async def confirm(self, request: web.Request, branch: BranchInfo) -> None:
        async def book(conn: Any) -> None:
            await conn.execute(f"UPDATE {self.bookings_table} SET status = 'confirmed' "
                               "WHERE gid = $1", branch.gid)

        await barrier_call(self.journal, "confirm", branch, self.barrier, book)

    async def cancel(self, request: web.Request, branch: BranchInfo) -> None:
        async def release(conn: Any) -> None:
            resource = await conn.fetchval(f"DELETE FROM {self.bookings_table} "
                                           "WHERE gid = $1 RETURNING resource", branch.gid)
            await conn.execute(f"UPDATE {self.inventory} SET free = free + 1 "
                               "WHERE resource = $1", resource)

        await barrier_call(self.journal, "cancel", branch, self.barrier, release)
