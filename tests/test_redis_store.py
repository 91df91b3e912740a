"""RedisStore: the store contract, plus what only a Redis backend promises.

Every test runs twice: against the real Redis (the proof) and against fakeredis with
its Lua support (a quick check that the scripts are plain Redis Lua). fakeredis 2.40
with lupa handles everything the scripts use — TIME inside scripts, cjson, unpack,
HMGET/ZRANGEBYSCORE/ZREVRANGEBYLEX, EXPIRE/PTTL and SCRIPT FLUSH/EXISTS — so no case
is excluded for it. Should a future fakeredis lack something, skip only that case for
the "fakeredis" parameter, with the reason, and never the real run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

import fakeredis
import orjson
import pytest
import redis.asyncio as aioredis
from fakeredis import aioredis as fake_aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from coordinator.errors import (
    AlreadyExists,
    LayoutTooNew,
    NotFound,
    PartitionMismatch,
    TransactionFailure,
)
from coordinator.keys import (
    FINISHED_BAND,
    KeySpace,
    label_minute,
    member_minute,
    minute_label,
    partition_of,
    tag,
)
from coordinator.model import Branch, BranchStatus, Op, Status, record_of
from coordinator.store.base import ListFilter, Transition
from coordinator.store.cluster import parse_seeds
from coordinator.store.codec import options_to_json
from coordinator.store.redis_store import RedisStore
from coordinator.store.scripts import SCRIPT_NAMES, script_text
from tests.cluster_support import RedisClusterProcess
from tests.store_contract import *  # noqa: F403
from tests.store_contract import SUBMITTED, in_partition, list_all, make_trans

PREPARED = frozenset({Status.PREPARED})

PARTITIONS = 4


class RedisStoreFactory(Protocol):
    async def __call__(
        self, *, lease_ms: int = ..., finished_ttl_s: int = ...
    ) -> RedisStore: ...


@pytest.fixture(params=["redis", "batched", "fakeredis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which server: the shared real Redis, a fresh in-process FakeServer per test, or
    the session's real 3-primary/3-replica Redis Cluster (tests/cluster_support.py).
    "batched" is the real Redis with every script call run through the batch script
    (scripts.py), even a call alone in its batch: its replies must be the plain ones."""
    return str(request.param)


@pytest.fixture
async def store_factory(
    request: pytest.FixtureRequest, backend: str
) -> AsyncIterator[RedisStoreFactory]:
    """Started RedisStores sharing one key space (see tests/store_contract.py)."""
    stores: list[RedisStore] = []
    if backend in ("redis", "batched"):
        url: str = request.getfixturevalue("redis_url")
        keys = KeySpace(prefix=request.getfixturevalue("prefix"), partitions=PARTITIONS)
    elif backend == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        keys = KeySpace(prefix="t" + uuid.uuid4().hex[:10], partitions=PARTITIONS)
    else:
        server = fakeredis.FakeServer()
        keys = KeySpace(prefix="fake", partitions=PARTITIONS)

    async def make(*, lease_ms: int = 30_000, finished_ttl_s: int = 86_400) -> RedisStore:
        client: aioredis.Redis
        if backend == "cluster":
            store = RedisStore.from_cluster(
                parse_seeds(cluster.url), keys, lease_ms=lease_ms, finished_ttl_s=finished_ttl_s
            )
            stores.append(store)
            await store.start()
            return store
        if backend in ("redis", "batched"):
            client = aioredis.Redis.from_url(url, decode_responses=True)
        else:
            client = fake_aioredis.FakeRedis(server=server, decode_responses=True)
        store = RedisStore(client, keys, lease_ms=lease_ms, finished_ttl_s=finished_ttl_s)
        store._batch.always_share = backend == "batched"
        stores.append(store)
        await store.start()
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def rstore(store_factory: RedisStoreFactory) -> RedisStore:
    return await store_factory()


async def field(client: aioredis.Redis | RedisCluster, key: str, name: str) -> str:
    """One field of a hash, which must exist (clients decode responses)."""
    value = await client.hget(key, name)
    assert isinstance(value, str), f"{key} has no field {name}"
    return value


# -- key layout --------------------------------------------------------------------------


def bucket_of(store: RedisStore, member: str) -> str:
    """The listing bucket that holds a listing member: its partition's, of its minute."""
    return store.keys.bucket(store.keys.partition(member[14:]),
                             minute_label(member_minute(member)))


async def sweep_now(store: RedisStore, partition: int) -> int:
    """Bring every listing bucket of the partition due for a look, then sweep it."""
    due = store.keys.due(partition)
    labels = await store.client.zrangebyscore(due, FINISHED_BAND, "+inf")
    if labels:
        await store.client.zadd(due, dict.fromkeys(labels, FINISHED_BAND))
    return await store.sweep(partition)


def test_keyspace_layout() -> None:
    ks = KeySpace(prefix="coord", partitions=PARTITIONS)
    keys = ks.for_gid("{2}order-7")
    assert keys.as_list() == ["coord:trans:{p2}:{2}order-7", "coord:due:{p2}"]
    assert ks.bucket(2, "202612011745") == "coord:created:{p2}:202612011745"
    assert ks.minutes(2) == "coord:minutes:{p2}"
    assert tag(2) == "{p2}"
    names = [*keys.as_list(), ks.bucket(2, "202612011745"), ks.minutes(2)]
    assert len({key_slot(k.encode()) for k in names}) == 1
    # An explicit tag beyond the partition count falls back to the hash.
    assert 0 <= partition_of("{9}x", PARTITIONS) < PARTITIONS
    assert partition_of("{9}x", 16) == 9
    # Plain gids spread over the partitions, and always land in the same one.
    spread = {partition_of(f"gid-{i}", PARTITIONS) for i in range(64)}
    assert spread == set(range(PARTITIONS))
    assert partition_of("gid-1", PARTITIONS) == partition_of("gid-1", PARTITIONS)


