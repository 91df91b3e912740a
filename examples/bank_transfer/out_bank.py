"""The sending bank: accounts in MariaDB; TransOut as a saga step, a TCC branch and an XA
branch.

``balance`` is the money on an account and ``frozen`` the part a TCC try has set aside:
it can no longer be spent, but it leaves the account only on confirm.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from coordinator.client import BranchInfo, MysqlBarrier, TransactionFailed, branch_handler
from coordinator.client.participant import Handler
from examples.bank_transfer.transfer import Business, Transfer
from examples.bank_transfer.xa import Connect, xa_branch
from examples.common import Journal, affected, barrier_call, mysql_execute, mysql_rows

TABLE = "ex_bank_out"  # each business function takes another table by `table=`


async def withdraw(conn: Any, t: Transfer, table: str = TABLE) -> None:
    """Saga action and XA action: only money that is not frozen can leave."""
    if not await affected(conn, f"UPDATE {table} SET balance = balance - %s "
                                "WHERE id = %s AND balance - frozen >= %s",
                          t.amount, t.account, t.amount):
        raise TransactionFailed(f"insufficient funds in {t.account}")


async def refund(conn: Any, t: Transfer, table: str = TABLE) -> None:
    await affected(conn, f"UPDATE {table} SET balance = balance + %s WHERE id = %s",
                   t.amount, t.account)


async def freeze(conn: Any, t: Transfer, table: str = TABLE) -> None:
    if not await affected(conn, f"UPDATE {table} SET frozen = frozen + %s "
                                "WHERE id = %s AND balance - frozen >= %s",
                          t.amount, t.account, t.amount):
        raise TransactionFailed(f"insufficient funds in {t.account}")


async def pay_frozen(conn: Any, t: Transfer, table: str = TABLE) -> None:
    await affected(conn, f"UPDATE {table} SET balance = balance - %s, frozen = frozen - %s "
                         "WHERE id = %s", t.amount, t.amount, t.account)


async def unfreeze(conn: Any, t: Transfer, table: str = TABLE) -> None:
    await affected(conn, f"UPDATE {table} SET frozen = frozen - %s WHERE id = %s",
                   t.amount, t.account)


# The saga's steps under saga/, the TCC branch's under tcc/.
OPERATIONS: tuple[tuple[str, Business], ...] = (
    ("saga/TransOut", withdraw),
    ("saga/TransOutCompensate", refund),
    ("tcc/TransOutTry", freeze),
    ("tcc/TransOutConfirm", pay_frozen),
    ("tcc/TransOutCancel", unfreeze),
)


class OutBank:
    def __init__(self, pool: Any, connect: Connect, table: str = TABLE) -> None:
        self.pool = pool
        self.table = table
        self.barrier = MysqlBarrier(pool)
        self.connect = connect  # XA branches need sessions of their own
        self.journal = Journal()

    async def reset(self, balances: Mapping[str, int]) -> None:
        await mysql_execute(
            self.pool,
            f"DROP TABLE IF EXISTS {self.table}",
            f"CREATE TABLE {self.table} (id varchar(64) PRIMARY KEY, balance bigint NOT NULL, "
            "frozen bigint NOT NULL DEFAULT 0) ENGINE = InnoDB",
            *((f"INSERT INTO {self.table} (id, balance) VALUES (%s, %s)", (account, amount))
              for account, amount in balances.items()),
        )

    async def accounts(self) -> dict[str, tuple[int, int]]:
        """account → (balance, frozen)"""
        rows = await mysql_rows(self.pool, f"SELECT id, balance, frozen FROM {self.table}")
        return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}

    def app(self) -> web.Application:
        app = web.Application()
        for path, business in OPERATIONS:
            app.router.add_post(f"/{path}", self._guarded(path.split("/")[1], business))
        xa = functools.partial(xa_branch, self.journal, "TransOut XA", self.connect, withdraw)
        app.router.add_post("/xa/TransOut", branch_handler(xa))
        return app

    def _guarded(self, name: str, business: Business) -> Handler:
        async def handle(request: web.Request, branch: BranchInfo) -> None:
            transfer = await Transfer.of(request)
            await barrier_call(self.journal, name, branch, self.barrier,
                               lambda conn: business(conn, transfer, self.table))

        return branch_handler(handle)
