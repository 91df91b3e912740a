"""The receiving bank: accounts in PostgreSQL; TransIn as a saga step and a TCC branch.

``incoming`` is money a TCC try has announced: it shows up in ``balance`` only on confirm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from coordinator.client import BranchInfo, PostgresBarrier, TransactionFailed, branch_handler
from coordinator.client.participant import Handler
from examples.bank_transfer.transfer import Business, Transfer, check_limit
from examples.common import Journal, barrier_call

TABLE = "ex_bank_in"  # each business function takes another table by `table=`


async def _update(conn: Any, sql: str, t: Transfer) -> None:
    status = await conn.execute(sql, t.amount, t.account)
    if status != "UPDATE 1":
        raise TransactionFailed(f"no account {t.account}")


async def deposit(conn: Any, t: Transfer, table: str = TABLE) -> None:
    check_limit(t)
    await _update(conn, f"UPDATE {table} SET balance = balance + $1 WHERE id = $2", t)


async def take_back(conn: Any, t: Transfer, table: str = TABLE) -> None:
    await _update(conn, f"UPDATE {table} SET balance = balance - $1 WHERE id = $2", t)


async def announce(conn: Any, t: Transfer, table: str = TABLE) -> None:
    check_limit(t)
    await _update(conn, f"UPDATE {table} SET incoming = incoming + $1 WHERE id = $2", t)


async def book(conn: Any, t: Transfer, table: str = TABLE) -> None:
    await _update(conn, f"UPDATE {table} SET balance = balance + $1, "
                        "incoming = incoming - $1 WHERE id = $2", t)


async def drop(conn: Any, t: Transfer, table: str = TABLE) -> None:
    await _update(conn, f"UPDATE {table} SET incoming = incoming - $1 WHERE id = $2", t)


# The saga's steps under saga/, the TCC branch's under tcc/.
OPERATIONS: tuple[tuple[str, Business], ...] = (
    ("saga/TransIn", deposit),
    ("saga/TransInCompensate", take_back),
    ("tcc/TransInTry", announce),
    ("tcc/TransInConfirm", book),
    ("tcc/TransInCancel", drop),
)


class InBank:
    def __init__(self, pool: Any, table: str = TABLE) -> None:
        self.pool = pool
        self.table = table
        self.barrier = PostgresBarrier(pool)
        self.journal = Journal()

    async def reset(self, balances: Mapping[str, int]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            await conn.execute(f"CREATE TABLE {self.table} (id text PRIMARY KEY, "
                               "balance bigint NOT NULL, incoming bigint NOT NULL DEFAULT 0)")
            await conn.executemany(f"INSERT INTO {self.table} (id, balance) VALUES ($1, $2)",
                                   list(balances.items()))

    async def accounts(self) -> dict[str, tuple[int, int]]:
        """account → (balance, incoming)"""
        rows = await self.pool.fetch(f"SELECT id, balance, incoming FROM {self.table}")
        return {r["id"]: (int(r["balance"]), int(r["incoming"])) for r in rows}

    def app(self) -> web.Application:
        app = web.Application()
        for path, business in OPERATIONS:
            app.router.add_post(f"/{path}", self._guarded(path.split("/")[1], business))
        return app

    def _guarded(self, name: str, business: Business) -> Handler:
        async def handle(request: web.Request, branch: BranchInfo) -> None:
            transfer = await Transfer.of(request)
            await barrier_call(self.journal, name, branch, self.barrier,
                               lambda conn: business(conn, transfer, self.table))

        return branch_handler(handle)
