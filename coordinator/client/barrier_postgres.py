"""The barrier on PostgreSQL through asyncpg (``pip install 'redis-coordinator[postgres]'``).

    pool = await asyncpg.create_pool("postgresql://…")
    async with pool.acquire() as conn:
        await ensure_barrier_table(conn)
    pg_barrier = PostgresBarrier(pool)
    await BranchBarrier.from_query(request.query).call(pg_barrier, business)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from coordinator.client.barrier import (
    DEFAULT_TABLE,
    MSG_BARRIER,
    MSG_BRANCH,
    MSG_OP,
    BarrierRow,
    SqlBarrier,
)
from coordinator.resources import read_resource, sql_statements

# The schema file shipped with the package (sql/barrier.postgres.sql), statement by
# statement. Unlike dtm's own file it has no DROP TABLE: running it twice keeps the rows.
SCHEMA: tuple[str, ...] = sql_statements(read_resource("sql", "barrier.postgres.sql"))

# Any constant works; it only serialises concurrent schema creation.
_SCHEMA_LOCK = 0x6474_6D62


async def ensure_barrier_table(conn: Any) -> None:
    """Create ``dtm_barrier.barrier`` if it is missing (asyncpg connection).

    PostgreSQL's IF NOT EXISTS is not safe against a concurrent creator (both pass the
    check, one fails on the catalog's unique index), hence the advisory lock.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        for statement in SCHEMA:
            await conn.execute(statement)


class PostgresBarrier(SqlBarrier):
    """``source`` is an asyncpg Pool (each call takes a connection of its own) or a
    Connection (used as is: inside a transaction of the caller, the barrier runs in a
    savepoint and the caller's commit decides)."""

    def __init__(self, source: Any, table: str = DEFAULT_TABLE) -> None:
        super().__init__(table)
        self._source = source
        # The table name was checked by check_table_name; every value is a parameter.
        self._insert = (
            f"INSERT INTO {self.table} (trans_type, gid, branch_id, op, barrier_id, reason) "
            "VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (gid, branch_id, op, barrier_id) DO NOTHING"
        )
        self._select_reason = (
            f"SELECT reason FROM {self.table} "
            "WHERE gid = $1 AND branch_id = $2 AND op = $3 AND barrier_id = $4"
        )

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        import asyncpg  # the optional driver, needed only by this backend

        if isinstance(self._source, asyncpg.Pool):
            async with self._source.acquire() as conn, conn.transaction():
                yield conn
        else:
            async with self._source.transaction():
                yield self._source

    async def _insert_ignore(self, conn: Any, row: BarrierRow) -> bool:
        status: str = await conn.execute(self._insert, *row)
        # The command tag is "INSERT 0 <rows>".
        return status.rsplit(" ", 1)[-1] == "1"

    async def _reason(self, conn: Any, gid: str) -> str | None:
        value = await conn.fetchval(self._select_reason, gid, MSG_BRANCH, MSG_OP, MSG_BARRIER)
        return None if value is None else str(value)
