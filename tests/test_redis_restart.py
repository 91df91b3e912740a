"""A Redis restart under a running coordinator: 503 while it is down, no error after.

The test runs its own redis-server on a free port (never the shared one on 6379), stops
it and starts it again on the same port and data directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from bench.redis_server import RedisServer
from tests.conftest import private_redis_server
from tests.support import Api, CoordinatorProcess, Participant, saga_body


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with private_redis_server() as server:
        yield server


async def test_redis_down_is_503_and_stale_connections_recover(
    own_redis: RedisServer, session: aiohttp.ClientSession, participant: Participant
) -> None:
    coordinator = await CoordinatorProcess(
        own_redis.url, "restart", COORDINATOR_ENGINE_LEASE_SECONDS=3,
        COORDINATOR_ENGINE_REQUEST_TIMEOUT=1,
    ).start()
    try:
        api = Api(session, coordinator.api)
        empty = {"action": "", "compensate": ""}
        body = {"gid": "before", "trans_type": "saga", "steps": [empty],
                "payloads": ["{}"], "wait_result": True}
        assert (await api.post("submit", body))[0] == 200
        # Several pooled connections, all of which go stale at the restart.
        for _ in range(3):
            assert await api.status("before") == "succeed"
        # One saga is calling its branch when Redis goes away: it cannot write the result.
        participant.delay_for("in-flight", "a1", 0.6)
        assert (await api.post("submit", saga_body("in-flight", participant, 1)))[0] == 200
        await asyncio.sleep(0.3)

        own_redis.stop()
        async with session.get(f"{coordinator.api}/query", params={"gid": "before"}) as r:
            assert r.status == 503, await r.text()
            assert r.headers["Retry-After"] == "1"
            assert "Redis is unavailable" in (await r.json())["message"]
        status, reply = await api.post("submit", {**body, "gid": "while-down"})
        assert status == 503, reply

        own_redis.start()
        # The first requests after the restart reuse the stale connections: they are
        # retried on fresh ones instead of failing with "Connection closed by server".
        assert await api.status("before") == "succeed"
        assert (await api.post("submit", {**body, "gid": "after"}))[0] == 200
        assert await api.status("after") == "succeed"
        # The saga whose write failed is taken up again once its lease has run out.
        await api.wait_status("in-flight", "succeed", timeout=15)
        log = coordinator.log_tail(200)
        assert "Traceback" not in log, log
        assert "claiming paused" in log
        assert "processing in-flight paused: Redis is unavailable" in log
    finally:
        await coordinator.aclose()
