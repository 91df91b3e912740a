"""The barrier on MySQL/MariaDB through aiomysql (``pip install 'redis-coordinator[mysql]'``).

    pool = await aiomysql.create_pool(host=…, user=…, db="bank")
    async with pool.acquire() as conn:
        await ensure_barrier_table(conn)
    mysql_barrier = MysqlBarrier(pool)
    await BranchBarrier.from_query(request.query).call(mysql_barrier, business)

``business(conn)`` gets the aiomysql connection inside the transaction; use
``async with conn.cursor() as cur: await cur.execute("… %s …", (value,))``.
"""

from __future__ import annotations

import contextlib
import functools
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

# The schema file shipped with the package (sql/barrier.mysql.sql), statement by
# statement. Unlike dtm's own file it has no DROP TABLE: running it twice keeps the rows.
SCHEMA: tuple[str, ...] = sql_statements(read_resource("sql", "barrier.mysql.sql"))


@functools.cache
def quiet_cursor() -> type[Any]:
    """An aiomysql cursor class that does not turn server warnings into Python warnings
    (``conn.cursor(quiet_cursor())``); DDL with IF NOT EXISTS warns too."""
    import aiomysql  # the optional driver, needed only by this backend

    class QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
        """aiomysql turns every server warning into a Python warning after an extra
        SHOW WARNINGS round trip. INSERT IGNORE of an existing barrier row warns
        "Duplicate entry", which is exactly the answer the barrier asks for."""

        async def _show_warnings(self, conn: Any) -> None:
            return None

    return QuietCursor


async def ensure_barrier_table(conn: Any) -> None:
    """Create ``dtm_barrier.barrier`` if it is missing (aiomysql connection)."""
    async with conn.cursor(quiet_cursor()) as cur:
        for statement in SCHEMA:
            await cur.execute(statement)
    await conn.commit()


class MysqlBarrier(SqlBarrier):
    """``source`` is an aiomysql Pool (each call takes a connection of its own) or a
    Connection that is not inside a transaction (MySQL has no nested transactions: a
    BEGIN would commit the caller's work)."""

    def __init__(self, source: Any, table: str = DEFAULT_TABLE) -> None:
        super().__init__(table)
        self._source = source
        # The table name was checked by check_table_name; every value is a parameter.
        self._insert = (
            f"INSERT IGNORE INTO {self.table} "
            "(trans_type, gid, branch_id, op, barrier_id, reason) "
            "VALUES (%s, %s, %s, %s, %s, %s)"
        )
        self._select_reason = (
            f"SELECT reason FROM {self.table} "
            "WHERE gid = %s AND branch_id = %s AND op = %s AND barrier_id = %s"
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        import aiomysql

        if isinstance(self._source, aiomysql.Pool):
            async with self._source.acquire() as conn:
                yield conn
        else:
            yield self._source

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with self._connection() as conn:
            await conn.begin()
            try:
                yield conn
            except Exception:
                try:
                    await conn.rollback()
                except Exception:
                    conn.close()  # the server rolls back a closed session's transaction
                raise
            except BaseException:
                # Cancelled mid-statement: the protocol state is unknown, so the
                # connection cannot be reused; closing it rolls the transaction back.
                conn.close()
                raise
            await conn.commit()

    async def _insert_ignore(self, conn: Any, row: BarrierRow) -> bool:
        async with conn.cursor(quiet_cursor()) as cur:
            affected: int = await cur.execute(self._insert, tuple(row))
        return affected == 1

    async def _reason(self, conn: Any, gid: str) -> str | None:
        async with conn.cursor(quiet_cursor()) as cur:
            await cur.execute(self._select_reason, (gid, MSG_BRANCH, MSG_OP, MSG_BARRIER))
            found = await cur.fetchone()
        return None if found is None else str(found[0])
