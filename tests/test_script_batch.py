"""The batch script: the script calls of one batch as one EVALSHA (store/scripts.py).

Command counts come from INFO commandstats, so these tests use a redis-server of their
own (the shared one serves other tests at the same time); the cluster test uses the
session's cluster, which only this process uses.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.redis_server import RedisServer
from coordinator.keys import FINISHED_BAND, KeySpace
from coordinator.model import Status
from coordinator.store.base import Transition
from coordinator.store.cluster import parse_seeds
from coordinator.store.redis_store import RedisStore
from coordinator.store.scripts import SCRIPT_NAMES, batch_script_text
from tests.cluster_support import RedisClusterProcess
from tests.conftest import private_redis_server
from tests.store_contract import SUBMITTED, in_partition, make_trans

CALLS = 64


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with private_redis_server() as server:
        yield server


@pytest.fixture
async def stores(own_redis: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """The same key space through the batch script and without it."""
    keys = KeySpace("t" + uuid.uuid4().hex[:10], 4)
    shared = RedisStore.from_url(own_redis.url, keys)
    plain = RedisStore.from_url(own_redis.url, keys, batch_scripts=False)
    await shared.start()
    await plain.start()
    yield shared, plain
    await shared.close()
    await plain.close()


async def command_calls(client: Any, *names: str) -> dict[str, int]:
    """Calls of each command since the last CONFIG RESETSTAT (0 if none)."""
    stats = await client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}


async def create_all(store: RedisStore, gids: list[str]) -> None:
    await asyncio.gather(*(store.create(make_trans(gid), due_in_ms=60_000) for gid in gids))


async def test_concurrent_transitions_share_one_evalsha_and_one_time(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    shared, plain = stores
    for store, name in ((shared, "shared"), (plain, "plain")):
        gids = [f"{name}-{i}" for i in range(CALLS)]
        await create_all(store, gids)
        await store.client.config_resetstat()
        results = await asyncio.gather(*(
            store.transition(gid, Transition(SUBMITTED, Status.ABORTING)) for gid in gids
        ))
        assert [r.status for r in results] == [Status.ABORTING] * CALLS
        calls = await command_calls(store.client, "evalsha", "time")
        if store is shared:
            assert calls["evalsha"] <= 4  # at most one per batch in flight
            assert calls["time"] == calls["evalsha"]
        else:
            assert calls == {"evalsha": CALLS, "time": CALLS}
    assert shared._batch.shared >= CALLS
    assert plain._batch.shared == 0


async def test_a_failing_call_fails_only_its_own_future(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """A script error (here: ARGV without the expected statuses) is that call's own."""
    shared, plain = stores
    for store, name in ((shared, "shared"), (plain, "plain")):
        gids = [f"{name}-{i}" for i in range(8)]
        await create_all(store, gids)
        keys, _ = store.transition_call(gids[0], Transition(SUBMITTED, Status.ABORTING))
        wrong_type = f"{store.keys.prefix}:a-string"
        await store.client.set(wrong_type, "x")
        await store.client.config_resetstat()
        replies = await asyncio.gather(
            *(store.transition(gid, Transition(SUBMITTED, Status.ABORTING)) for gid in gids[1:]),
            store._batch.call(store.scripts["transition"], keys, [gids[0]]),
            store._batch.call(store.scripts["load"], [wrong_type, wrong_type], []),
            return_exceptions=True,
        )
        *good, malformed, wrong = replies
        assert [getattr(r, "status", r) for r in good] == [Status.ABORTING] * 7
        assert isinstance(malformed, ResponseError)
        # Whatever the script trips over first on the missing arguments.
        assert any(
            word in str(malformed) for word in ("status_in", "gmatch", "decode", "arithmetic")
        )
        assert isinstance(wrong, ResponseError)
        assert "WRONGTYPE" in str(wrong)
        calls = await command_calls(store.client, "evalsha")
        assert calls["evalsha"] == (1 if store is shared else 9)
        # The failed call changed nothing.
        loaded = await store.load(gids[0])
        assert loaded is not None
        assert loaded.status == Status.SUBMITTED


