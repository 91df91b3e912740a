"""The Redis backend: every transition is one Lua script, called by EVALSHA."""

from __future__ import annotations

import builtins
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coordinator.errors import (
    AlreadyExists,
    LayoutTooNew,
    NotFound,
    PartitionMismatch,
    StoreUnavailable,
    raise_for_reply,
)
from coordinator.keys import (
    FINISHED_BAND,
    MINUTE_MS,
    KeySpace,
    label_minute,
    member_minute,
    minute_label,
    partition_of,
)
from coordinator.model import Branch, Status, Trans
from coordinator.store.base import (
    Claimed,
    ListFilter,
    Page,
    Store,
    Topic,
    Transition,
    TransitionResult,
)
from coordinator.store.batch import ACKED, READ, WRITE, ScriptBatcher
from coordinator.store.codec import (
    CorruptRecord,
    branch_update_args,
    branches_json,
    flat_pairs,
    split_hash,
    status_of,
    trans_field_pairs,
    trans_from_hash,
    trans_from_pairs,
)
from coordinator.store.packing import use_c_packing
from coordinator.store.scripts import (
    SCRIPT_NAMES,
    batch_script_text,
    batchable,
    script_text,
)

log = logging.getLogger("coordinator.store")

P = ParamSpec("P")
R = TypeVar("R")

# A pooled connection that went stale (Redis restarted, a proxy dropped it) fails its
# next use; these errors are retried on a fresh connection with back-off, and only when
# Redis stays away do they reach the caller, as StoreUnavailable (HTTP 503).
RETRIED_ERRORS: tuple[type[RedisError], ...] = (RedisConnectionError, RedisTimeoutError)
RETRIES = 5  # waits of 0.05, 0.1, 0.2, 0.4, 0.5 s: about 1.3 s before giving up
# Idle connections are pinged before use after this many seconds.
HEALTH_CHECK_INTERVAL = 10
# Layout 5 (keys.py): a transaction hash holds the transaction as sent in one "spec"
# field, branches included, and a field per branch only for its state once it changes;
# the due index, named by listing members, holds unfinished transactions, and in its
# band the sweep's schedule of the listing buckets, one sorted set per partition and
# minute. Layout 4 kept a field per value and a whole record per branch (still read as
# they are: no data moves from 4 to 5); layout 3 kept one listing index per partition
# and finished transactions in the band; layout 1 kept branches in a hash of their own,
# and 1 and 2 a separate index of finished transactions.
LAYOUT = "5"

# The listing buckets (keys.py). A create names the buckets of two minutes around this
# host's estimate of the server's time (the script takes the server's own minute), so an
# estimate up to this far off still hits one of them; a worse one costs a retry.
BUCKET_REACH_MS = 30_000
CREATE_ATTEMPTS = 3
# A bucket that holds only unfinished transactions is looked at again after this long
# at least (after a quarter of its age once it is older, up to a day: sweep.lua).
SWEEP_RECHECK_MS = 600_000
# One sweep call of a partition walks due buckets for this long at most.
SWEEP_BUDGET_S = 1.0
# Members per sweep call, so that one call never blocks Redis for long; and how long a
# walk keeps other sweepers off its bucket.
SWEEP_CHUNK = 500
SWEEP_WALK_MS = 60_000
# How long a process trusts its memory that a bucket is registered (create.lua): after
# Redis lost writes (a failover), its creates register the buckets again within this.
LISTED_FOR_S = 5.0
# How many of each partition's bucket minutes a listing round reads at most.
LIST_MINUTES = 16


def _retry_policy() -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.025), RETRIES, RETRIED_ERRORS)


