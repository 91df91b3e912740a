"""Shared fixtures. Tests use the real Redis on 127.0.0.1:6379 with a fresh key prefix.

Under CI=true a missing service is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from bench.redis_server import RedisServer
from tests.cluster_support import RedisClusterProcess, have_cluster_tools
from tests.support import Api, CoordinatorProcess, Participant, free_port, running_coordinator

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_service(name: str, reason: str) -> None:
    message = f"{name} is not available: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing service is an error)")
    pytest.skip(message)


@contextlib.contextmanager
def private_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free loopback port, stopped afterwards."""
    if shutil.which("redis-server") is None:
        require_service("redis-server", "not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(free_port(), Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        require_service("Redis", str(exc))
    return REDIS_URL


def start_cluster() -> RedisClusterProcess:
    """A fresh 3-primary/3-replica cluster; the caller stops it."""
    if not have_cluster_tools():
        require_service("Redis Cluster", "redis-server and redis-cli must be on PATH")
    try:
        return RedisClusterProcess().start()
    except (OSError, subprocess.SubprocessError, TimeoutError, redis.RedisError) as exc:
        require_service("Redis Cluster", f"the test cluster did not start: {exc}")
        raise


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    """One cluster for the whole session; tests that break it start their own."""
    cluster = start_cluster()
    yield cluster
    cluster.stop()


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
def backend_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The Redis a test's coordinator uses: the shared one, or (param "cluster") the
    session's test cluster, given as one seed node as a user would."""
    if getattr(request, "param", "redis") == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        return cluster.url
    return redis_url


@pytest.fixture
async def coordinator(backend_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = await CoordinatorProcess(backend_url, prefix).start()
    yield proc
    proc.stop()


@pytest.fixture
async def etcd() -> AsyncIterator[Any]:
    """A private etcd (tests.etcd_support.EtcdServer) on free loopback ports, stopped after."""
    from tests.etcd_support import etcd_server  # it imports require_service from here

    async with etcd_server() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def api(session: aiohttp.ClientSession, coordinator: CoordinatorProcess) -> Api:
    return Api(session, coordinator.api)


# -- SQL databases and an asyncio Redis client for the SDK's barrier tests ------------------

POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_HOST = os.environ.get("TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("TEST_MYSQL_PASSWORD", "")
MYSQL_DB = os.environ.get("TEST_MYSQL_DB", "test")


async def open_pg_pool(max_size: int = 8) -> Any:
    """An asyncpg pool on the test database with the barrier table in place."""
    import asyncpg

    from coordinator.client.barrier_postgres import ensure_barrier_table

    try:
        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=max_size, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        require_service("PostgreSQL", f"{POSTGRES_DSN}: {exc}")
    async with pool.acquire() as conn:
        await ensure_barrier_table(conn)
    return pool


async def open_mysql_pool(max_size: int = 8) -> Any:
    """An aiomysql pool on the test database with the barrier table in place."""
    import aiomysql
    import pymysql

    from coordinator.client.barrier_mysql import ensure_barrier_table

    try:
        pool = await aiomysql.create_pool(
            host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD,
            db=MYSQL_DB, minsize=1, maxsize=max_size, connect_timeout=5,
        )
    except (OSError, pymysql.err.OperationalError) as exc:
        require_service("MySQL/MariaDB", f"{MYSQL_HOST}:{MYSQL_PORT}: {exc}")
    async with pool.acquire() as conn:
        await ensure_barrier_table(conn)
    return pool


@pytest.fixture
async def pg_pool() -> AsyncIterator[Any]:
    pool = await open_pg_pool()
    yield pool
    await pool.close()


@pytest.fixture
async def mysql_pool() -> AsyncIterator[Any]:
    pool = await open_mysql_pool()
    yield pool
    pool.close()
    await pool.wait_closed()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def shared_coordinator(redis_url: str) -> Iterator[CoordinatorProcess]:
    """One `coordinator serve` for a whole module, for tests that only need unique gids
    (starting a process per test costs about two seconds)."""
    with running_coordinator(redis_url) as proc:
        yield proc