async def test_replies_are_those_of_the_plain_scripts(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """The same calls, through the batch script and alone, answer the same (apart from
    the time they ran at)."""
    shared, plain = stores
    shared._batch.always_share = True
    out: dict[str, list[Any]] = {}
    for store, name in ((shared, "s"), (plain, "p")):
        gids = [in_partition(store, 1, f"{name}-{i}") for i in range(3)]
        await store.create(make_trans(gids[0]), due_in_ms=0)
        calls = [
            (store.scripts["create"], *store.create_call(make_trans(gids[0]), due_in_ms=0)),
            (store.scripts["transition"], *store.transition_call(
                gids[1], Transition(SUBMITTED, Status.ABORTING))),
            (store.scripts["transition"], *store.transition_call(
                gids[0], Transition(frozenset({Status.ABORTING}), Status.FAILED))),
            (store.scripts["transition"], *store.transition_call(
                gids[0], Transition(SUBMITTED, owner="nobody"))),
            (store.scripts["load"], store.keys.for_gid(gids[2]).as_list()[:2], []),
            (store.scripts["load"], store.keys.for_gid(gids[0]).as_list()[:2], []),
            (store.scripts["reset_due"], [store.keys.due(3)], [0, 10]),
        ]
        replies = await asyncio.gather(
            *(store._batch.call(script, keys, args) for script, keys, args in calls)
        )
        out[name] = [_without_gids_and_times(r, name) for r in replies]
    assert out["s"] == out["p"]


def _without_gids_and_times(reply: Any, name: str) -> Any:
    if isinstance(reply, list):
        return [_without_gids_and_times(r, name) for r in reply]
    if isinstance(reply, str):
        return re.sub(r"\d{13}", "<ms>", reply.replace(f"}}{name}-", "}x-"))
    return reply


async def test_noscript_after_script_flush_loads_the_batch_script_again(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    shared, _ = stores
    assert shared.batch_script is not None
    gids = [f"flush-{i}" for i in range(16)]
    await create_all(shared, gids)
    await shared.client.script_flush()
    results = await asyncio.gather(*(
        shared.transition(gid, Transition(SUBMITTED, Status.ABORTING)) for gid in gids[:8]
    ))
    assert [r.status for r in results] == [Status.ABORTING] * 8
    for _ in range(50):
        if await shared.client.script_exists(shared.batch_script.sha) == [True]:
            break
        await asyncio.sleep(0.02)
    assert await shared.client.script_exists(shared.batch_script.sha) == [True]
    await shared.client.config_resetstat()
    results = await asyncio.gather(*(
        shared.transition(gid, Transition(SUBMITTED, Status.ABORTING)) for gid in gids[8:]
    ))
    assert [r.status for r in results] == [Status.ABORTING] * 8
    assert (await command_calls(shared.client, "evalsha"))["evalsha"] == 1


async def test_the_batch_script_compiles_with_every_script_wrapped(
    own_redis: RedisServer,
) -> None:
    """Lua limits (locals per function, upvalues) hold with all scripts wrapped, and
    the batch script's own redis table still offers the rest of redis.*."""
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        await client.script_load(batch_script_text(SCRIPT_NAMES))
    finally:
        await client.aclose()


async def test_cluster_combines_only_calls_of_one_slot(
    redis_cluster: RedisClusterProcess,
) -> None:
    partitions = 63
    store = RedisStore.from_cluster(
        parse_seeds(redis_cluster.url), KeySpace("t" + uuid.uuid4().hex[:10], partitions)
    )
    await store.start()
    try:
        client = store.client
        assert isinstance(client, aioredis.RedisCluster)
        # Two partitions (two slots) on one primary, so that only the slot can part them.
        by_node: dict[str, list[int]] = {}
        nodes = {}
        for p in range(partitions):
            owner = client.get_node_from_key(store.keys.due(p))
            assert owner is not None
            nodes[owner.name] = owner
            by_node.setdefault(owner.name, []).append(p)
        node_name, (first, second, *_) = next(iter(by_node.items()))
        other = next(ps[0] for name, ps in by_node.items() if name != node_name)
        gids = (
            [in_partition(store, first, f"a-{i}") for i in range(3)]
            + [in_partition(store, second, f"b-{i}") for i in range(3)]
            + [in_partition(store, other, "c-0")]
        )
        await create_all(store, gids)
        node = nodes[node_name]
        node_client = aioredis.Redis(host=node.host, port=int(node.port), decode_responses=True)
        try:
            await node_client.config_resetstat()
            shared_before = store._batch.shared
            results = await asyncio.gather(*(
                store.transition(gid, Transition(SUBMITTED, Status.ABORTING)) for gid in gids
            ))
            assert [r.status for r in results] == [Status.ABORTING] * len(gids)
            # Groups: 3 calls of `first`, 3 of `second`; the call of `other` runs alone.
            assert store._batch.shared - shared_before == 6
            calls = await command_calls(node_client, "evalsha", "time")
            assert calls == {"evalsha": 2, "time": 2}
            # One moment per slot's batch script.
            assert len({r.now for r in results[:3]}) == 1
            assert len({r.now for r in results[3:6]}) == 1
        finally:
            await node_client.aclose()
    finally:
        await store.close()


async def test_a_call_with_thousands_of_keys_gets_its_own_slice(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """Past 4000 keys the batch script copies a call's slice in a loop, not by unpack
    (bounded by the Lua stack): a claim of 2,103 candidates after another call."""
    shared, _ = stores
    shared._batch.always_share = True
    p = 1
    due = [in_partition(shared, p, f"due-{i}") for i in range(3)]
    for gid in due:
        await shared.create(make_trans(gid), due_in_ms=0)
    # Claims name candidates by their due-index member; absent ones are skipped.
    members = await shared.client.zrangebyscore(shared.keys.due(p), "-inf",
                                                f"({FINISHED_BAND}")
    absent = [f"0000000000000:{in_partition(shared, p, f'absent-{i}')}" for i in range(4100)]
    candidates = absent + members
    tp = shared.keys.trans_prefix(p)
    keys = [shared.keys.due(p)] + [tp + m[14:] for m in candidates]
    assert len(keys) > 4000
    loaded, claimed = await asyncio.gather(
        shared._batch.call(shared.scripts["load"], [shared.keys.for_gid(due[0]).trans], []),
        shared._batch.call(shared.scripts["claim"], keys, ["w", 60_000, *candidates]),
    )
    assert loaded
    assert [(c[0], c[1]) for c in claimed[1:]] == [
        (m[14:], f"w:{len(absent) + 1 + i}") for i, m in enumerate(members)
    ]
    assert sorted(m[14:] for m in members) == sorted(due)
    assert all(dict(zip(c[2][::2], c[2][1::2], strict=True))["gid"] == c[0]
               for c in claimed[1:])
