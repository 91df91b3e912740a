"""Pipelining of concurrent script calls: one round trip for many transitions.

Under load many transactions write at the same moment. Each write is still one atomic
script, but the calls issued within one turn of the event loop are sent together as a
pipeline (no MULTI: the scripts are independent), which saves a round trip, a socket
write and a read per call. A few batches may be in flight at once, each on its own
connection, so a slow batch does not hold the next one back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Call = tuple[AsyncScript, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(
        self, client: aioredis.Redis, *, max_batch: int = 256, max_in_flight: int = 4
    ) -> None:
        self.client = client
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: list[Call] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.calls = 0

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            # Flush after the other ready callbacks of this turn had a chance to queue.
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            self.batches += 1
            self.calls += len(batch)
            async with self.client.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            for (script, keys, args, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, NoScriptError):
                    # The server lost its script cache (restart, SCRIPT FLUSH): the script
                    # did not run, so running it again through the loading path is safe.
                    self._retry_alone(script, keys, args, future)
                elif isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except BaseException as exc:  # connection trouble: every caller gets the error
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._flush()

    def _retry_alone(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any],
        future: asyncio.Future[Any],
    ) -> None:
        async def run() -> None:
            try:
                future.set_result(await script(keys=list(keys), args=list(args)))
            except Exception as exc:
                future.set_exception(exc)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
