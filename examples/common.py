"""What every example shares: the coordinator in-process, services on loopback ports,
database pools, a journal of what each service did, and the checks an example prints
and exits by.

Every example uses the Redis in ``COORDINATOR_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) under a key prefix of its own, ``ex-<name>``, the
PostgreSQL in ``EXAMPLES_POSTGRES_DSN`` and the MariaDB/MySQL in ``EXAMPLES_MYSQL_URL``.
Each run resets its own tables and keys first, so it can be repeated at will.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import socket
import sys
import time
import traceback
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from coordinator.api.app import create_app
from coordinator.client import BranchInfo, DtmClient, SqlBarrier, TransactionFailed
from coordinator.settings import Settings

REDIS_URL = os.environ.get("COORDINATOR_REDIS_URL") or "redis://127.0.0.1:6379/0"
POSTGRES_DSN = (
    os.environ.get("EXAMPLES_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("EXAMPLES_MYSQL_URL") or "mysql://root@127.0.0.1:3306/test"

TIME_LIMIT = 60.0  # a run that hangs fails instead of blocking CI
FINAL = ("succeed", "failed")

Scenario = Callable[[DtmClient, "Checks"], Awaitable[None]]


def key_prefix(name: str) -> str:
    """The Redis key prefix of one example: the coordinator's keys and its own."""
    return f"ex-{name}"


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


class ServiceUnavailable(Exception):
    """Redis or a database the example needs cannot be reached (exit code 2)."""


# The database drivers are optional extras of the package; which extra brings which.
DRIVER_EXTRAS = {"asyncpg": "postgres", "aiomysql": "mysql", "pymysql": "mysql"}


def driver(name: str) -> ModuleType:
    """Import a database driver, or say which extra to install (exit code 2)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ServiceUnavailable(
            f"the {name} driver is not installed: pip install -e '.[{DRIVER_EXTRAS[name]}]'"
        ) from None


# -- checks ---------------------------------------------------------------------------------


def _show(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


class Checks:
    """The example's verdict: every check is printed as it is made, and the run succeeds
    only if all of them held."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n{title}", flush=True)

    def note(self, text: str) -> None:
        print(f"        {text}", flush=True)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {what}", flush=True)
        else:
            self.failed.append(what)
            print(f"  FAIL  {what}" + (f" ({detail})" if detail else ""), flush=True)
        return ok

    def equal(self, what: str, actual: object, expected: object) -> bool:
        return self.check(f"{what}: {_show(actual)}", actual == expected,
                          f"expected {_show(expected)}")

    @property
    def ok(self) -> bool:
        return self.passed > 0 and not self.failed


# -- services on loopback ports ---------------------------------------------------------------


class Server:
    """An aiohttp application on 127.0.0.1 and a port the OS picked.

    The socket is bound before the site starts, so there is no window in which another
    process can take a port that was merely found free.
    """

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.port = 0

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    async def __aenter__(self) -> Server:
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


@contextlib.asynccontextmanager
async def coordinator(
    prefix: str, overrides: Mapping[str, object] | None = None
) -> AsyncIterator[DtmClient]:
    """The coordinator in this process, on its own port and Redis key prefix; `overrides`
    are settings of the example's own (gRPC port, registry)."""
    settings = Settings.load(overrides={
        "redis.url": REDIS_URL,
        "redis.key_prefix": prefix,
        # Short polls and retries keep each example within seconds; a deployed
        # coordinator keeps the defaults.
        "engine.poll_interval": 0.05,
        "engine.retry_interval": 1,
        # Long enough to look at the transactions afterwards, short enough not to pile up.
        "engine.finished_ttl": 3600,
        # Most examples speak HTTP only; no gRPC port to clash with another coordinator.
        "server.grpc_port": 0,
        **(overrides or {}),
    })
    async with Server(create_app(settings)) as server, DtmClient(
        server.url("api/dtmsvr")
    ) as dtm:
        yield dtm


async def final_status(dtm: DtmClient, gid: str, timeout: float = 15.0) -> str:
    """Wait until the transaction succeeded or failed; its last status."""
    deadline = time.monotonic() + timeout
    while True:
        trans = (await dtm.query(gid))["transaction"]
        status = str(trans["status"]) if trans else ""
        if status in FINAL or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def describe(dtm: DtmClient, gid: str) -> str:
    """The transaction as `query` has it: status and branches, then the rollback reason."""
    info = await dtm.query(gid)
    trans = info["transaction"] or {}
    branches = ", ".join(f"{b['branch_id']}/{b['op']} {b['status']}" for b in info["branches"])
    text = f"{gid}: {trans.get('status', 'unknown')}; branches {branches or 'none'}"
    if trans.get("rollback_reason"):
        text += f"\n        reason: {trans['rollback_reason']}"
    return text


# -- what a service did ----------------------------------------------------------------------


class Journal:
    """What one service's handlers did, per gid ("TransOut: applied", "Deduct: refused"),
    so a driver can show and check what the barrier decided."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def add(self, gid: str, text: str) -> None:
        self.entries.append((gid, text))

    def of(self, gid: str) -> list[str]:
        return [text for g, text in self.entries if g == gid]


async def barrier_call(
    journal: Journal, name: str, branch: BranchInfo, backend: SqlBarrier,
    business: Callable[[Any], Awaitable[Any]],
) -> None:
    """Run ``business(conn)`` behind the branch's barrier and note what happened."""
    try:
        result = await branch.barrier().call(backend, business)
    except TransactionFailed as exc:
        journal.add(branch.gid, f"{name}: refused")
        raise TransactionFailed(f"{name}: {exc}") from exc
    journal.add(branch.gid, f"{name}: {result}")