def _unavailable_as_503(
    method: Callable[P, Awaitable[R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except RETRIED_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unavailable ({exc}); retry later") from exc

    return wrapper


class RedisStore(Store):
    """Transactions as Redis hashes, with a partitioned due-index (see keys.py)."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        keys: KeySpace,
        *,
        lease_ms: int = 30_000,
        finished_ttl_s: int = 86_400,
        batch: bool = True,
        batch_scripts: bool = True,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        retry_for: float = 0.0,
    ) -> None:
        use_c_packing(client)
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.keys = keys
        self.partitions = keys.partitions
        self.lease_ms = lease_ms
        self._due_keys = [keys.due(p) for p in range(self.partitions)]
        self.finished_ttl_s = finished_ttl_s
        self._first_look_ms = finished_ttl_s * 1000
        # The server's clock minus this host's, per partition (a cluster's nodes may
        # disagree); learned at start and from any create that missed its minute.
        self._clock_offset_ms = [0] * self.partitions
        # Per partition, the listing buckets a create names now: [first minute, its key,
        # the next minute's key, the index of buckets, and the labels to register, ""
        # once this process has seen a create registered there]; forgotten every
        # LISTED_FOR_S, so that buckets are registered again after Redis lost writes.
        self._buckets: list[list[Any] | None] = [None] * self.partitions
        self._listed_until = 0.0
        # register_script only computes the SHA; start() loads them so that the first
        # call of each is already an EVALSHA hit. AsyncScript reloads on NOSCRIPT.
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(script_text(name)) for name in SCRIPT_NAMES
        }
        # Several calls of one round (of one slot on a cluster) run as one call of
        # the batch script, which embeds the scripts it can run.
        shared = tuple(name for name in SCRIPT_NAMES if batchable(name))
        self.batch_script: AsyncScript | None = (
            client.register_script(batch_script_text(shared)) if batch_scripts else None
        )
        # Creates and transitions of concurrent transactions share round trips.
        # On a cluster, one pipeline per node per round.
        self._batch = ScriptBatcher(
            client, max_batch=256 if batch else 1, wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms, retry_for=retry_for,
            batch_script=self.batch_script,
            batch_index={self.scripts[name].sha: i + 1 for i, name in enumerate(shared)},
        )

    @classmethod
    def from_url(cls, url: str, keys: KeySpace, **kwargs: Any) -> RedisStore:
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            max_connections=512,
            retry=_retry_policy(),
            retry_on_error=list(RETRIED_ERRORS),
            health_check_interval=HEALTH_CHECK_INTERVAL,
            socket_connect_timeout=5,
        )
        return cls(client, keys, **kwargs)

    @classmethod
    def from_cluster(cls, seeds: Sequence[tuple[str, int]], keys: KeySpace, *,
                     url: str = "", **kwargs: Any) -> RedisStore:
        """A store on Redis Cluster, found from one or more seed nodes (cluster.py).

        Calls caught in a failover are retried for `retry_for` seconds (default 10: a
        replica takes over within a few node timeouts) before they answer 503.
        """
        from coordinator.store.cluster import cluster_client

        kwargs.setdefault("retry_for", 10.0)
        return cls(cluster_client(seeds, url), keys, **kwargs)

    @_unavailable_as_503
    async def start(self) -> None:
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
        # On a cluster SCRIPT LOAD goes to every primary.
        for script in self.scripts.values():
            await self.client.script_load(script.script)
        if self.batch_script is not None:
            await self.client.script_load(self.batch_script.script)
        await self._check_partitions()
        await self._read_clock()
        await self._upgrade_layout()

    async def _read_clock(self) -> None:
        seconds, micros = await self.client.time()
        self._clock_offset_ms = [
            seconds * 1000 + micros // 1000 - _now_ms()
        ] * self.partitions

    async def _check_partitions(self) -> None:
        """The partition count is part of every key's name: a deployment restarted with
        another count would look for its transactions under other keys and strand every
        unfinished one. The first start records it; a later one must agree."""
        key = self.keys.kv("partitions")
        await self.client.set(key, self.partitions, nx=True)
        recorded = int(await self.client.get(key) or self.partitions)
        if recorded != self.partitions:
            raise PartitionMismatch(
                f"redis.partitions is {self.partitions}, but the transactions under key "
                f"prefix '{self.keys.prefix}' were stored with {recorded}; set "
                f"redis.partitions = {recorded} (it is fixed for the life of a deployment)"
            )

    async def _upgrade_layout(self) -> None:
        """Brings data of earlier key layouts to this one, once per deployment (a marker
        records that it is done). Each step is a script per transaction or per bounded
        batch, safe to repeat, so an interrupted start-up resumes where it stopped."""
        marker = self.keys.kv("layout")
        found = await self.client.get(marker)
        if found == LAYOUT:
            return
        if found is not None and (not found.isdigit() or int(found) > int(LAYOUT)):
            # A newer version's data: this one would misread it (and must not mark it
            # as its own layout).
            raise LayoutTooNew(
                f"the data under key prefix '{self.keys.prefix}' is in key layout "
                f"{found!r}, which this version (layout {LAYOUT}) cannot read; run the "
                f"version that wrote it, or a newer one"
            )
        if found not in ("2", "3", "4"):
            await self._move_branch_hashes()
        if found not in ("3", "4"):
            await self._fold_expiry_indexes()
        if found != "4":
            await self._split_listing_indexes()
        await self.client.set(marker, LAYOUT)

    async def _move_branch_hashes(self) -> None:
        """Layout 1 kept a transaction's branch records in a hash of their own."""
        script = self.client.register_script(script_text("migrate_layout"))
        moved = 0
        async for key in self.client.scan_iter(
            match=self.keys.legacy_branches_pattern(), count=1000
        ):
            name = key.decode() if isinstance(key, bytes) else key
            moved += int(await script(keys=[name, self.keys.legacy_trans_key(name)]))
        if moved:
            log.info("moved the branches of %d transactions into their transaction hashes "
                     "(key layout 2)", moved)

    async def _fold_expiry_indexes(self) -> None:
        """Layouts 1 and 2 named due entries by the gid and kept finished transactions
        in an expiry index of their own."""
        script = self.client.register_script(script_text("migrate_due"))
        converted = moved = 0
        for p in range(self.partitions):
            due, expiry = self.keys.due(p), self.keys.legacy_expiry(p)
            tp = self.keys.trans_prefix(p)
            old = [str(m) for m in await self.client.zrange(due, 0, -1)]
            left = 1
            while old or left:
                batch, old = old[:200], old[200:]
                n, m, left = await script(keys=[due, expiry, *(tp + g for g in batch)],
                                          args=batch)
                converted, moved = converted + int(n), moved + int(m)
        if converted or moved:
            log.info("renamed %d due entries and moved %d expiry entries into the due "
                     "indexes (key layout 3)", converted, moved)

    async def _split_listing_indexes(self) -> None:
        """Layout 3 kept one listing index per partition, and a due entry in the band
        for every finished transaction."""
        script = self.client.register_script(script_text("migrate_listing"))
        moved = dropped = 0
        for p in range(self.partitions):
            old, due = self.keys.legacy_created(p), self.keys.due(p)
            while members := [str(m) for m in await self.client.zrange(old, 0, 499)]:
                labels = [minute_label(member_minute(m)) for m in members]
                args: list[Any] = [self._first_look_ms]
                for member, label in zip(members, labels, strict=True):
                    args += [member, label]
                moved += int(await script(
                    keys=[due, old, self.keys.minutes(p),
                          *(self.keys.bucket(p, label) for label in labels)],
                    args=args))
            # Band entries of finished transactions without a listing entry (layout 3's
            # sweep dropped the two together, so these are strays): layout 4 keeps none.
            # The band's buckets (no ':') stay, and are stepped over.
            kept = 0
            while band := [str(m) for m in await self.client.zrangebyscore(
                    due, FINISHED_BAND, "+inf", start=kept, num=500)]:
                strays = [m for m in band if ":" in m]
                kept += len(band) - len(strays)
                if strays:
                    dropped += int(await self.client.zrem(due, *strays))
        if moved or dropped:
            log.info("moved %d listing entries into listing buckets by minute and dropped "
                     "%d due entries of finished transactions (key layout %s)",
                     moved, dropped, LAYOUT)

    async def close(self) -> None:
        await self.client.aclose()

    @_unavailable_as_503
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def health(self) -> dict[str, Any]:
        """Reachability of every Redis node this store uses (see cluster.py)."""
        from coordinator.store.cluster import node_health

        return await node_health(self.client)

    def create_call(
        self, trans: Trans, *, due_in_ms: int, owner: str = "", lease_ms: int = 0
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of lua/create.lua for this transaction. A caller that runs the
        script itself hands its reply to `created` (see there)."""
        gid = trans.gid
        p = partition_of(gid, self.partitions)
        wall = time.time()
        minute = (int(wall * 1000) + self._clock_offset_ms[p] - BUCKET_REACH_MS) // MINUTE_MS
        if wall >= self._listed_until:
            self._buckets = [None] * self.partitions
            self._listed_until = wall + LISTED_FOR_S
        named = self._buckets[p]
        if named is None or named[0] != minute:
            first, second = minute_label(minute), minute_label(minute + 1)
            prefix = self.keys.bucket_prefix(p)
            named = self._buckets[p] = [minute, prefix + first, prefix + second,
                                        self.keys.minutes(p), first, second]
        fields = trans_field_pairs(trans)
        args: list[Any] = [
            gid,
            trans.status,  # a str: packed as its value (see codec.branch_to_json)
            len(fields) // 2,
            max(0, due_in_ms),
            owner,
            lease_ms or self.lease_ms,
            minute,
            named[4],
            named[5],
            self._first_look_ms,
        ]
        args += fields
        keys = [self.keys.trans_prefix(p) + gid, self._due_keys[p], named[1], named[2], named[3]]
        return keys, args

    async def create_by(
        self, trans: Trans, send: Callable[[list[str], list[Any]], Awaitable[Any]], *,
        due_in_ms: int, owner: str = "", lease_ms: int = 0,
    ) -> Any:
        """Run a create through `send(keys, args)`, which calls create.lua or a
        participant's script that creates the same way with those KEYS and ARGV first,
        and return its reply. A create that met the server's clock outside both minutes
        it named wrote nothing: it is sent again with the estimate corrected, and after
        CREATE_ATTEMPTS such replies StoreUnavailable is raised."""
        for _attempt in range(CREATE_ATTEMPTS):
            keys, args = self.create_call(trans, due_in_ms=due_in_ms, owner=owner,
                                          lease_ms=lease_ms)
            reply = await send(keys, args)
            if not self.created(trans.gid, reply):
                break
        else:
            raise_for_reply(reply[0], trans.gid, "", "create")
        return reply

    def created(self, gid: str, reply: Sequence[Any]) -> bool:
        """Take note of a create's reply (create.lua's, or a participant's script that
        creates the same way): True if the create is to be sent again, because the
        server's clock stood outside both minutes named (nothing was written)."""
        p = partition_of(gid, self.partitions)
        if reply[0] == "OK" and reply[2] == "1":
            # Only a create that registered a bucket vouches for it: a reply to one sent
            # before the labels were forgotten must not cancel the registering again.
            named = self._buckets[p]
            if named is not None:
                at = int(reply[1]) // MINUTE_MS - named[0]
                if at in (0, 1):
                    named[4 + at] = ""
        elif reply[0] == "SKEW":
            self._clock_offset_ms[p] = int(reply[1]) - _now_ms()
            return True
        return False

    @_unavailable_as_503
    async def create(
        self, trans: Trans, *, due_in_ms: int, owner: str = "", lease_ms: int = 0
    ) -> int:
        started = time.perf_counter()
        script = self.scripts["create"]
        reply = await self.create_by(
            trans, lambda keys, args: self._batch.call(script, keys, args),
            due_in_ms=due_in_ms, owner=owner, lease_ms=lease_ms,
        )
        if reply[0] == "EXISTS":
            raise AlreadyExists(trans.gid, *reply[1:4])
        self.observer.script("create", time.perf_counter() - started)
        raise_for_reply(reply[0], trans.gid, reply[1], "create")
        return int(reply[1])

    def transition_call(self, gid: str, change: Transition) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of lua/transition.lua for this change."""
        expected = _expected_text.get(change.expected)
        if expected is None:
            expected = _expected_text[change.expected] = ",".join(
                sorted(s.value for s in change.expected)
            )
        args: list[Any] = [
            gid,
            expected,
            change.owner,
            change.new_status or "",
            len(change.fields),
            len(change.branch_updates),
            "" if change.next_due_ms is None else max(0, change.next_due_ms),
            change.lease,
            change.lease_ms or self.lease_ms,
            self.finished_ttl_s,
        ]
        if change.fields:
            args += flat_pairs(change.fields)
        if change.branch_updates:
            args += branch_update_args(change.branch_updates, change.records)
        return self.keys.trans_keys(gid), args

    @_unavailable_as_503
    async def transition(self, gid: str, change: Transition) -> TransitionResult:
        keys, args = self.transition_call(gid, change)
        # A change by a lease holder is the engine's own; one without is a client's.
        writes = WRITE if change.owner else ACKED
        started = time.perf_counter()
        reply = await self._batch.call(self.scripts["transition"], keys, args, writes=writes)
        self.observer.script("transition", time.perf_counter() - started)
        if reply[0] != "OK":
            wanted = f"move to '{change.new_status.value}'" if change.new_status else "update"
            raise_for_reply(reply[0], gid, reply[1] if len(reply) > 1 else "", wanted)
        return TransitionResult(status_of(reply[1]), int(reply[2]), reply[3] == "1")

    @_unavailable_as_503
    async def load(self, gid: str) -> Trans | None:
        keys = self.keys.trans_keys(gid)[:1]
        started = time.perf_counter()
        record = await self._batch.call(self.scripts["load"], keys, [], writes=READ)
        self.observer.script("load", time.perf_counter() - started)
        if not record:
            return None
        return trans_from_pairs(record)

    async def _due(self, zset: str, limit: int, band: int = 0) -> builtins.list[str]:
        """Members of a partition's due index that look due by this host's clock: of
        unfinished transactions, or with `band` = FINISHED_BAND, the labels of listing
        buckets due for a sweep.

        Only a hint: claim and sweep check each one again by the server's clock, in the
        script. A plain command rather than a script keeps the idle look cheap.
        """
        found = await self.client.zrangebyscore(
            zset, band or "-inf", band + _now_ms(), start=0, num=limit
        )
        return [str(member) for member in found]

    @_unavailable_as_503
    async def due_partitions(self) -> builtins.list[int]:
        """Partitions with due work, all asked in one round (one pipeline per node)."""
        now = _now_ms()
        if not self.cluster:
            # One script call: a pipeline of one command per partition costs the
            # coordinator milliseconds of CPU per look, several looks a second.
            found = await self._batch.call(
                self.scripts["due"], self._due_keys, [now], writes=READ
            )
            return [int(p) for p in found]
        async with self.client.pipeline(transaction=False) as pipe:
            for key in self._due_keys:
                pipe.zrangebyscore(key, "-inf", now, start=0, num=1)
            found = await pipe.execute()
        return [p for p, gids in enumerate(found) if gids]

    @_unavailable_as_503
    async def claim(self, partition: int, limit: int, token_prefix: str) -> list[Claimed]:
        # Two steps so that the claim script names every key it touches: peek at the
        # due entries, then claim them (the script checks each one again).
        members = await self._due(self.keys.due(partition), limit)
        if not members:
            return []
        tp = self.keys.trans_prefix(partition)
        keys = [self.keys.due(partition), *(tp + m[14:] for m in members)]
        started = time.perf_counter()
        reply = await self._batch.call(
            self.scripts["claim"], keys, [token_prefix, self.lease_ms, *members], writes=READ
        )
        self.observer.script("claim", time.perf_counter() - started)
        now = int(reply[0])
        claimed = []
        for _gid, token, record, previous in reply[1:]:
            try:
                trans = trans_from_pairs(record)
            except CorruptRecord as exc:
                # Left to its lease (and reported each time it comes round): one damaged
                # record must not fail the claim of every transaction in its batch.
                log.warning("%s; not driving it", exc)
                continue
            claimed.append(Claimed(trans, token, now, taken_over=bool(previous)))
        return claimed

    @_unavailable_as_503
    async def sweep(self, partition: int) -> int:
        """Walk the partition's listing buckets that are due for a look, for up to
        SWEEP_BUDGET_S: drop the entries of transactions that are gone; returns how many."""
        due = self.keys.due(partition)
        removed = 0
        deadline = time.monotonic() + SWEEP_BUDGET_S
        walked: set[str] = set()
        while time.monotonic() < deadline:
            labels = [label for label in await self._due(due, 8 + len(walked), FINISHED_BAND)
                      if label not in walked]
            if not labels:
                break
            for label in labels:
                walked.add(label)
                try:
                    label_minute(label)
                except ValueError:
                    # Not a bucket's: a due entry an instance of an earlier layout wrote
                    # into the band. Layout 4 keeps none there.
                    log.warning("dropping %r from the sweep's schedule of %s: not a bucket",
                                label, due)
                    await self.client.zrem(due, label)
                    continue
                removed += await self._sweep_bucket(partition, label)
        return removed

    async def _sweep_bucket(self, partition: int, label: str) -> int:
        """One walk of one bucket, a chunk of members per script call (sweep.lua)."""
        bucket = self.keys.bucket(partition, label)
        head = [self.keys.due(partition), self.keys.minutes(partition), bucket]
        prefix = self.keys.trans_prefix(partition)
        minute = label_minute(label)
        removed, mode, lower, latest = 0, "take", "-", ""
        while True:
            members = [str(m) for m in await self.client.zrangebylex(
                bucket, lower, "+", start=0, num=SWEEP_CHUNK)]
            last = "1" if len(members) < SWEEP_CHUNK else ""
            reply = await self._batch.call(
                self.scripts["sweep"], head + [prefix + m[14:] for m in members],
                [label, minute, mode, SWEEP_WALK_MS, SWEEP_RECHECK_MS, last, latest, *members],
                writes=READ)
            if reply[0] != "OK":
                return removed  # not due by the server's clock, or another walk has it
            removed += int(reply[1])
            latest = reply[2]
            if last:
                return removed
            mode, lower = "", "(" + members[-1]

    @_unavailable_as_503
    async def list(self, position: str, limit: int, where: ListFilter) -> Page:
        """Merge the partitions' listing buckets, newest first.

        Members are "<13-digit create ms>:<gid>", unique per transaction, and each is in
        the bucket of its own minute, so the last member returned is an exact cursor: no
        page repeats or skips a transaction that existed for the whole walk.
        """
        # Times past 2286 would need a 14th digit: none is created then.
        to_ms, from_ms = min(where.create_to_ms, 10**13 - 1), min(where.create_from_ms, 10**13 - 1)
        upper = "+"
        if to_ms:
            upper = f"({to_ms:013d}"
        if position and (upper == "+" or position < upper[1:]):
            upper = "(" + position
        lower = f"[{from_ms:013d}" if from_ms else "-"
        # Which minutes' buckets may hold members between the bounds.
        top = "+inf" if upper == "+" else str(member_minute(upper[1:]))
        bottom = str(from_ms // MINUTE_MS) if from_ms else "-inf"
        found: list[Trans] = []
        cursor = ""
        span = 2  # minutes read per round; doubles while rounds come back short
        while len(found) < limit:
            async with self.client.pipeline(transaction=False) as pipe:
                for p in range(self.partitions):
                    pipe.zrevrangebyscore(self.keys.minutes(p), top, bottom, start=0,
                                          num=LIST_MINUTES, withscores=True)
                rows: list[list[tuple[str, float]]] = await pipe.execute()
            minutes = sorted({int(m) for bucket_rows in rows for _, m in bucket_rows},
                             reverse=True)
            if not minutes:
                return Page(found, "")
            # A partition that filled its answer may have older buckets not read yet:
            # this round goes no lower than its oldest one read.
            floor = minutes[min(span, len(minutes)) - 1]
            for bucket_rows in rows:
                if len(bucket_rows) == LIST_MINUTES:
                    floor = max(floor, int(bucket_rows[-1][1]))
            more_below = floor > minutes[-1] or any(len(r) == LIST_MINUTES for r in rows)
            chosen = [(p, str(label)) for p, bucket_rows in enumerate(rows)
                      for label, m in bucket_rows if m >= floor]
            async with self.client.pipeline(transaction=False) as pipe:
                for p, label in chosen:
                    pipe.zrevrangebylex(self.keys.bucket(p, label), upper, lower, 0, limit)
                lists = await pipe.execute()
            merged = sorted(
                ((str(member), p) for (p, _), members in zip(chosen, lists, strict=True)
                 for member in members),
                reverse=True,
            )[:limit]
            if len(merged) == limit:
                # More may wait in these minutes: the next round starts at the last one.
                top = str(member_minute(merged[-1][0]))
            elif more_below:
                top, span = f"({floor}", min(2 * span, LIST_MINUTES)
            if merged:
                async with self.client.pipeline(transaction=False) as pipe:
                    for member, p in merged:
                        pipe.hgetall(self.keys.trans_prefix(p) + member[14:])
                    records = await pipe.execute()
                for (member, _p), rec in zip(merged, records, strict=True):
                    cursor = member
                    if not rec or rec.get("created_member") != member:
                        continue  # expired; the sweep drops the entry
                    if where.status and rec.get("status") != where.status:
                        continue
                    try:
                        # A page shows no branches: the branch fields are left unread.
                        trans = trans_from_hash(split_hash(rec)[0], {}, with_branches=False)
                    except CorruptRecord:
                        continue  # unreadable: `query` shows its raw fields; a page must not fail
                    if where.trans_type and trans.trans_type != where.trans_type:
                        continue
                    found.append(trans)
                    if len(found) == limit:
                        return Page(found, cursor)
                upper = "(" + cursor
            if len(merged) < limit and not more_below:
                return Page(found, "")
        return Page(found, cursor)

    @_unavailable_as_503
    async def register_branches(
        self, gid: str, branches: Sequence[Branch], *, expected: frozenset[Status], unique: bool
    ) -> int:
        keys = self.keys.for_gid(gid)
        reply = await self._batch.call(
            self.scripts["register"],
            [keys.trans],
            [
                gid,
                ",".join(s.value for s in expected),
                branches_json(branches),
                "unique" if unique else "insert",
            ],
        )
        raise_for_reply(reply[0], gid, reply[1] if len(reply) > 1 else "", "register a branch")
        return int(reply[2])

    @_unavailable_as_503
    async def reset_due(self, partition: int, wait_ms: int, limit: int) -> tuple[int, bool]:
        count, remaining = await self._batch.call(
            self.scripts["reset_due"], [self.keys.due(partition)], [max(0, wait_ms), limit],
            writes=READ,
        )
        return int(count), remaining == "1"

    @_unavailable_as_503
    async def change_topic(self, subscribe: bool, topic: str, url: str, remark: str) -> None:
        reply = await self._batch.call(
            self.scripts["topic"],
            [self.keys.kv("topics")],
            ["subscribe" if subscribe else "unsubscribe", topic, url, remark],
        )
        if reply[0] == "EXISTS":
            raise AlreadyExists(topic, f"url {url} is already subscribed")
        if reply[0] == "NOT_FOUND":
            raise NotFound(f"topic {topic!r} has no subscriber {url!r}")

    @_unavailable_as_503
    async def topics(self) -> dict[str, Topic]:
        raw = await self.client.hgetall(self.keys.kv("topics"))
        out: dict[str, Topic] = {}
        for name, value in raw.items():
            rec = orjson.loads(value)
            topic = name.decode() if isinstance(name, bytes) else name
            out[topic] = Topic(topic, orjson.loads(rec["v"]), int(rec["version"]))
        return out

    @_unavailable_as_503
    async def delete_topic(self, topic: str) -> bool:
        return bool(await self.client.hdel(self.keys.kv("topics"), topic))


# The expected-status argument of transition.lua per set of statuses; the engine and
# the API use a handful of sets.
_expected_text: dict[frozenset[Status], str] = {}


def _now_ms() -> int:
    return int(time.time() * 1000)