def test_bucket_labels_name_their_minute_in_utc() -> None:
    minute = 1_796_147_583_485 // 60_000
    assert minute_label(minute) == "202612011753"
    assert label_minute("202612011753") == minute
    assert member_minute("1796147583485:g") == minute
    with pytest.raises(ValueError, match="not a listing bucket label"):
        label_minute("2026112921")


async def test_stored_keys_follow_the_keyspace(rstore: RedisStore) -> None:
    ks = rstore.keys
    gid = "{2}order-7"
    await rstore.create(make_trans(gid), due_in_ms=60_000)
    await rstore.transition(gid, Transition(SUBMITTED, Status.SUCCEED))
    # Besides the deployment's record of its partition count, written at start.
    names = [k async for k in rstore.client.scan_iter(match=f"{ks.prefix}:*")
             if k not in (ks.kv("partitions"), ks.kv("layout"))]
    keys = ks.for_gid(gid)
    member = await field(rstore.client, keys.trans, "created_member")
    label = minute_label(member_minute(member))
    assert sorted(names) == sorted([keys.trans, keys.due, ks.bucket(2, label), ks.minutes(2)])
    assert all(tag(2) in name for name in names)
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert await rstore.client.hget(keys.trans, "gid") == gid
    # The branches' layout is in the spec; a branch gets a field when its status changes.
    spec = orjson.loads(await field(rstore.client, keys.trans, "spec"))
    assert [(b["branch_id"], b["op"]) for b in spec["branches"]][:2] == [
        ("01", "compensate"), ("01", "action")]
    assert not await rstore.client.hexists(keys.trans, "branch:01:action")
    assert await rstore.client.zscore(ks.bucket(2, label), member) == 0
    assert await rstore.client.zscore(ks.minutes(2), label) == member_minute(member)
    # Finished: it left the due index, which holds the bucket's next sweep in its band.
    assert await rstore.client.zscore(keys.due, member) is None
    look = await rstore.client.zscore(keys.due, label)
    assert look is not None
    assert look - FINISHED_BAND > int(member[:13]) + 86_400_000 - 1_000


def test_the_scripts_use_the_finished_band_of_keys_py() -> None:
    for name in ("create", "sweep"):
        assert f"local FINISHED_BAND = {FINISHED_BAND}\n" in script_text(name)


