"""The script batcher's pipelines on one Redis, without redis-py's Pipeline.

Every batch of script calls is one pipeline. redis-py's asyncio Pipeline spends, per
pipeline, more CPU than the commands themselves cost to pack: a command stack, response
callbacks, observability hooks and HIMPORT bookkeeping that EVALSHA and WAIT do not use.
This one only packs the commands into one write (hiredis, see packing.py) on a pooled
connection and reads the replies back from it.

What the caller sees is what `Pipeline.execute(raise_on_error=False)` gives: one reply
per command, an error reply as its exception, and a lost connection or a timeout
retried by the client's retry policy on a fresh connection (the whole pipeline again,
as redis-py does) before it is raised. A Redis Cluster client keeps redis-py's cluster
pipeline, which routes the commands to their nodes.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError


class DirectPipeline:
    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._commands: list[tuple[Any, ...]] = []

    async def __aenter__(self) -> DirectPipeline:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._commands.clear()

    def execute_command(self, *args: Any) -> None:
        self._commands.append(args)

    async def execute(self, raise_on_error: bool = False) -> list[Any]:
        """The replies, error replies among them as exceptions (raise_on_error=False is
        the only mode the batcher uses)."""
        if raise_on_error:
            raise ValueError("DirectPipeline returns error replies; it does not raise them")
        if not self._commands:
            return []
        conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed = conn.pack_commands(self._commands)
            count = len(self._commands)

            async def failed(error: Exception, failures: int) -> None:
                await conn.disconnect(error=error, failure_count=failures)

            replies: list[Any] = await conn.retry.call_with_retry(
                lambda: _round_trip(conn, packed, count), failed, with_failure_count=True
            )
            return replies
        finally:
            await self._pool.release(conn)


async def _round_trip(conn: AbstractConnection, packed: list[bytes], count: int) -> list[Any]:
    # A failed read disconnects (read_response does), so a retry or the next user of the
    # connection never reads the replies of these commands.
    await conn.send_packed_command(packed)
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies
