"""Redis Cluster: the promises of the README's cluster section, on a real cluster.

The cheap checks share the session's cluster (tests/cluster_support.py); the ones that
kill a node or move a slot start a cluster of their own and throw it away. Every load
loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from redis.crc import key_slot

from coordinator.errors import StoreUnavailable
from coordinator.keys import FINISHED_BAND, KeySpace
from coordinator.model import Status
from coordinator.settings import RedisSettings, Settings, SettingsError
from coordinator.store.base import Transition
from coordinator.store.cluster import describe, first_url, parse_seeds
from coordinator.store.connect import open_store, use_cluster
from coordinator.store.redis_store import RedisStore
from tests.cluster_support import RedisClusterProcess, free_cluster_ports
from tests.conftest import start_cluster
from tests.store_contract import make_trans
from tests.support import CoordinatorProcess, Participant, StoreProbe, submit_all

DEFAULT_PARTITIONS = RedisSettings().partitions


def new_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


async def keys_per_primary(cluster: RedisClusterProcess, pattern: str) -> dict[int, int]:
    """How many keys matching `pattern` each live primary holds (SCAN on each)."""
    out = {}
    for port in cluster.primary_ports():
        with cluster.client(port) as c:
            out[port] = sum(1 for _ in c.scan_iter(match=pattern, count=1000))
    return out


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_cluster(
        parse_seeds(redis_cluster.url), KeySpace(new_prefix(), DEFAULT_PARTITIONS)
    )
    await store.start()
    yield store
    await store.close()


# -- layout ---------------------------------------------------------------------------


async def test_default_partitions_spread_over_every_primary(
    redis_cluster: RedisClusterProcess, cluster_store: RedisStore
) -> None:
    # The start-up log line says how partitions land on the primaries.
    line = await describe(cluster_store.client, cluster_store.keys)  # type: ignore[arg-type]
    assert line.startswith("Redis Cluster, 3 primaries")
    counts = sorted(int(part.split(" slots, ")[1].split()[0]) for part in line.split("; "))
    assert counts == [20, 20, 23], line
    # A due transaction in every partition: every primary holds due-index keys, as many
    # as it owns partitions.
    keys = cluster_store.keys
    await asyncio.gather(*(
        cluster_store.create(make_trans(f"{{{p}}}spread"), due_in_ms=600_000)
        for p in range(DEFAULT_PARTITIONS)
    ))
    due = await keys_per_primary(redis_cluster, f"{keys.prefix}:due:*")
    assert sorted(due.values()) == [20, 20, 23], due


async def test_two_thousand_sagas_leave_transactions_on_every_primary(
    redis_cluster: RedisClusterProcess, session: aiohttp.ClientSession
) -> None:
    proc = await CoordinatorProcess(redis_cluster.url, new_prefix(), log_level="INFO").start()
    try:
        # One seed was enough: `serve` found the cluster and logged its topology.
        log = proc.log_tail(200)
        assert "Redis Cluster, 3 primaries: " in log, log
        assert log.count(" partitions, replicas 127.0.0.1:") == 3, log
        gids = [f"spread-{i}-{uuid.uuid4().hex[:6]}" for i in range(2000)]
        bodies = [
            {"gid": g, "trans_type": "saga", "steps": [{"action": "", "compensate": ""}],
             "payloads": [""]}
            for g in gids
        ]
        started = time.monotonic()
        await asyncio.wait_for(submit_all(session, proc.api, bodies, parallel=32), 120)
        elapsed = time.monotonic() - started
        probe = StoreProbe(redis_cluster.url, proc.prefix, cluster=True)
        try:
            final = await probe.wait_final(gids, 60)
        finally:
            await probe.close()
        assert Counter(final.values()) == {"succeed": 2000}
        held = await keys_per_primary(redis_cluster, f"{proc.prefix}:trans:*")
        print(f"\n2,000 sagas in {elapsed:.1f} s; transactions per primary: {held}")
        assert sum(held.values()) == 2000
        # 20/20/23 partitions: each primary holds close to its share.
        assert all(n > 2000 * 15 / 63 for n in held.values()), held
        async with session.get(f"{proc.base}/api/health") as r:
            health = await r.json()
        assert r.status == 200, health
        assert health["mode"] == "cluster", health
        assert len(health["nodes"]) == 6, health
        assert all(n["ok"] for n in health["nodes"]), health
        assert Counter(n["role"] for n in health["nodes"]) == {"primary": 3, "replica": 3}
    finally:
        proc.stop()


# -- durability -----------------------------------------------------------------------


async def test_wait_replicas_acknowledges_only_what_replicas_have(
    redis_cluster: RedisClusterProcess,
) -> None:
    keys = KeySpace(new_prefix(), DEFAULT_PARTITIONS)
    one = RedisStore.from_cluster(parse_seeds(redis_cluster.url), keys, wait_replicas=1)
    # Each primary has one replica: asking for two can never be confirmed.
    two = RedisStore.from_cluster(
        parse_seeds(redis_cluster.url), keys, wait_replicas=2, wait_timeout_ms=100
    )
    await one.start()
    await two.start()
    try:
        await one.create(make_trans("{5}w1"), due_in_ms=600_000)
        # The replica of slot's primary has it the moment the create is answered.
        slot_port = redis_cluster.port_of_slot(
            one.client.keyslot(keys.for_gid("{5}w1").trans)  # type: ignore[union-attr]
        )
        replica = next(
            int(n["addr"].rsplit(":", 1)[1]) for n in redis_cluster.nodes()
            if "slave" in n["flags"] and n["master"] == _node_id(redis_cluster, slot_port)
        )
        with redis_cluster.client(replica) as c:
            c.execute_command("READONLY")
            assert c.hget(keys.for_gid("{5}w1").trans, "status") == "submitted"
        with pytest.raises(StoreUnavailable):
            await two.create(make_trans("{6}w2"), due_in_ms=600_000)
        # A client's transition is refused too; the engine's own (by a lease holder)
        # goes on, since refusing it would leave the transaction stuck.
        with pytest.raises(StoreUnavailable):
            await two.transition("{5}w1", Transition(frozenset({Status.SUBMITTED}),
                                                     next_due_ms=600_000))
        await one.reset_due(5, 0, 100)
        [claimed] = [c for c in await one.claim(5, 10, "w") if c.trans.gid == "{5}w1"]
        result = await two.transition("{5}w1", Transition(
            frozenset({Status.SUBMITTED}), Status.SUCCEED, owner=claimed.token))
        assert result.status is Status.SUCCEED
        assert two._batch.unreplicated >= 1
    finally:
        await one.close()
        await two.close()


def _node_id(cluster: RedisClusterProcess, port: int) -> str:
    return next(n["id"] for n in cluster.nodes() if n["addr"].endswith(f":{port}"))


# -- failover under load --------------------------------------------------------------


@dataclass
class LoadResult:
    acked: list[str] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    acked_at: list[float] = field(default_factory=list)  # monotonic time of each ack


async def saga_load(
    session: aiohttp.ClientSession, api: str, participant: Participant, stop: asyncio.Event,
    *, workers: int = 12, most: int = 6000, pause: float = 0.02,
) -> LoadResult:
    """Submit two-step sagas until `stop` (or `most`), each worker pausing `pause` s
    between submits; record which were acknowledged, and when."""
    result = LoadResult()
    counter = iter(range(most))

    async def worker() -> None:
        for i in counter:
            if stop.is_set():
                return
            gid = f"fo-{i}-{uuid.uuid4().hex[:6]}"
            body = {"gid": gid, "trans_type": "saga",
                    "steps": [{"action": participant.url("a1"), "compensate": ""},
                              {"action": participant.url("a2"), "compensate": ""}],
                    "payloads": ["{}", "{}"]}
            try:
                async with session.post(f"{api}/submit", json=body,
                                        timeout=aiohttp.ClientTimeout(total=20)) as r:
                    await r.read()
                    if r.status == 200:
                        result.acked.append(gid)
                        result.acked_at.append(time.monotonic())
                    else:
                        result.refused[r.status] += 1
                        await asyncio.sleep(0.05)
            except (aiohttp.ClientError, TimeoutError):
                result.errors += 1
            await asyncio.sleep(pause)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return result


async def failover_run(wait_replicas: int, session: aiohttp.ClientSession) -> dict[str, int]:
    """SIGKILL a primary (the seed node) while sagas run; count what became of them."""
    cluster = await asyncio.to_thread(start_cluster)
    participant = await Participant().start()
    proc = CoordinatorProcess(
        cluster.url, new_prefix(), COORDINATOR_REDIS_WAIT_REPLICAS=wait_replicas,
        COORDINATOR_ENGINE_LEASE_SECONDS=5,
    )
    try:
        await proc.start()
        stop = asyncio.Event()
        load = asyncio.create_task(saga_load(session, proc.api, participant, stop))
        await asyncio.sleep(2.0)
        victim = cluster.ports[0]
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.to_thread(cluster.wait_ok, 30)
        failover_s = time.monotonic() - killed_at
        await asyncio.sleep(4.0)  # load goes on against the new primary
        stop.set()
        result = await asyncio.wait_for(load, 60)
        probe = StoreProbe(f"redis://127.0.0.1:{cluster.ports[1]}/0", proc.prefix,
                           cluster=True)
        try:
            statuses = await probe.statuses(result.acked)
            lost = [g for g, s in statuses.items() if not s]
            present = [g for g in result.acked if g not in set(lost)]
            final = await probe.wait_final(present, 60)
        finally:
            await probe.close()
        counts = {
            "acknowledged": len(result.acked),
            "acknowledged_after_kill": sum(1 for t in result.acked_at if t > killed_at),
            "lost": len(lost),
            "final": sum(1 for s in final.values() if s in ("succeed", "failed")),
            "refused_503": result.refused.get(503, 0),
            "refused_other": sum(n for s, n in result.refused.items() if s != 503),
            "transport_errors": result.errors,
            "failover_ms": int(failover_s * 1000),
        }
        print(f"\nfailover with wait_replicas={wait_replicas}: {counts}")
        assert proc.proc is not None
        assert proc.proc.poll() is None, proc.log_tail()
        return counts
    finally:
        proc.stop()
        await participant.stop()
        await asyncio.to_thread(cluster.stop)


async def test_failover_under_load_with_wait_replicas_loses_nothing_acknowledged(
    session: aiohttp.ClientSession,
) -> None:
    counts = await failover_run(1, session)
    assert counts["acknowledged_after_kill"] > 10, counts
    assert counts["lost"] == 0, counts
    assert counts["final"] == counts["acknowledged"], counts
    # Retried through the failover: no 500. The promoted replica has none of its own,
    # so its partitions' submits answer 503 (never acknowledged, so never lost).
    assert counts["refused_other"] == 0, counts
    assert counts["refused_503"] > 0, counts


async def test_failover_under_load_without_wait_replicas(
    session: aiohttp.ClientSession,
) -> None:
    """Without WAIT an acknowledged submit may die with its primary: report how many.
    Whatever survived must still end final."""
    counts = await failover_run(0, session)
    assert counts["acknowledged_after_kill"] > 10, counts
    assert counts["final"] == counts["acknowledged"] - counts["lost"], counts
    assert counts["refused_other"] == 0, counts


# -- resharding under load ----------------------------------------------------------------


def migrate_slot(cluster: RedisClusterProcess, slot: int, dst: int, pause: float) -> int:
    """Move one slot to primary `dst` the way redis-cli --cluster reshard does, a few
    keys at a time (with `pause` s between batches, so load meets the migration)."""
    src = cluster.port_of_slot(slot)
    src_id, dst_id = _node_id(cluster, src), _node_id(cluster, dst)
    moved = 0
    with cluster.client(src) as s, cluster.client(dst) as d:
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        for _ in range(10_000):
            keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 20)
            if not keys:
                break
            s.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause)
        for port in cluster.primary_ports():
            with cluster.client(port) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    return moved


async def test_resharding_a_busy_partition_under_load_loses_nothing(
    session: aiohttp.ClientSession,
) -> None:
    cluster = await asyncio.to_thread(start_cluster)
    participant = await Participant(delay=0.02).start()
    proc = CoordinatorProcess(cluster.url, new_prefix(), COORDINATOR_ENGINE_LEASE_SECONDS=5)
    try:
        await proc.start()
        slot = key_slot(b"{p0}")
        src = cluster.port_of_slot(slot)
        dst = next(p for p in cluster.primary_ports() if p != src)
        # Every saga in partition 0 (an explicit {0} in the gid): the busiest partition.
        bodies = [
            {"gid": f"{{0}}rs-{i}-{uuid.uuid4().hex[:6]}", "trans_type": "saga",
             "steps": [{"action": participant.url("a1"), "compensate": ""},
                       {"action": participant.url("a2"), "compensate": ""}],
             "payloads": ["{}", "{}"]}
            for i in range(400)
        ]
        # A head start, so the slot holds transactions of every stage when it moves.
        await submit_all(session, proc.api, bodies[:150], parallel=16)
        load = asyncio.create_task(submit_all(session, proc.api, bodies[150:], parallel=8))
        began = time.monotonic()
        moved = await asyncio.to_thread(migrate_slot, cluster, slot, dst, 0.1)
        ended = time.monotonic()
        # Branch calls went on while the slot moved: the move met real load.
        during = sum(1 for c in participant.calls if began <= c.started <= ended)
        await asyncio.wait_for(load, 120)  # every submit answered 200, during the move too
        gids = [b["gid"] for b in bodies]
        probe = StoreProbe(cluster.url, proc.prefix, cluster=True)
        try:
            final = await probe.wait_final(gids, 60)
        finally:
            await probe.close()
        print(f"\nresharding: {moved} keys moved in {ended - began:.1f} s, {during} branch "
              f"calls meanwhile; {Counter(final.values())}")
        assert during > 5
        assert Counter(final.values()) == {"succeed": len(gids)}
        with cluster.client(src) as s, cluster.client(dst) as d:
            assert s.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            assert d.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0
        assert moved > 0
        # Nothing unfinished left in the partition's due index: no transaction is stuck.
        with cluster.client(dst) as d:
            assert d.zcount(f"{proc.prefix}:due:{{p0}}", "-inf", f"({FINISHED_BAND}") == 0
    finally:
        proc.stop()
        await participant.stop()
        await asyncio.to_thread(cluster.stop)


# -- start-up: detection and seeds ---------------------------------------------------------


def test_seeds_from_url_and_cluster_nodes() -> None:
    assert parse_seeds("redis://127.0.0.1:7000/0") == [("127.0.0.1", 7000)]
    assert parse_seeds("redis://:pw@h1:7000,h2:7001/0", "h3:7002, h4") == [
        ("h1", 7000), ("h2", 7001), ("h3", 7002), ("h4", 6379)
    ]
    assert first_url("redis://:pw@h1:7000,h2:7001/0") == "redis://:pw@h1:7000/0"


async def test_cluster_mode_is_detected_or_forced(
    redis_cluster: RedisClusterProcess, redis_url: str
) -> None:
    auto = RedisSettings()
    assert await use_cluster(redis_cluster.url, auto)
    assert not await use_cluster(redis_url, auto)
    assert not await use_cluster(redis_cluster.url, RedisSettings(cluster="false"))
    assert await use_cluster(redis_url, RedisSettings(cluster="true"))
    # Every node listed in the URL (the first one down would not matter), or as
    # cluster_nodes: the store finds the cluster and works on it.
    dead = free_cluster_ports(1)[0]
    for url, nodes in [
        (f"redis://127.0.0.1:{dead}," + redis_cluster.seeds_url.split("//", 1)[1], ""),
        ("", f"127.0.0.1:{dead},127.0.0.1:{redis_cluster.ports[3]}"),
    ]:
        store = await open_store(url, RedisSettings(cluster_nodes=nodes),
                                 KeySpace(new_prefix(), 8))
        await store.start()
        try:
            assert store.cluster
            await store.create(make_trans("{3}seeded"), due_in_ms=0)
            assert [c.trans.gid for c in await store.claim(3, 10, "w")] == ["{3}seeded"]
        finally:
            await store.close()


def test_cluster_settings_are_checked() -> None:
    env = {"COORDINATOR_REDIS_WAIT_REPLICAS": "1", "COORDINATOR_REDIS_CLUSTER": "true",
           "COORDINATOR_REDIS_CLUSTER_NODES": "h1:7000,h2:7000"}
    s = Settings.load(env=env)
    assert (s.redis.wait_replicas, s.redis.cluster, s.redis.cluster_nodes) == (
        1, "true", "h1:7000,h2:7000"
    )
    with pytest.raises(SettingsError, match=r"redis\.cluster"):
        Settings.load(env={"COORDINATOR_REDIS_CLUSTER": "maybe"})
    with pytest.raises(SettingsError, match=r"redis\.wait_replicas"):
        Settings.load(env={"COORDINATOR_REDIS_WAIT_REPLICAS": "-1"})


async def test_health_on_one_redis(
    coordinator: CoordinatorProcess, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{coordinator.base}/api/health") as r:
        body = await r.json()
    assert r.status == 200
    address = coordinator.redis_url.split("//", 1)[1].split("/", 1)[0]
    assert body == {"mode": "single", "ok": True,
                    "nodes": [{"node": address, "role": "primary", "ok": True}]}


async def test_an_outage_that_lasts_is_store_unavailable_after_the_retries() -> None:
    """A primary without a replica dies: its slots stay down, so after retrying for
    `retry_for` seconds the call gives up with StoreUnavailable (HTTP 503)."""
    cluster = await asyncio.to_thread(
        lambda: RedisClusterProcess(replicas_per_primary=0).start()
    )
    store = RedisStore.from_cluster(parse_seeds(cluster.url), KeySpace(new_prefix(), 8),
                                    retry_for=1.5)
    try:
        await store.start()
        gid = "{2}outage"
        victim = cluster.port_of_slot(key_slot(b"{p2}"))
        await store.create(make_trans(gid), due_in_ms=600_000)
        await asyncio.to_thread(cluster.kill, victim)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"did not answer for 1\.5 s"):
            await store.transition(gid, Transition(frozenset({Status.SUBMITTED}),
                                                   next_due_ms=0))
        assert time.monotonic() - started >= 1.4  # retried first, for retry_for
    finally:
        await store.close()
        await asyncio.to_thread(cluster.stop)
