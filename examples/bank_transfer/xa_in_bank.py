"""The receiving bank's XA side: the same rule as in_bank, in a MariaDB database of its
own (``ex_bank_xa_in``), because XA on this PostgreSQL is switched off."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from coordinator.client import TransactionFailed, branch_handler
from examples.bank_transfer.transfer import Transfer, check_limit
from examples.bank_transfer.xa import Connect, xa_branch
from examples.common import Journal, affected, mysql_execute, mysql_rows

DATABASE = "ex_bank_xa_in"
TABLE = "account"


async def create_database(server_pool: Any) -> None:
    await mysql_execute(server_pool, f"CREATE DATABASE IF NOT EXISTS {DATABASE}")


async def deposit(conn: Any, t: Transfer) -> None:
    check_limit(t)
    if not await affected(conn, f"UPDATE {TABLE} SET balance = balance + %s WHERE id = %s",
                          t.amount, t.account):
        raise TransactionFailed(f"no account {t.account}")


class XaInBank:
    def __init__(self, pool: Any, connect: Connect) -> None:
        self.pool = pool
        self.connect = connect
        self.journal = Journal()

    async def reset(self, balances: Mapping[str, int]) -> None:
        await mysql_execute(
            self.pool,
            f"DROP TABLE IF EXISTS {TABLE}",
            f"CREATE TABLE {TABLE} (id varchar(64) PRIMARY KEY, balance bigint NOT NULL) "
            "ENGINE = InnoDB",
            *((f"INSERT INTO {TABLE} (id, balance) VALUES (%s, %s)", (account, amount))
              for account, amount in balances.items()),
        )

    async def accounts(self) -> dict[str, int]:
        rows = await mysql_rows(self.pool, f"SELECT id, balance FROM {TABLE}")
        return {str(r[0]): int(r[1]) for r in rows}

    def app(self) -> web.Application:
        app = web.Application()
        xa = functools.partial(xa_branch, self.journal, "TransIn XA", self.connect, deposit)
        app.router.add_post("/xa/TransIn", branch_handler(xa))
        return app