# -- databases and Redis ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def pg_pool(max_size: int = 4) -> AsyncIterator[Any]:
    """An asyncpg pool with the barrier table in place."""
    asyncpg = driver("asyncpg")

    from coordinator.client.barrier_postgres import ensure_barrier_table

    try:
        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=max_size, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(f"PostgreSQL at {safe_url(POSTGRES_DSN)}: {exc}") from exc
    try:
        async with pool.acquire() as conn:
            await ensure_barrier_table(conn)
        yield pool
    finally:
        await pool.close()


def mysql_params(database: str | None = None) -> dict[str, Any]:
    """aiomysql connection arguments from EXAMPLES_MYSQL_URL, optionally another database."""
    url = urlsplit(MYSQL_URL)
    return {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": unquote(url.username or "root"),
        "password": unquote(url.password or ""),
        "db": database or url.path.lstrip("/") or "test",
        "connect_timeout": 5,
    }


def mysql_connector(database: str | None = None) -> Callable[[], Awaitable[Any]]:
    """Opens a fresh connection per call: XA branches need sessions of their own."""
    aiomysql = driver("aiomysql")

    return functools.partial(aiomysql.connect, **mysql_params(database))


@contextlib.asynccontextmanager
async def mysql_pool(database: str | None = None, max_size: int = 4) -> AsyncIterator[Any]:
    """An aiomysql pool with the barrier table in place.

    Autocommit is on so plain reads see the latest commits (InnoDB would otherwise keep
    showing a connection the snapshot of its first read); the barrier still runs its
    work inside an explicit BEGIN … COMMIT.
    """
    aiomysql = driver("aiomysql")
    pymysql = driver("pymysql")

    from coordinator.client.barrier_mysql import ensure_barrier_table

    try:
        pool = await aiomysql.create_pool(
            minsize=1, maxsize=max_size, autocommit=True, **mysql_params(database))
    except (OSError, pymysql.err.OperationalError) as exc:
        raise ServiceUnavailable(f"MariaDB/MySQL at {safe_url(MYSQL_URL)}: {exc}") from exc
    try:
        async with pool.acquire() as conn:
            await ensure_barrier_table(conn)
        yield pool
    finally:
        pool.close()
        await pool.wait_closed()


async def mysql_execute(pool: Any, *statements: str | tuple[str, Sequence[Any]]) -> None:
    """Run statements (SQL, or SQL with its parameters) on one pooled connection."""
    from coordinator.client.barrier_mysql import quiet_cursor

    async with pool.acquire() as conn, conn.cursor(quiet_cursor()) as cur:
        for statement in statements:
            sql, args = (statement, ()) if isinstance(statement, str) else statement
            await cur.execute(sql, tuple(args))


async def mysql_rows(pool: Any, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(sql, args)
        return [tuple(row) for row in await cur.fetchall()]


async def affected(conn: Any, sql: str, *args: Any) -> int:
    """Rows changed by one statement on an aiomysql connection (inside the barrier)."""
    async with conn.cursor() as cur:
        return int(await cur.execute(sql, args))


@contextlib.asynccontextmanager
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def reset_redis(prefix: str) -> None:
    """Delete every key under the example's prefix: the coordinator's transactions of
    earlier runs (which would otherwise call services long gone) and business keys."""
    try:
        async with redis_client() as client:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(f"Redis at {safe_url(REDIS_URL)}: {exc}") from exc


@contextlib.asynccontextmanager
async def exclusive(name: str, wait: float = 30.0) -> AsyncIterator[None]:
    """Hold a PostgreSQL advisory lock named after the example while it runs.

    Two runs of one example at once (a test run next to a manual one) would reset each
    other's tables and keys. The server drops the lock with the connection, also when
    the process is killed, so a crashed run never blocks the next one.
    """
    asyncpg = driver("asyncpg")

    try:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(f"PostgreSQL at {safe_url(POSTGRES_DSN)}: {exc}") from exc
    try:
        key = zlib.crc32(key_prefix(name).encode())
        deadline = time.monotonic() + wait
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)", key):
            if time.monotonic() > deadline:
                raise RuntimeError(f"another run of {name} has been holding its lock for {wait}s")
            await asyncio.sleep(0.2)
        yield
    finally:
        await conn.close()


# -- running an example ----------------------------------------------------------------------


async def run_example(
    name: str, scenario: Scenario, settings: Mapping[str, object] | None = None
) -> bool:
    """Reset the example's Redis keys, start the coordinator (with `settings` of the
    example's own), run the scenario and print the verdict. ServiceUnavailable
    propagates; any other error fails the run."""
    checks = Checks()
    started = time.monotonic()
    prefix = key_prefix(name)
    print(f"example {name}: coordinator in-process on {safe_url(REDIS_URL)}, "
          f"key prefix {prefix}")
    try:
        async with asyncio.timeout(TIME_LIMIT), exclusive(name):
            await reset_redis(prefix)
            async with coordinator(prefix, settings) as dtm:
                await scenario(dtm, checks)
    except ServiceUnavailable:
        raise
    except Exception as exc:
        traceback.print_exc()
        checks.check("the example ran to its end", False, f"{type(exc).__name__}: {exc}")
    elapsed = time.monotonic() - started
    total = checks.passed + len(checks.failed)
    if checks.ok:
        print(f"\n{name}: all {total} checks held ({elapsed:.1f}s)")
    else:
        print(f"\n{name}: {len(checks.failed)} of {total} checks FAILED ({elapsed:.1f}s)")
    return checks.ok


def cli(main: Callable[[], Coroutine[Any, Any, bool]]) -> NoReturn:
    """``python -m examples.<name>``: exit 0 if every check held, 1 if not, 2 if a
    service is missing."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ok = asyncio.run(main())
    except ServiceUnavailable as exc:
        print(f"cannot run the example: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if ok else 1)
