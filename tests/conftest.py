"""Shared fixtures. Tests use the real Redis on 127.0.0.1:6379 with a fresh key prefix.

Under CI=true a missing service is an error, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis

from tests.support import Api, CoordinatorProcess, Participant

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_service(name: str, reason: str) -> None:
    message = f"{name} is not available: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing service is an error)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def participant() -> AsyncIterator[Participant]:
    p = await Participant().start()
    yield p
    await p.stop()


@pytest.fixture
async def coordinator(redis_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = await CoordinatorProcess(redis_url, prefix).start()
    yield proc
    proc.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def api(session: aiohttp.ClientSession, coordinator: CoordinatorProcess) -> Api:
    return Api(session, coordinator.api)
