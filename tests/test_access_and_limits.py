"""The operator token, the connection cap, read timeouts, and client-caused body errors,
against a real `coordinator serve` process and raw sockets."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from coordinator.settings import Settings
from tests.support import Api, CoordinatorProcess, Participant, saga_body

TOKEN = "s3cret-" + uuid.uuid4().hex


def gid() -> str:
    return "ac-" + uuid.uuid4().hex[:12]


# (method, path, json body or None) of every operator route.
OPERATOR_ROUTES: list[tuple[str, str, dict[str, str] | None]] = [
    ("POST", "forceStop", {"gid": "nope"}),
    ("POST", "resetNextCronTime", {"gid": "nope"}),
    ("GET", "resetCronTime", None),
    ("GET", "subscribe?topic=t&url=http://127.0.0.1:1/x", None),
    ("GET", "unsubscribe?topic=t&url=http://127.0.0.1:1/x", None),
    ("DELETE", "topic/t", None),
    ("GET", "all", None),
    ("GET", "scanKV?cat=topics", None),
    ("GET", "queryKV?cat=topics&key=t", None),
]


async def _call(
    session: aiohttp.ClientSession, proc: CoordinatorProcess, method: str, path: str,
    body: object = None, token: str | None = None,
) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"{proc.api}/{path}" if not path.startswith("/") else f"{proc.base}{path}"
    async with session.request(method, url, json=body, headers=headers) as r:
        await r.read()
        return r.status


@pytest.fixture
async def with_toml_token(
    redis_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[CoordinatorProcess]:
    toml = tmp_path / "coordinator.toml"
    toml.write_text(f'[server]\napi_token = "{TOKEN}"\n')
    proc = await CoordinatorProcess(redis_url, prefix, COORDINATOR_CONFIG=toml).start()
    yield proc
    proc.stop()


async def test_operator_routes_need_the_token_from_a_toml_file(
    with_toml_token: CoordinatorProcess, session: aiohttp.ClientSession,
    participant: Participant,
) -> None:
    proc = with_toml_token
    for method, path, body in OPERATOR_ROUTES:
        assert await _call(session, proc, method, path, body) == 401, path
        assert await _call(session, proc, method, path, body, "wrong") == 401, path
        assert await _call(session, proc, method, path, body, TOKEN) != 401, path
    # Transaction routes stay open (dtm's clients cannot send a token).
    g = gid()
    assert await _call(session, proc, "POST", "submit", saga_body(g, participant, 1)) == 200
    assert await _call(session, proc, "GET", f"query?gid={g}") == 200
    assert await _call(session, proc, "GET", "/api/ping") == 200
    # And the token works on a real transaction: force-stop it.
    prepared = {"gid": gid(), "trans_type": "tcc"}
    assert await _call(session, proc, "POST", "prepare", prepared) == 200
    assert await _call(session, proc, "POST", "forceStop", {"gid": prepared["gid"]}) == 401
    assert await _call(session, proc, "POST", "forceStop", {"gid": prepared["gid"]}, TOKEN) == 200
    assert await Api(session, proc.api).status(prepared["gid"]) == "failed"


async def test_protect_transaction_routes_closes_them_and_json_rpc(
    redis_url: str, prefix: str, session: aiohttp.ClientSession, participant: Participant
) -> None:
    proc = await CoordinatorProcess(
        redis_url, prefix, COORDINATOR_SERVER_API_TOKEN=TOKEN,
        COORDINATOR_SERVER_PROTECT_TRANSACTION_ROUTES="true",
    ).start()
    try:
        body = saga_body(gid(), participant, 1)
        assert await _call(session, proc, "POST", "submit", body) == 401
        assert await _call(session, proc, "GET", "newGid") == 401
        assert await _call(session, proc, "GET", f"query?gid={body['gid']}") == 401
        rpc = {"jsonrpc": "2.0", "id": 1, "method": "newGid", "params": {}}
        assert await _call(session, proc, "POST", "/api/json-rpc", rpc) == 401
        assert await _call(session, proc, "POST", "/api/json-rpc", rpc, TOKEN) == 200
        assert await _call(session, proc, "POST", "submit", body, TOKEN) == 200
        assert await _call(session, proc, "GET", "all") == 401
        for always_open in ("/api/ping", "/api/openapi.json", "/api/dtmsvr/version"):
            assert await _call(session, proc, "GET", always_open) == 200, always_open
    finally:
        proc.stop()


def test_the_token_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    env = {"COORDINATOR_SERVER_API_TOKEN_FILE": str(secret)}
    assert Settings.load(env=env).server.api_token == TOKEN


# -- connections and bodies -----------------------------------------------------------------


@pytest.fixture
async def strict(redis_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = await CoordinatorProcess(
        redis_url, prefix, log_level="INFO",
        COORDINATOR_SERVER_KEEPALIVE_TIMEOUT="1", COORDINATOR_SERVER_BODY_TIMEOUT="1",
        COORDINATOR_SERVER_MAX_CONNECTIONS="20",
    ).start()
    yield proc
    proc.stop()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `seconds`, and what it sent first."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        pass
    return True, got


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_idle_and_half_sent_connections_are_closed(strict: CoordinatorProcess) -> None:
    def run() -> None:
        idle = _connect(strict.port)
        half_head = _connect(strict.port)
        half_head.sendall(b"POST /api/dtmsvr/submit HTTP/1.1\r\nHost: x\r\nContent-Le")
        half_body = _connect(strict.port)
        half_body.sendall(b"POST /api/dtmsvr/submit HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"gi")
        started = time.monotonic()
        for sock in (idle, half_head):
            closed, _ = _closed_within(sock, 4)
            assert closed
        closed, answer = _closed_within(half_body, 4)
        assert closed
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert time.monotonic() - started < 4
        for sock in (idle, half_head, half_body):
            sock.close()

    await asyncio.to_thread(run)


async def test_connection_cap(strict: CoordinatorProcess) -> None:
    def run() -> None:
        held = [_connect(strict.port) for _ in range(20)]
        time.sleep(0.2)
        extra = _connect(strict.port)
        closed, got = _closed_within(extra, 0.5)
        assert closed
        assert got == b""
        extra.close()
        for sock in held:
            sock.close()
        time.sleep(0.2)
        ok = _connect(strict.port)
        ok.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, got = _closed_within(ok, 3)
        assert got.startswith(b"HTTP/1.1 200"), got[:80]
        ok.close()

    await asyncio.to_thread(run)


async def test_broken_gzip_is_400_and_a_hang_up_is_one_info_line(
    strict: CoordinatorProcess, session: aiohttp.ClientSession, participant: Participant
) -> None:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with session.post(f"{strict.api}/submit", data=b"not gzip at all",
                            headers=headers) as r:
        assert r.status == 400, await r.text()
    truncated = gzip.compress(b'{"gid": "x", "trans_type": "saga"}')[:15]
    async with session.post(f"{strict.api}/submit", data=truncated, headers=headers) as r:
        assert r.status == 400, await r.text()
    good = gzip.compress(
        __import__("orjson").dumps(saga_body(gid(), participant, 1))
    )
    async with session.post(f"{strict.api}/submit", data=good, headers=headers) as r:
        assert r.status == 200, await r.text()

    def hang_up() -> None:
        sock = _connect(strict.port)
        sock.sendall(b"POST /api/dtmsvr/submit HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 500\r\n\r\n{\"gid\"")
        time.sleep(0.2)
        sock.close()

    def malformed() -> None:
        sock = _connect(strict.port)
        sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Null: a\x00b\r\n\r\n")
        _, answer = _closed_within(sock, 3)
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer[:80]
        sock.close()

    await asyncio.to_thread(hang_up)
    await asyncio.to_thread(malformed)
    await asyncio.sleep(0.5)
    log = strict.log_tail(400)
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log
    lines = [line for line in log.splitlines() if "closed the connection" in line]
    assert len(lines) == 1, log
    assert " INFO " in lines[0]
    assert "malformed request (400)" in log, log