async def test_a_create_takes_the_bucket_of_the_servers_minute(rstore: RedisStore) -> None:
    """The create names two buckets around this host's estimate of the server's time;
    one far off (here, an hour) costs one retry, and the estimate is corrected."""
    c = rstore.client
    p = rstore.keys.partition("skewed")
    rstore._clock_offset_ms[p] -= 3_600_000
    await rstore.create(make_trans("skewed"), due_in_ms=60_000)
    member = await field(c, rstore.keys.for_gid("skewed").trans, "created_member")
    assert await c.zscore(bucket_of(rstore, member), member) == 0
    seconds, _ = await c.time()
    assert abs(member_minute(member) - seconds // 60) <= 1
    assert abs(rstore._clock_offset_ms[p]) < 5_000


# -- upgrade from earlier layouts ------------------------------------------------------------


async def _to_layout_4_hash(store: RedisStore, gid: str) -> None:
    """Rewrites a stored transaction's hash as layouts 2 to 4 kept it: a field per value
    (JSON ones as text) and a whole record per branch, in place of the spec and the
    branches' state records."""
    c: Any = store.client  # decodes responses
    keys = store.keys.for_gid(gid)
    trans = await store.load(gid)
    assert trans is not None
    fields = {
        "trans_type": trans.trans_type, "protocol": trans.protocol,
        "options": options_to_json(trans.options),
        "next_cron_interval": str(trans.next_cron_interval),
        "steps": orjson.dumps(trans.steps).decode(),
        "payloads": orjson.dumps(trans.payloads).decode(),
        "update_time": str(trans.update_time),
    }
    if trans.fingerprint:
        fields["fingerprint"] = trans.fingerprint
    for b in trans.branches:
        record: dict[str, Any] = {"branch_id": b.branch_id, "op": b.op, "url": b.url,
                                  "status": b.status, "seq": b.seq,
                                  "create_time": str(b.create_time),
                                  "update_time": str(b.update_time)}
        if b.finish_time:
            record["finish_time"] = str(b.finish_time)
        fields[f"branch:{b.key}"] = orjson.dumps(record).decode()
    await c.hdel(keys.trans, "spec")
    await c.hset(keys.trans, mapping=fields)


async def _to_layout_3(store: RedisStore, gid: str) -> str:
    """Rewrites a stored transaction as layout 3 kept it: its hash as layout 4's, its
    listing entry in the partition's one listing index, and when finished a due entry in
    the band, scored by when its hash expires; returns its listing member."""
    c: Any = store.client  # decodes responses
    ks = store.keys
    keys, p = ks.for_gid(gid), ks.partition(gid)
    await _to_layout_4_hash(store, gid)
    member = await field(c, keys.trans, "created_member")
    await c.zadd(ks.legacy_created(p), {member: 0})
    for label in await c.zrange(ks.minutes(p), 0, -1):
        await c.delete(ks.bucket(p, label))
        await c.zrem(keys.due, label)
    await c.delete(ks.minutes(p))
    pttl = await c.pttl(keys.trans)
    if pttl > 0:
        seconds, micros = await c.time()
        await c.zadd(keys.due, {member: FINISHED_BAND + seconds * 1000 + micros // 1000 + pttl})
    return member


async def _to_layout_1(store: RedisStore, gid: str) -> dict[str, str]:
    """Rewrites a stored transaction as version 1 kept it: its branch records in a
    second hash, its due entry named by the gid, or when finished an entry in the
    partition's expiry index instead, and its listing entry as layout 3 (see there);
    returns the branch records."""
    c: Any = store.client  # decodes responses
    keys = store.keys.for_gid(gid)
    member = await _to_layout_3(store, gid)
    fields: dict[str, str] = await c.hgetall(keys.trans)
    old = {k[len("branch:"):]: v for k, v in fields.items() if k.startswith("branch:")}
    await c.hdel(keys.trans, *(f"branch:{k}" for k in old))
    await c.hset(keys.trans.replace(":trans:", ":branches:", 1), mapping=old)
    score = await c.zscore(keys.due, member)
    await c.zrem(keys.due, member)
    if score >= FINISHED_BAND:
        expiry = store.keys.legacy_expiry(store.keys.partition(gid))
        await c.zadd(expiry, {member: score - FINISHED_BAND})
    else:
        await c.zadd(keys.due, {gid: score})
    return old


async def _listed(store: RedisStore, member: str) -> bool:
    return await store.client.zscore(bucket_of(store, member), member) == 0


async def test_start_brings_layout_1_data_to_this_layout(
    store_factory: RedisStoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = await store_factory(finished_ttl_s=3_600)
    c, ks = first.client, first.keys
    assert await c.get(ks.kv("layout")) == "5"
    running, finished, orphan = "{1}old-running", "{2}old-finished", "{3}old-orphan"
    await first.create(make_trans(running), due_in_ms=0)
    await first.create(make_trans(finished), due_in_ms=60_000)
    await first.transition(finished, Transition(SUBMITTED, Status.SUCCEED))
    ttl = await c.pttl(ks.for_gid(finished).trans)
    running_member = await field(c, ks.for_gid(running).trans, "created_member")
    running_score = await c.zscore(ks.for_gid(running).due, running_member)
    records = {gid: await _to_layout_1(first, gid) for gid in (running, finished)}
    assert all(records.values())
    # A branch hash whose transaction is gone, and a deployment without the marker.
    await c.hset(f"{ks.prefix}:branches:{tag(3)}:{orphan}", "01:action", "{}")
    await c.delete(ks.kv("layout"))
    before = await first.load(running)
    assert before is not None
    assert before.branches == ()

    with caplog.at_level("INFO", logger="coordinator.store"):
        second = await store_factory(finished_ttl_s=3_600)
    assert "moved the branches of 2 transactions" in caplog.text
    assert "renamed 1 due entries and moved 1 expiry entries" in caplog.text
    assert "moved 2 listing entries" in caplog.text
    assert "dropped 0 due entries" in caplog.text
    assert await c.get(ks.kv("layout")) == "5"
    assert not await c.exists(ks.legacy_expiry(2))
    assert [k async for k in c.scan_iter(match=ks.legacy_branches_pattern())] == []
    for gid, old in records.items():
        fields = await c.hgetall(ks.for_gid(gid).trans)
        assert {k: fields[f"branch:{k}"] for k in old} == old
        member = fields["created_member"]
        assert await _listed(second, member)
        assert not await c.exists(ks.legacy_created(ks.partition(gid)))
        assert await c.zscore(ks.due(ks.partition(gid)), gid) is None
        loaded = await second.load(gid)
        assert loaded is not None
        assert [b.key for b in loaded.branches] == [b.key for b in make_trans(gid).branches]
    assert await c.zscore(ks.due(1), running_member) == running_score
    # The finished one keeps no due entry, and its TTL.
    assert await c.zrangebyscore(ks.due(2), "-inf", f"({FINISHED_BAND}") == []
    assert 0 < ttl - await c.pttl(ks.for_gid(finished).trans) < 5_000
    assert await c.ttl(ks.for_gid(running).trans) == -1
    page = await second.list("", 10, ListFilter())
    assert sorted(t.gid for t in page.transactions) == [running, finished]
    # The moved transaction goes on as before.
    [claimed] = await second.claim(1, 10, "w")
    assert claimed.trans.gid == running
    await second.transition(running, Transition(SUBMITTED, Status.SUCCEED, owner=claimed.token))
    # A later start finds the marker and scans nothing.
    caplog.clear()
    with caplog.at_level("INFO", logger="coordinator.store"):
        await store_factory()
    assert "moved" not in caplog.text


async def test_start_brings_layout_2_due_entries_to_this_layout(
    store_factory: RedisStoreFactory,
) -> None:
    first = await store_factory()
    c, ks = first.client, first.keys
    gid = "{0}layout-2"
    keys = ks.for_gid(gid)
    await first.create(make_trans(gid), due_in_ms=0)
    member = await _to_layout_3(first, gid)
    score = await c.zscore(keys.due, member)
    await c.zrem(keys.due, member)
    await c.zadd(keys.due, {gid: score or 0})
    await c.set(ks.kv("layout"), "2")
    second = await store_factory()
    assert await c.get(ks.kv("layout")) == "5"
    assert await c.zscore(keys.due, member) == score
    assert await c.zscore(keys.due, gid) is None
    assert await _listed(second, member)
    assert [x.trans.gid for x in await second.claim(0, 10, "w")] == [gid]


async def test_start_splits_layout_3_listing_into_buckets(
    store_factory: RedisStoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = await store_factory(finished_ttl_s=3_600)
    c, ks = first.client, first.keys
    gids = [in_partition(first, 1, f"l3-{i}") for i in range(3)]
    for gid in gids:
        await first.create(make_trans(gid), due_in_ms=60_000)
    await first.transition(gids[0], Transition(SUBMITTED, Status.SUCCEED))
    members = [await _to_layout_3(first, gid) for gid in gids]
    # An entry a minute older than the rest, and a band entry whose listing entry the
    # layout-3 sweep had already dropped.
    old = f"{int(members[2][:13]) - 60_000:013d}:{gids[2]}"
    await c.zrem(ks.legacy_created(1), members[2])
    await c.zadd(ks.legacy_created(1), {old: 0})
    await c.hset(ks.for_gid(gids[2]).trans, "created_member", old)
    await c.zadd(ks.due(1), {f"{members[0][:13]}:stray": FINISHED_BAND + 1})
    assert await c.zscore(ks.due(1), members[0]) is not None  # layout 3's band entry
    await c.set(ks.kv("layout"), "3")

    with caplog.at_level("INFO", logger="coordinator.store"):
        second = await store_factory(finished_ttl_s=3_600)
    assert "moved 3 listing entries" in caplog.text
    assert "dropped 1 due entries of finished transactions" in caplog.text
    assert await c.get(ks.kv("layout")) == "5"
    assert not await c.exists(ks.legacy_created(1))
    for member in (members[0], members[1], old):
        assert await _listed(second, member)
    labels = {minute_label(member_minute(m)) for m in (members[0], old)}
    assert set(await c.zrange(ks.minutes(1), 0, -1)) == labels
    # The band holds the buckets' sweeps, not the finished transaction.
    assert set(await c.zrangebyscore(ks.due(1), FINISHED_BAND, "+inf")) == labels
    assert await c.zscore(ks.due(1), members[1]) is not None  # unfinished: still due
    page = await second.list("", 10, ListFilter())
    assert [t.gid for t in page.transactions] == [gids[1], gids[0], gids[2]]
    # The buckets' first looks come after the TTL from their minute's end.
    assert await sweep_now(second, 1) == 0
    assert await second.sweep(1) == 0


async def _move_to_minute(store: RedisStore, gid: str, ms: int) -> str:
    """Gives a stored transaction the listing member of creation time `ms`, in the
    bucket of that minute (registered as a create registers it)."""
    c, ks = store.client, store.keys
    keys, p = ks.for_gid(gid), ks.partition(gid)
    member = await field(c, keys.trans, "created_member")
    new = f"{ms:013d}:{gid}"
    label = minute_label(member_minute(new))
    await c.zrem(bucket_of(store, member), member)
    await c.zadd(ks.bucket(p, label), {new: 0})
    await c.zadd(ks.minutes(p), {label: member_minute(new)})
    await c.hset(keys.trans, mapping={"created_member": new, "create_time": str(ms)})
    return new


async def test_list_merges_buckets_of_many_minutes_and_partitions(rstore: RedisStore) -> None:
    """Transactions spread over 45 minutes, more than a listing round reads of one
    partition's buckets, some minutes shared by partitions, some with several: every
    page size and time window gives exactly the newest-first order."""
    seconds, _ = await rstore.client.time()
    base = (seconds // 60 - 50) * 60_000
    placed: dict[str, int] = {}
    for i in range(40):
        gid = in_partition(rstore, i % PARTITIONS, f"spread-{i:02d}")
        await rstore.create(make_trans(gid), due_in_ms=60_000)
        minute = (i * 7) % 45  # a scattered order of creation minutes
        placed[gid] = base + minute * 60_000 + (i * 997) % 60_000
        await _move_to_minute(rstore, gid, placed[gid])
    newest_first = sorted(placed, key=lambda g: (placed[g], g), reverse=True)
    for limit in (1, 3, 7, 40, 100):
        listed = await list_all(rstore, limit, ListFilter())
        assert [t.gid for t in listed] == newest_first, limit
    start, end = base + 10 * 60_000 + 30_000, base + 31 * 60_000
    window = [g for g in newest_first if start <= placed[g] < end]
    assert window
    listed = await list_all(rstore, 4, ListFilter(create_from_ms=start, create_to_ms=end))
    assert [t.gid for t in listed] == window
    everything = await list_all(rstore, 5, ListFilter(status=Status.SUBMITTED.value))
    assert [t.gid for t in everything] == newest_first


# -- expiry ---------------------------------------------------------------------------------


async def test_finished_keys_share_one_ttl(store_factory: RedisStoreFactory) -> None:
    store = await store_factory(finished_ttl_s=3_600)
    c = store.client
    keys = store.keys.for_gid("ttl-1")
    await store.create(make_trans("ttl-1"), due_in_ms=0)
    await store.transition("ttl-1", Transition(SUBMITTED, Status.ABORTING, next_due_ms=10))
    # Unfinished transactions never expire.
    assert await c.ttl(keys.trans) == -1
    member = await field(c, keys.trans, "created_member")
    assert 0 < (await c.zscore(keys.due, member) or 0) < FINISHED_BAND
    await store.transition("ttl-1", Transition(frozenset({Status.ABORTING}), Status.FAILED))
    trans_ms = await c.pttl(keys.trans)
    assert 3_600_000 - 2_000 < trans_ms <= 3_600_000
    # The owner is emptied, not deleted (it reads as absent); the finishing write leaves
    # the other lease fields and the schedule, which nothing reads any more.
    assert await c.hget(keys.trans, "owner") == ""
    loaded = await store.load("ttl-1")
    assert loaded is not None
    assert (loaded.owner, loaded.next_cron_time) == ("", 0)
    # Nothing is due for it any more; its listing entry waits for its bucket's sweep.
    assert await c.zscore(keys.due, member) is None
    assert await _listed(store, member)
    assert await store.claim(store.keys.partition("ttl-1"), 10, "w") == []
    assert await store.reset_due(store.keys.partition("ttl-1"), 0, 10) == (0, False)
    assert await store.sweep(store.keys.partition("ttl-1")) == 0
    # Looked at before it expired, the bucket is planned for when it will have.
    assert await sweep_now(store, store.keys.partition("ttl-1")) == 0
    assert await _listed(store, member)
    label = minute_label(member_minute(member))
    look = await c.zscore(keys.due, label)
    assert look is not None
    assert abs(look - FINISHED_BAND - (int(member[:13]) + 3_600_000)) < 5_000


async def test_sweep_drops_index_entries(store_factory: RedisStoreFactory) -> None:
    store = await store_factory(finished_ttl_s=1)
    c = store.client
    gid = "{1}sweep-me"
    keys = store.keys.for_gid(gid)
    await store.create(make_trans(gid), due_in_ms=60_000)
    member = await field(c, keys.trans, "created_member")
    await store.transition(gid, Transition(SUBMITTED, Status.SUCCEED))
    await asyncio.sleep(1.2)
    assert not await c.exists(keys.trans)
    assert await _listed(store, member)  # until the sweeper runs
    assert await c.zscore(keys.due, member) is None
    assert await store.claim(1, 10, "w") == []
    # The gid is used again before the sweeper runs: the listing shows it once, and the
    # sweep drops only the old entry.
    await store.create(make_trans(gid), due_in_ms=60_000)
    new_member = await field(c, keys.trans, "created_member")
    assert new_member != member
    page = await store.list("", 10, ListFilter())
    assert [t.gid for t in page.transactions] == [gid]
    assert await store.sweep(1) == 1
    assert await store.sweep(1) == 0
    assert not await _listed(store, member)
    assert await _listed(store, new_member)
    assert await c.zscore(keys.due, new_member) is not None
    page = await store.list("", 10, ListFilter())
    assert [t.gid for t in page.transactions] == [gid]


async def test_sweep_walks_a_large_bucket_in_chunks_and_drops_it_when_empty(
    store_factory: RedisStoreFactory,
) -> None:
    store = await store_factory(finished_ttl_s=1)
    c = store.client
    gids = [in_partition(store, 2, f"bulk-{i:04d}") for i in range(1_203)]
    for i in range(0, len(gids), 200):
        await asyncio.gather(*(store.create(make_trans(g), due_in_ms=60_000)
                               for g in gids[i:i + 200]))
    members = {g: await field(c, store.keys.for_gid(g).trans, "created_member") for g in gids}
    labels = {minute_label(member_minute(m)) for m in members.values()}
    await asyncio.gather(*(store.transition(g, Transition(SUBMITTED, Status.SUCCEED))
                           for g in gids[:-1]))
    await asyncio.sleep(1.1)
    assert await sweep_now(store, 2) == len(gids) - 1
    # The one left is unfinished: its bucket stays, looked at again in a while.
    assert await _listed(store, members[gids[-1]])
    label = minute_label(member_minute(members[gids[-1]]))
    assert await c.zscore(store.keys.minutes(2), label) is not None
    await store.transition(gids[-1], Transition(SUBMITTED, Status.FAILED))
    await asyncio.sleep(1.1)
    for _ in range(3):  # a bucket of the current minute stays registered until it ends
        await sweep_now(store, 2)
    assert not await _listed(store, members[gids[-1]])
    for label in labels:
        assert await c.zcard(store.keys.bucket(2, label)) == 0
        # Registered until two minutes after its own (the test above sees it go).
        assert await c.zscore(store.keys.minutes(2), label) is not None


async def test_an_empty_bucket_leaves_the_index_once_its_minute_is_over(
    store_factory: RedisStoreFactory,
) -> None:
    """Here a bucket four minutes old (its transaction's listing entry is moved there):
    its sweep drops the entry, then the bucket and its registration. (An empty bucket
    stays registered for two minutes after its own, in case the clock steps back.)"""
    store = await store_factory(finished_ttl_s=1)
    c, ks = store.client, store.keys
    gid = "{2}four-minutes-old"
    keys = ks.for_gid(gid)
    await store.create(make_trans(gid), due_in_ms=60_000)
    member = await field(c, keys.trans, "created_member")
    old = f"{int(member[:13]) - 240_000:013d}:{gid}"
    label = minute_label(member_minute(old))
    await c.zrem(bucket_of(store, member), member)
    await c.zadd(ks.bucket(2, label), {old: 0})
    await c.zadd(ks.minutes(2), {label: member_minute(old)})
    await c.zadd(keys.due, {label: FINISHED_BAND + 1})
    await c.zrem(keys.due, member)
    await c.hset(keys.trans, "created_member", old)
    await store.transition(gid, Transition(SUBMITTED, Status.SUCCEED))
    assert await store.sweep(2) == 0  # finished a moment ago: looked at again at its end
    assert await c.zscore(ks.minutes(2), label) is not None
    assert await sweep_now(store, 2) == 0
    await asyncio.sleep(1.1)
    assert await sweep_now(store, 2) == 1
    assert not await c.exists(ks.bucket(2, label))
    assert await c.zscore(ks.minutes(2), label) is None
    assert await c.zscore(keys.due, label) is None


async def test_a_stray_entry_in_the_band_does_not_stop_the_sweep(rstore: RedisStore) -> None:
    """A due entry of layout 3 (an instance of the earlier version left running) in the
    band of the sweep's schedule is dropped with a warning; the buckets are swept."""
    c = rstore.client
    gid = "{1}beside-a-stray"
    await rstore.create(make_trans(gid), due_in_ms=60_000)
    member = await field(c, rstore.keys.for_gid(gid).trans, "created_member")
    stray = f"{member[:13]}:{{1}}from-layout-3"
    await c.zadd(rstore.keys.due(1), {stray: FINISHED_BAND})
    await c.delete(rstore.keys.for_gid(gid).trans)
    assert await sweep_now(rstore, 1) == 1
    assert await c.zscore(rstore.keys.due(1), stray) is None
    assert not await _listed(rstore, member)


async def test_only_a_create_that_registered_vouches_for_its_bucket(rstore: RedisStore) -> None:
    gid = "{2}vouching"
    await rstore.create(make_trans(gid), due_in_ms=60_000)  # registers its bucket
    rstore._listed_until = 0.0  # forget, as every few seconds
    keys, args = rstore.create_call(make_trans("{2}next"), due_in_ms=0)
    assert args[7:9] == [minute_label(args[6]), minute_label(args[6] + 1)]
    # A reply to a create sent before the labels were forgotten registered nothing.
    rstore.created("{2}next", ["OK", str(args[6] * 60_000 + 5), ""])
    assert rstore.create_call(make_trans("{2}next"), due_in_ms=0)[1][7] != ""
    rstore.created("{2}next", ["OK", str(args[6] * 60_000 + 5), "1"])
    assert rstore.create_call(make_trans("{2}next"), due_in_ms=0)[1][7] == ""
    assert keys[2:] == [rstore.keys.bucket(2, minute_label(args[6])),
                        rstore.keys.bucket(2, minute_label(args[6] + 1)),
                        rstore.keys.minutes(2)]


# -- index entries never outlive their transaction -------------------------------------------


async def test_claim_drops_due_entries_of_missing_transactions(rstore: RedisStore) -> None:
    c = rstore.client
    gid = "{3}vanished"
    keys = rstore.keys.for_gid(gid)
    await rstore.create(make_trans(gid), due_in_ms=0)
    member = await field(c, keys.trans, "created_member")
    await rstore.create(make_trans("{3}present"), due_in_ms=0)
    await c.delete(keys.trans)
    claimed = await rstore.claim(3, 10, "w")
    assert [x.trans.gid for x in claimed] == ["{3}present"]
    assert await c.zscore(keys.due, member) is None
    # Its listing entry goes at its bucket's next look.
    assert await _listed(rstore, member)
    assert await sweep_now(rstore, 3) == 1
    assert not await _listed(rstore, member)


async def test_claim_drops_due_entries_of_a_reused_gid(rstore: RedisStore) -> None:
    c = rstore.client
    gid = "{3}reused"
    keys = rstore.keys.for_gid(gid)
    await rstore.create(make_trans(gid), due_in_ms=0)
    old = await field(c, keys.trans, "created_member")
    await c.delete(keys.trans)  # as if expired (an unfinished one never does)
    await asyncio.sleep(0.002)
    await rstore.create(make_trans(gid), due_in_ms=60_000)
    new = await field(c, keys.trans, "created_member")
    assert new != old
    assert await rstore.claim(3, 10, "w") == []
    assert await c.zscore(keys.due, old) is None
    assert await c.zscore(keys.due, new) is not None
    assert await sweep_now(rstore, 3) == 1
    assert not await _listed(rstore, old)
    assert await _listed(rstore, new)


async def test_due_partitions_names_exactly_the_partitions_with_due_work(
    rstore: RedisStore,
) -> None:
    # One script on a single Redis, one pipeline per node on a cluster: same answer.
    assert await rstore.due_partitions() == []
    await rstore.create(make_trans("{3}due-now"), due_in_ms=0)
    await rstore.create(make_trans("{5}due-later"), due_in_ms=60_000)
    await rstore.create(make_trans("{1}due-now-too"), due_in_ms=0)
    assert await rstore.due_partitions() == [1, 3]


async def test_claim_skips_a_live_lease_even_when_its_entry_is_due(rstore: RedisStore) -> None:
    # An entry can be brought forward while a worker holds the lease (resetCronTime
    # does that); claiming must not hand the transaction to a second worker.
    c = rstore.client
    gid = "{0}leased"
    keys = rstore.keys.for_gid(gid)
    await rstore.create(make_trans(gid), due_in_ms=0, owner="w1:1", lease_ms=30_000)
    lease_until = int(await field(c, keys.trans, "lease_until"))
    member = await field(c, keys.trans, "created_member")
    await c.zadd(keys.due, {member: 0})
    assert await rstore.claim(0, 10, "w2") == []
    assert await c.zscore(keys.due, member) == lease_until  # looked at again when it ends
    assert await c.hget(keys.trans, "owner") == "w1:1"


async def test_transition_of_a_missing_transaction_leaves_its_entries_to_the_claim(
    rstore: RedisStore,
) -> None:
    c = rstore.client
    gid = "{1}gone"
    keys = rstore.keys.for_gid(gid)
    await rstore.create(make_trans(gid), due_in_ms=0)
    member = await field(c, keys.trans, "created_member")
    await c.delete(keys.trans)
    with pytest.raises(NotFound):
        await rstore.transition(gid, Transition(SUBMITTED, Status.ABORTING))
    assert await rstore.claim(1, 10, "w") == []
    assert await c.zscore(keys.due, member) is None
    assert await sweep_now(rstore, 1) == 1
    assert not await _listed(rstore, member)


# -- scripts --------------------------------------------------------------------------------


async def test_scripts_are_called_by_sha_and_reload_after_script_flush(
    rstore: RedisStore,
) -> None:
    """The NOSCRIPT path, as redis-py's own tests check it: flush, then call again.

    SCRIPT FLUSH empties the shared server's script cache; other stores reload theirs
    on their next call, so this is harmless to concurrent tests.
    """
    c = rstore.client
    shas = [rstore.scripts[name].sha for name in SCRIPT_NAMES]
    assert await c.script_exists(*shas) == [True] * len(shas)  # start() loaded them
    await rstore.create(make_trans("flush-1"), due_in_ms=0)
    await c.script_flush()
    assert await c.script_exists(rstore.scripts["load"].sha) == [False]
    loaded = await rstore.load("flush-1")
    assert loaded is not None
    assert loaded.gid == "flush-1"
    await rstore.create(make_trans("flush-2"), due_in_ms=0)
    await rstore.transition("flush-2", Transition(SUBMITTED, Status.ABORTING))
    assert [x.trans.gid for x in await rstore.claim(rstore.keys.partition("flush-1"), 10, "w")
            if x.trans.gid == "flush-1"] == ["flush-1"]
    names = ("load", "create", "transition", "claim")
    if rstore.batch_script is not None and rstore._batch.always_share:
        # Every call went through the batch script, which was loaded again.
        assert await c.script_exists(rstore.batch_script.sha) == [True]
    else:
        assert await c.script_exists(*(rstore.scripts[n].sha for n in names)) == [True] * 4


async def test_reschedule_during_a_lease_is_honoured_at_release(rstore: RedisStore) -> None:
    """resetNextCronTime while a worker holds the lease must not be lost at its release."""
    c = rstore.client
    keys = rstore.keys.for_gid("poke-1")
    await rstore.create(make_trans("poke-1"), due_in_ms=0)
    [claimed] = await rstore.claim(rstore.keys.partition("poke-1"), 10, "w")
    # The API asks for an immediate retry while the lease is live: the entry stays put.
    await rstore.transition("poke-1", Transition(SUBMITTED, next_due_ms=0))
    member = await field(c, keys.trans, "created_member")
    lease_end = await c.zscore(keys.due, member)
    assert lease_end is not None
    # The worker releases, planning to come back in an hour; the request wins.
    result = await rstore.transition("poke-1", Transition(
        SUBMITTED, owner=claimed.token, lease="release", next_due_ms=3_600_000))
    due = await c.zscore(keys.due, member)
    assert due is not None
    assert due <= result.now
    assert await c.hget(keys.trans, "poke") in (None, "")
    # Without a request, a release keeps the worker's own schedule.
    [again] = await rstore.claim(rstore.keys.partition("poke-1"), 10, "w2")
    later = await rstore.transition("poke-1", Transition(
        SUBMITTED, owner=again.token, lease="release", next_due_ms=3_600_000))
    due = await c.zscore(keys.due, member)
    assert due is not None
    assert due >= later.now + 3_500_000


async def test_a_damaged_record_does_not_fail_the_claim_of_its_batch(
    rstore: RedisStore,
) -> None:
    p = 3
    good = [in_partition(rstore, p, f"good-{i}") for i in range(2)]
    bad = in_partition(rstore, p, "damaged")
    for gid in [*good, bad]:
        await rstore.create(make_trans(gid), due_in_ms=0)
    await rstore.client.hset(rstore.keys.for_gid(bad).trans, "status", "bogus")
    claimed = await rstore.claim(p, 10, "w1")
    assert sorted(c.trans.gid for c in claimed) == sorted(good)


async def test_a_start_with_another_partition_count_is_refused(
    redis_url: str, prefix: str
) -> None:
    """The count is in every key's name: a restart with another one would look for the
    stored transactions under other keys, so it is refused at start, naming the count."""
    first = RedisStore.from_url(redis_url, KeySpace(prefix, 16))
    await first.start()
    await first.close()
    same = RedisStore.from_url(redis_url, KeySpace(prefix, 16))
    await same.start()  # the recorded count agrees
    await same.close()
    other = RedisStore.from_url(redis_url, KeySpace(prefix, 63))
    with pytest.raises(PartitionMismatch, match=r"redis\.partitions = 16"):
        await other.start()
    await other.close()


# -- layout 5: the spec and the branches' state records ---------------------------------------


async def test_a_branch_of_the_spec_keeps_only_its_state(rstore: RedisStore) -> None:
    """A create stores the branches in the spec; a change stores the branch's state
    under its own field and leaves the rest where it is."""
    gid = "{4}spec-branch"
    c, keys = rstore.client, rstore.keys.for_gid(gid)
    await rstore.create(make_trans(gid), due_in_ms=60_000)
    fields = await c.hgetall(keys.trans)
    assert not [name for name in fields if name.startswith("branch:")]
    assert "update_time" not in fields  # reads as create_time
    loaded = await rstore.load(gid)
    assert loaded is not None
    assert loaded.update_time == loaded.create_time > 0
    assert all(b.in_spec for b in loaded.branches)
    action = loaded.branches[1]
    assert (action.key, action.seq, action.create_time) == ("01:action", 2, loaded.create_time)
    result = await rstore.transition(gid, Transition(
        SUBMITTED, branch_updates={action.key: BranchStatus.SUCCEED},
        records={action.key: action}))
    state = orjson.loads(await field(c, keys.trans, "branch:01:action"))
    now = str(result.now)
    assert state == {"status": "succeed", "update_time": now, "finish_time": now}
    after = await rstore.load(gid)
    assert after is not None
    changed = after.branches[1]
    assert (changed.url, changed.status, changed.seq) == (action.url, BranchStatus.SUCCEED, 2)
    assert (changed.update_time, changed.finish_time) == (result.now, result.now)
    assert after.branches[0] == loaded.branches[0]  # the others are as created


async def test_a_wrong_hint_of_where_a_branch_is_costs_time_not_data(
    rstore: RedisStore,
) -> None:
    """What is stored decides how a branch result is written: a registered branch's
    record of its own keeps its URL whatever the caller's copy says, and a branch of the
    spec gets a state record even when the caller sends a whole record."""
    tcc, saga = "{5}registered", "{5}in-spec"
    c = rstore.client
    await rstore.create(make_trans(tcc, Status.PREPARED, trans_type="tcc"), due_in_ms=60_000)
    registered = [Branch("01", Op.CANCEL, "http://svc/cancel"),
                  Branch("01", Op.CONFIRM, "http://svc/confirm")]
    await rstore.register_branches(tcc, registered, expected=PREPARED, unique=False)
    loaded = await rstore.load(tcc)
    assert loaded is not None
    confirm = loaded.branches[1]
    assert confirm.key == "01:confirm"
    assert not confirm.in_spec
    # Told it is a branch of the spec (no record sent), and with no copy at all.
    wrong = record_of(Branch, {**vars(confirm), "in_spec": True})
    await rstore.transition(tcc, Transition(
        PREPARED, branch_updates={"01:confirm": BranchStatus.SUCCEED},
        records={"01:confirm": wrong}))
    await rstore.transition(tcc, Transition(
        PREPARED, branch_updates={"01:cancel": BranchStatus.FAILED}))
    after = await rstore.load(tcc)
    assert after is not None
    assert [(b.key, b.url, b.status) for b in after.branches] == [
        ("01:cancel", "http://svc/cancel", BranchStatus.FAILED),
        ("01:confirm", "http://svc/confirm", BranchStatus.SUCCEED)]

    await rstore.create(make_trans(saga), due_in_ms=60_000)
    loaded = await rstore.load(saga)
    assert loaded is not None
    action = loaded.branches[1]
    whole = record_of(Branch, {**vars(action), "in_spec": False})
    result = await rstore.transition(saga, Transition(
        SUBMITTED, branch_updates={action.key: BranchStatus.SUCCEED}, records={action.key: whole}))
    state = orjson.loads(await field(c, rstore.keys.for_gid(saga).trans, "branch:01:action"))
    assert state == {"status": "succeed", "update_time": str(result.now),
                     "finish_time": str(result.now)}


async def test_a_layout_4_record_is_read_and_driven_as_it_is(rstore: RedisStore) -> None:
    """No data moves from layout 4 to 5: a transaction stored a field per value, with a
    whole record per branch, is claimed, changed, finished, listed and swept as before."""
    gid = "{6}stored-by-layout-4"
    c, keys = rstore.client, rstore.keys.for_gid(gid)
    await rstore.create(make_trans(gid), due_in_ms=0)
    created = await rstore.load(gid)
    assert created is not None
    await _to_layout_4_hash(rstore, gid)
    assert not await c.hexists(keys.trans, "spec")
    [item] = await rstore.claim(rstore.keys.partition(gid), 10, "w")
    assert item.trans == replace(created, owner=item.token)
    assert not any(b.in_spec for b in item.trans.branches)
    action = item.trans.branches[1]
    await rstore.transition(gid, Transition(
        SUBMITTED, Status.SUCCEED, owner=item.token, lease="release",
        branch_updates={action.key: BranchStatus.SUCCEED}, records={action.key: action}))
    record = orjson.loads(await field(c, keys.trans, "branch:01:action"))
    assert (record["url"], record["status"], record["seq"]) == (action.url, "succeed", 2)
    done = await rstore.load(gid)
    assert done is not None
    assert (done.status, done.steps, done.branches[1].status) == (
        Status.SUCCEED, created.steps, BranchStatus.SUCCEED)
    assert gid in [t.gid for t in await list_all(rstore, 10, ListFilter(trans_type="saga"))]


async def test_a_start_on_a_newer_layout_is_refused(redis_url: str, prefix: str) -> None:
    """Data of a later version's layout would be misread; the start stops, naming it,
    and leaves the marker as it found it."""
    first = RedisStore.from_url(redis_url, KeySpace(prefix, 16))
    await first.start()
    marker = first.keys.kv("layout")
    await first.client.set(marker, "6")
    await first.close()
    later = RedisStore.from_url(redis_url, KeySpace(prefix, 16))
    with pytest.raises(LayoutTooNew, match=r"key layout '6'"):
        await later.start()
    assert await later.client.get(marker) == "6"
    await later.close()


async def test_registering_counts_the_branches_of_the_spec(rstore: RedisStore) -> None:
    """A spec branch has no field until it changes: a registration still finds it there
    (a workflow step already recorded is refused, a retried one is left alone) and
    numbers the new ones after it."""
    gid = "{7}msg-then-register"
    await rstore.create(make_trans(gid, Status.PREPARED), due_in_ms=60_000)
    with pytest.raises(TransactionFailure, match=r"01:action of .* is already recorded"):
        await rstore.register_branches(
            gid, [Branch("01", Op.ACTION, "", BranchStatus.SUCCEED)], expected=PREPARED,
            unique=True)
    added = await rstore.register_branches(
        gid, [Branch("01", Op.ACTION, ""), Branch("09", Op.CANCEL, "http://svc/c9")],
        expected=PREPARED, unique=False)
    assert added == 1
    loaded = await rstore.load(gid)
    assert loaded is not None
    assert [(b.key, b.url, b.seq) for b in loaded.branches] == [
        ("01:compensate", "http://svc/c0", 1), ("01:action", "http://svc/a0", 2),
        ("02:compensate", "http://svc/c1", 3), ("02:action", "http://svc/a1", 4),
        ("09:cancel", "http://svc/c9", 5)]


async def test_a_create_of_a_taken_gid_names_what_is_stored(rstore: RedisStore) -> None:
    """The EXISTS answer carries the stored fingerprint and type: from the spec, from
    their own fields in a layout-4 record, and nothing from a spec damaged by hand."""
    c = rstore.client
    spec_gid, old_gid, bad_gid = "{8}in-spec", "{8}layout-4", "{8}damaged-spec"
    for g in (spec_gid, old_gid, bad_gid):
        await rstore.create(make_trans(g, fingerprint=f"fp-{g}"), due_in_ms=60_000)
    await _to_layout_4_hash(rstore, old_gid)
    await c.hset(rstore.keys.for_gid(bad_gid).trans, "spec", "{not json")
    for g, fingerprint, trans_type in ((spec_gid, f"fp-{spec_gid}", "saga"),
                                       (old_gid, f"fp-{old_gid}", "saga"), (bad_gid, "", "")):
        with pytest.raises(AlreadyExists) as caught:
            await rstore.create(make_trans(g), due_in_ms=0)
        assert (caught.value.status, caught.value.fingerprint, caught.value.trans_type) == (
            "submitted", fingerprint, trans_type)
