"""Pipelining of concurrent script calls: one round trip for many transitions.

Under load many transactions write at the same moment. Each write is still one atomic
script, but the calls issued within one turn of the event loop are sent together as a
pipeline (no MULTI: the scripts are independent), which saves a round trip, a socket
write and a read per call. A few batches may be in flight at once, each on its own
connection, so a slow batch does not hold the next one back. On one Redis the pipeline
is a `DirectPipeline` (direct.py), which costs a fraction of redis-py's.

Calls that may share one script execution go further: they are sent as ONE ``EVALSHA``
of the batch script (scripts.py), which runs each of them in turn, so the fixed cost of
a script call (the command, the script lookup, the reply, the script's ``TIME``) is paid
once per batch. On one Redis every call of a batch shares it: each script touches only
the keys it declares, so running them in one script changes nothing but the cost, and
each is still its own compare-and-set (an error in one fails that call alone). On a
cluster only calls whose keys are in one hash slot can share it, so the calls are grouped
by slot. A call alone in its group is sent as its own script. A call that fails inside
the batch script fails with the exception it would raise alone (a Lua error's message
then names a line of the batch script).

On Redis Cluster the same pipeline is split by redis-py into one pipeline per node, sent
in parallel; MOVED and ASK replies are followed there. What redis-py leaves to us:

- ``NOSCRIPT``: a promoted replica or a node that took over a slot has never seen our
  scripts (SCRIPT LOAD is not replicated). The script did not run, so it is loaded on
  every primary and the call is made again. The calls of a batch script that found
  NOSCRIPT are made again alone, and the batch script is loaded for the next batches.
- A failover in progress (``CLUSTERDOWN``, ``TRYAGAIN``, a dead primary's connection
  errors): the call is retried with back-off for ``retry_for`` seconds, with the slot
  map refreshed, and only then reported as `StoreUnavailable` (HTTP 503).
- ``wait_replicas``: after the writes of a batch, one ``WAIT n`` per node on the same
  connection as those writes, so a write is acknowledged only once that many replicas
  have it. A write the caller acknowledges to a client (``strict``) that did not reach
  them is reported as `StoreUnavailable`: it may be lost in a failover, so the client
  must not take it as done. The engine's own writes (``strict=False``) go on after the
  WAIT either way: refusing them would leave the transactions of a primary that lost
  its replica stuck, while losing one only means the step is driven again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.errors import StoreUnavailable
from coordinator.store.direct import DirectPipeline
from coordinator.store.scripts import BATCH_ERROR

# (script, keys, args, writes, future); writes: 0 reads, 1 engine write, 2 acknowledged
Call = tuple[AsyncScript, Sequence[Any], Sequence[Any], int, "asyncio.Future[Any]"]
READ, WRITE, ACKED = 0, 1, 2
SHORT_RECHECK_S = 5.0

# What a failover or a resharding answers for a while; the same call succeeds later.
_TRANSIENT = (
    RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, ClusterError,
    SlotNotCoveredError, BusyLoadingError, ReadOnlyError,
)
_TRANSIENT_CODES = ("CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING", "READONLY")


def transient(exc: BaseException) -> bool:
    """Whether `exc` is what a cluster answers while it fails over or moves a slot."""
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, AttributeError) and "'NoneType'" in str(exc):
        # redis-py closes every connection of a cluster client when it reloads the slot
        # map after CLUSTERDOWN; a command of another task caught on one of them fails
        # like this instead of with a ConnectionError.
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_CODES)


class ScriptBatcher:
    def __init__(
        self, client: aioredis.Redis | RedisCluster, *, max_batch: int = 256,
        max_in_flight: int = 4, wait_replicas: int = 0, wait_timeout_ms: int = 1000,
        retry_for: float = 0.0, batch_script: AsyncScript | None = None,
        batch_index: Mapping[str, int] | None = None,
    ) -> None:
        """`batch_script` runs the scripts `batch_index` numbers (by SHA) in one call;
        without it every call is an EVALSHA of its own."""
        self.client = client
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.retry_for = retry_for
        self._cluster = isinstance(client, RedisCluster)
        self._queue: list[Call] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.calls = 0
        self.retries = 0
        self.unreplicated = 0  # engine writes WAIT did not confirm in time
        self._short: dict[str, tuple[float, int]] = {}  # node -> (until, replicas seen)
        self.batch_script = batch_script
        self.batch_index = dict(batch_index or {}) if batch_script is not None else {}
        self.shared = 0  # calls that ran inside a batch script
        # A call alone in its group runs as its own script, unless this is set (tests
        # set it to run every call through the batch script).
        self.always_share = False
        self._loading: asyncio.Task[None] | None = None

    async def call(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], *,
        writes: int = ACKED,
    ) -> Any:
        """Run one script; `writes` says what `wait_replicas` means for it (READ: no
        WAIT; WRITE: WAIT, then go on; ACKED: WAIT, and 503 if it falls short)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, writes, future))
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
            self._spawn(self._send(batch))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pipeline(self) -> Any:
        """A pipeline without MULTI: on one Redis a DirectPipeline (direct.py), on a
        cluster redis-py's, which sends each node its commands."""
        if self._cluster:
            return self.client.pipeline(transaction=False)
        assert isinstance(self.client, aioredis.Redis)
        return DirectPipeline(self.client)

    def _node(self, keys: Sequence[Any]) -> ClusterNode | None:
        """The primary that serves the call's slot (None on a single Redis)."""
        if not self._cluster or not keys:
            return None
        assert isinstance(self.client, RedisCluster)
        return self.client.get_node_from_key(keys[0])

    def _short_of_replicas(self, name: str) -> int | None:
        """The replicas a node's last WAIT reached, if too few and found out lately.

        After a failover the promoted replica may have no replica left; WAIT there can
        only time out, and would hold every batch it is part of for `wait_timeout_ms`.
        So a node whose WAIT fell short is not asked again for `SHORT_RECHECK_S`: its
        acknowledged writes answer 503 at once, the engine's own go on.
        """
        seen = self._short.get(name)
        if seen is None or seen[0] < time.monotonic():
            return None
        return seen[1]

    def _note_wait(self, name: str, acked: Any) -> None:
        if not (isinstance(acked, int) and acked >= self.wait_replicas):
            count = acked if isinstance(acked, int) else 0
            self._short[name] = (time.monotonic() + SHORT_RECHECK_S, count)

    def _queue_wait(self, pipe: Any, node: ClusterNode | None) -> None:
        if node is None:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        else:
            pipe.execute_command(
                "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
            )

    def _shared_slot(self, script: AsyncScript, keys: Sequence[Any]) -> int | None:
        """The group of calls this one may share a batch script with: 0 on one Redis,
        the hash slot of its keys on a cluster; None: it runs as its own script."""
        if script.sha not in self.batch_index:
            return None
        if not self._cluster:
            return 0
        if not keys:
            return None
        assert isinstance(self.client, RedisCluster)
        slot = self.client.keyslot(keys[0])
        # A call whose keys span slots fails with CROSSSLOT; it must not fail others.
        if any(self.client.keyslot(key) != slot for key in keys[1:]):
            return None
        return slot

    def _units(self, batch: list[Call]) -> list[list[int]]:
        """The calls of a batch, as the EVALSHAs that send them (positions in `batch`)."""
        if self.batch_script is None or (len(batch) == 1 and not self.always_share):
            return [[i] for i in range(len(batch))]
        units: list[list[int]] = []
        groups: dict[int, list[int]] = {}
        for i, call in enumerate(batch):
            slot = self._shared_slot(call[0], call[1])
            if slot is None:
                units.append([i])
            elif slot in groups:
                groups[slot].append(i)
            else:
                groups[slot] = [i]
                units.append(groups[slot])
        return units

    def _queue_unit(self, pipe: Any, calls: list[Call]) -> None:
        if len(calls) == 1 and not self.always_share:
            script, keys, args, _, _ = calls[0]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return
        assert self.batch_script is not None
        self.shared += len(calls)
        header: list[Any] = [len(calls)]
        all_keys: list[Any] = []
        all_args: list[Any] = []
        for script, keys, args, _, _ in calls:
            header += (self.batch_index[script.sha], len(keys), len(args))
            all_keys += keys
            all_args += args
        pipe.execute_command(
            "EVALSHA", self.batch_script.sha, len(all_keys), *all_keys, *header, *all_args
        )

    def _replies(self, units: list[list[int]], replies: list[Any], count: int) -> list[Any]:
        """Each call's own reply, from the replies of the EVALSHAs of `units`."""
        out: list[Any] = [None] * count
        for unit, reply in zip(units, replies, strict=False):
            if len(unit) == 1 and not self.always_share:
                out[unit[0]] = reply
                continue
            if isinstance(reply, list) and len(reply) == len(unit):
                for i, one in zip(unit, reply, strict=True):
                    out[i] = _unmarked(one)
                continue
            if isinstance(reply, NoScriptError):
                # The calls go on alone (as after any NOSCRIPT); the next batches need
                # the batch script back.
                self._reload_batch_script()
            elif not isinstance(reply, Exception):
                reply = ResponseError(f"the batch script answered {reply!r}")
            for i in unit:
                out[i] = reply
        return out

    def _reload_batch_script(self) -> None:
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load_batch_script())

    async def _load_batch_script(self) -> None:
        assert self.batch_script is not None
        try:
            await self.client.script_load(self.batch_script.script)
        except Exception:
            return  # the next batch to find it missing tries again

    async def _send(self, batch: list[Call]) -> None:
        try:
            self.batches += 1
            self.calls += len(batch)
            waits: dict[str, int] = {}  # node name -> position of its WAIT reply
            nodes: list[str] = []
            short: dict[int, int] = {}  # call -> replicas of a primary with too few
            units = self._units(batch)
            async with self._pipeline() as pipe:
                by_node: dict[str, tuple[ClusterNode | None, list[int]]] = {}
                for unit in units:
                    self._queue_unit(pipe, [batch[i] for i in unit])
                # Without wait_replicas nothing below needs the calls' nodes.
                for i, (_, keys, _, writes, _) in enumerate(batch if self.wait_replicas else ()):
                    node = self._node(keys)
                    name = node.name if node is not None else ""
                    nodes.append(name)
                    if writes:
                        have = self._short_of_replicas(name)
                        if have is not None:
                            short[i] = have
                        else:
                            by_node.setdefault(name, (node, []))[1].append(i)
                # One WAIT per node, after that node's writes on the same connection.
                for name, (node, _) in by_node.items():
                    waits[name] = len(units) + len(waits)
                    self._queue_wait(pipe, node)
                replies = await pipe.execute(raise_on_error=False)
            for name, at in waits.items():
                self._note_wait(name, replies[at])
            own = self._replies(units, replies, len(batch))
            for i, (script, keys, args, writes, future) in enumerate(batch):
                reply = own[i]
                if future.done():
                    continue
                if isinstance(reply, NoScriptError) or (
                    isinstance(reply, Exception) and transient(reply) and self.retry_for
                ):
                    # The script did not run (NOSCRIPT) or the node is failing over:
                    # run it again on its own, loading scripts / waiting as needed.
                    self._spawn(self._retry_alone(script, keys, args, writes, future))
                elif isinstance(reply, Exception):
                    future.set_exception(reply)
                elif writes and self.wait_replicas:
                    acked = short[i] if i in short else replies[waits[nodes[i]]]
                    self._settle(future, reply, acked, writes)
                else:
                    future.set_result(reply)
        except BaseException as exc:  # connection trouble: every caller gets the error
            retry = isinstance(exc, Exception) and transient(exc) and self.retry_for > 0
            for script, keys, args, writes, future in batch:
                if future.done():
                    continue
                if retry:
                    self._spawn(self._retry_alone(script, keys, args, writes, future))
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._flush()

    def _settle(self, future: asyncio.Future[Any], reply: Any, acked: Any, writes: int) -> None:
        """Answer a write once WAIT says enough replicas have it."""
        if isinstance(acked, int) and acked >= self.wait_replicas:
            future.set_result(reply)
            return
        if writes != ACKED:
            self.unreplicated += 1
            future.set_result(reply)
            return
        future.set_exception(StoreUnavailable(
            f"the change reached {acked!r} of the {self.wait_replicas} replicas "
            f"redis.wait_replicas asks for within {self.wait_timeout_ms} ms; it may be "
            "lost if its primary fails"
        ))

    async def _retry_alone(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any], writes: int,
        future: asyncio.Future[Any],
    ) -> None:
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        last: BaseException | None = None
        while not future.done():
            try:
                async with self._pipeline() as pipe:
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    node = self._node(keys) if writes and self.wait_replicas else None
                    name = node.name if node is not None else ""
                    have = self._short_of_replicas(name) if writes else None
                    wait = bool(writes) and self.wait_replicas > 0 and have is None
                    if wait:
                        self._queue_wait(pipe, node)
                    replies = await pipe.execute(raise_on_error=False)
                reply = replies[0]
                if isinstance(reply, NoScriptError):
                    # Loaded on every primary (SCRIPT LOAD is sent to all of them).
                    await self.client.script_load(script.script)
                    continue
                if isinstance(reply, Exception):
                    raise reply
                if wait:
                    self._note_wait(name, replies[1])
                    self._settle(future, reply, replies[1], writes)
                elif have is not None:
                    self._settle(future, reply, have, writes)
                else:
                    future.set_result(reply)
                return
            except Exception as exc:
                if not transient(exc):
                    future.set_exception(exc)
                    return
                last = exc
            if time.monotonic() + delay > deadline:
                break
            self.retries += 1
            self._refresh_slots()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        if not future.done():
            future.set_exception(StoreUnavailable(
                f"Redis did not answer for {self.retry_for:g} s: {last}"
            ))

    def _refresh_slots(self) -> None:
        """Have redis-py read the slot map again before its next command.

        A pipeline keeps a dead primary's connection error as that command's reply
        without marking the map stale (a single command would), so after a failover
        the calls would keep going to the dead node; this is the flag redis-py's own
        error handling sets.
        """
        if isinstance(self.client, RedisCluster):
            self.client._initialize = True


_ERROR_MARKS = (BATCH_ERROR, BATCH_ERROR.encode())


def _unmarked(reply: Any) -> Any:
    """A call's reply from the batch script; its error marker as the exception the call
    run alone would have answered (the code before the message picks the class)."""
    if isinstance(reply, list) and len(reply) == 2 and reply[0] in _ERROR_MARKS:
        message = reply[1]
        if isinstance(message, bytes):
            message = message.decode(errors="replace")
        # redis-py's own mapping of an error reply to its exception class.
        error: ResponseError = BaseParser.parse_error(str(message))  # type: ignore[no-untyped-call]
        return error
    return reply
