"""The batcher's own pipeline on one Redis (store/direct.py) answers as redis-py's does:
error replies per command, WAIT for wait_replicas, and lost connections retried."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.redis_server import RedisServer
from coordinator.errors import StoreUnavailable
from coordinator.keys import KeySpace
from coordinator.model import Status
from coordinator.store.base import Transition
from coordinator.store.direct import DirectPipeline
from coordinator.store.redis_store import RedisStore
from tests.conftest import private_redis_server
from tests.store_contract import SUBMITTED, make_trans


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with private_redis_server() as server:
        yield server


@pytest.fixture
async def client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    yield c
    await c.aclose()


async def test_replies_and_error_replies_in_order(client: aioredis.Redis) -> None:
    key = "direct-" + uuid.uuid4().hex
    async with DirectPipeline(client) as pipe:
        pipe.execute_command("SET", key, "x")
        pipe.execute_command("HGET", key, "f")  # WRONGTYPE
        pipe.execute_command("GET", key)
        pipe.execute_command("EVALSHA", "0" * 40, 0)  # NOSCRIPT
        replies = await pipe.execute(raise_on_error=False)
    assert replies[0] is True or replies[0] == "OK"
    assert isinstance(replies[1], ResponseError)
    assert "WRONGTYPE" in str(replies[1])
    assert replies[2] == "x"
    assert type(replies[3]).__name__ == "NoScriptError"
    async with DirectPipeline(client) as pipe:
        assert await pipe.execute() == []
    # The connection went back to the pool clean: the next command reads its own reply.
    assert await client.get(key) == "x"


async def test_killed_connections_are_replaced(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, KeySpace("d" + uuid.uuid4().hex[:8], 4))
    killer = aioredis.Redis.from_url(own_redis.url)
    try:
        await store.start()
        gids = [f"k-{i}" for i in range(16)]
        await asyncio.gather(*(store.create(make_trans(g), due_in_ms=60_000) for g in gids))
        await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        results = await asyncio.gather(*(
            store.transition(g, Transition(SUBMITTED, Status.ABORTING)) for g in gids
        ))
        assert {r.status for r in results} == {Status.ABORTING}
    finally:
        await store.close()
        await killer.aclose()


async def test_wait_replicas_on_one_redis_without_replicas(own_redis: RedisServer) -> None:
    """WAIT follows the batch's writes: a client's write that no replica has is 503,
    the engine's own goes on (and is counted)."""
    store = RedisStore.from_url(own_redis.url, KeySpace("w" + uuid.uuid4().hex[:8], 4),
                                wait_replicas=1, wait_timeout_ms=20)
    try:
        await store.start()
        with pytest.raises(StoreUnavailable, match="reached 0 of the 1 replicas"):
            await store.create(make_trans("acked"), due_in_ms=60_000)
        with pytest.raises(StoreUnavailable):  # a create is always the client's
            await store.create(make_trans("engine"), due_in_ms=0, owner="w:1")
        result = await store.transition("engine", Transition(
            SUBMITTED, Status.SUCCEED, owner="w:1", lease="release"))
        assert result.status == Status.SUCCEED
        assert store._batch.unreplicated == 1
        loaded = await store.load("acked")  # written, just not acknowledged
        assert loaded is not None
    finally:
        await store.close()
