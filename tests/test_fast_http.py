"""The fast HTTP/1.1 path (coordinator/api/fast.py) answers as the aiohttp routes do.

Two real coordinators, one with `server.fast_http` on and one with it off, get the same
requests over raw sockets. aiohttp adds a `Server` header to every answer and the fast
path does not, which tells which of the two answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.support import CoordinatorProcess

TOKEN = "fast-path-token"
SUBMIT = "/api/dtmsvr/submit"


@pytest.fixture
async def fast(redis_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = await CoordinatorProcess(
        redis_url, prefix + "f", COORDINATOR_SERVER_API_TOKEN=TOKEN,
        COORDINATOR_SERVER_MAX_BODY_BYTES="4096",
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
async def plain(redis_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = await CoordinatorProcess(
        redis_url, prefix + "p", COORDINATOR_SERVER_API_TOKEN=TOKEN,
        COORDINATOR_SERVER_MAX_BODY_BYTES="4096", COORDINATOR_SERVER_FAST_HTTP="false",
    ).start()
    yield proc
    proc.stop()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def by_aiohttp(self) -> bool:
        return "server" in self.headers


def _read_answers(sock: socket.socket, count: int) -> list[Answer]:
    """`count` HTTP/1.1 answers read off one connection, in order."""
    data = b""
    answers: list[Answer] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(data) >= end + 4 + length:
                answers.append(Answer(int(head[0].split()[1]), headers,
                                      data[end + 4:end + 4 + length]))
                data = data[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(answers)} answers")
        data += chunk
    return answers


def _post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: t", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def exchange(port: int, raw: bytes, count: int) -> list[Answer]:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(raw)
        return _read_answers(sock, count)


def empty_saga(gid: str, **extra: object) -> bytes:
    steps = [{"action": "", "compensate": ""}, {"action": "", "compensate": ""}]
    return orjson.dumps({"gid": gid, "trans_type": "saga", "steps": steps,
                         "payloads": ["{}", "{}"], "wait_result": True, **extra})


# Requests whose answers must not depend on which path served them.
CASES: list[tuple[str, bytes, tuple[str, ...]]] = [
    (SUBMIT, empty_saga("fp-ok"), ()),
    (SUBMIT, empty_saga("fp-ok"), ()),  # the same again: idempotent
    (SUBMIT, empty_saga("fp-ok", payloads=["{}", "{1}"]), ()),  # reused gid: 409
    (SUBMIT, b'{"gid": "fp-bad", "trans_type": ', ()),  # broken JSON: 400
    (SUBMIT, b'{"trans_type": "saga"}', ()),  # no gid: 400 naming the field
    ("/api/dtmsvr/prepare", orjson.dumps({"gid": "fp-msg", "trans_type": "msg",
                                          "steps": [{"action": ""}], "payloads": ["{}"],
                                          "query_prepared": "http://127.0.0.1:9/q"}), ()),
    ("/api/dtmsvr/abort", b'{"gid": "fp-msg", "trans_type": "msg"}', ()),
    ("/api/dtmsvr/abort", b'{"gid": "fp-none", "trans_type": "msg"}', ()),
    ("/api/dtmsvr/forceStop", b'{"gid": "fp-ok"}', ()),  # operator route, no token: 401
    ("/api/dtmsvr/forceStop", b'{"gid": "fp-ok"}', (f"Authorization: Bearer {TOKEN}",)),
    ("/api/dtmsvr/registerBranch", b'{"gid": "fp-none", "branch_id": "01",'
                                   b' "trans_type": "tcc", "url": "http://127.0.0.1:9/x",'
                                   b' "op": "try", "data": "{}"}', ()),
    ("/api/dtmsvr/prepareWorkflow", orjson.dumps({"gid": "fp-wf", "trans_type": "workflow",
                                                  "steps": [], "payloads": []}), ()),
]


def _comparable(answer: Answer) -> tuple[int, str, str, str, object]:
    body: object = answer.body
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(answer.body)
    # Times inside a workflow's answer differ between the two servers.
    text = re.sub(r"'(create_time|update_time|finish_time)': '[^']*'", "T", str(body))
    return (answer.status, answer.headers.get("content-type", ""),
            answer.headers.get("www-authenticate", ""), answer.headers.get("retry-after", ""),
            text)


async def test_each_answer_is_the_one_aiohttp_gives(
    fast: CoordinatorProcess, plain: CoordinatorProcess
) -> None:
    for path, body, headers in CASES:
        raw = _post(path, body, *headers)
        (mine,) = await asyncio.to_thread(exchange, fast.port, raw, 1)
        (theirs,) = await asyncio.to_thread(exchange, plain.port, raw, 1)
        assert not mine.by_aiohttp, (path, body)
        assert theirs.by_aiohttp
        assert _comparable(mine) == _comparable(theirs), (path, body)
    statuses = [
        (await asyncio.to_thread(exchange, fast.port, _post(p, b, *h), 1))[0].status
        for p, b, h in CASES[:1]
    ]
    assert statuses == [200]


async def test_pipelined_requests_are_answered_in_order_and_other_routes_hand_over(
    fast: CoordinatorProcess,
) -> None:
    raw = (_post(SUBMIT, empty_saga("fp-p1")) + _post(SUBMIT, empty_saga("fp-p2"))
           + b"GET /api/dtmsvr/query?gid=fp-p1 HTTP/1.1\r\nHost: t\r\n\r\n"
           + _post(SUBMIT, empty_saga("fp-p3")))
    answers = await asyncio.to_thread(exchange, fast.port, raw, 4)
    assert [a.status for a in answers] == [200, 200, 200, 200]
    # The two submits before the query on the fast path; from the query on, aiohttp.
    assert [a.by_aiohttp for a in answers] == [False, False, True, True]
    assert orjson.loads(answers[2].body)["transaction"]["gid"] == "fp-p1"
    assert orjson.loads(answers[2].body)["transaction"]["status"] == "succeed"
    (query,) = await asyncio.to_thread(
        exchange, fast.port, b"GET /api/dtmsvr/query?gid=fp-p3 HTTP/1.1\r\nHost: t\r\n\r\n", 1)
    assert orjson.loads(query.body)["transaction"]["status"] == "succeed"


async def test_chunked_gzip_oversized_and_malformed_requests_are_aiohttp_s(
    fast: CoordinatorProcess,
) -> None:
    body = empty_saga("fp-chunked")
    chunked = (f"POST {SUBMIT} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
    (answer,) = await asyncio.to_thread(exchange, fast.port, chunked, 1)
    assert (answer.status, answer.by_aiohttp) == (200, True)

    too_big = _post(SUBMIT, b"{" + b" " * 5000 + b"}")
    (answer,) = await asyncio.to_thread(exchange, fast.port, too_big, 1)
    assert (answer.status, answer.by_aiohttp) == (413, True)

    gz = _post(SUBMIT, b"not gzip", "Content-Encoding: gzip")
    (answer,) = await asyncio.to_thread(exchange, fast.port, gz, 1)
    assert (answer.status, answer.by_aiohttp) == (400, True)

    # Two Content-Length fields, a NUL in a value: never read by the fast path.
    for bad in (_post(SUBMIT, b"{}", "Content-Length: 2"),
                _post(SUBMIT, b"{}", "X-Odd: a\x00b")):
        (answer,) = await asyncio.to_thread(exchange, fast.port, bad, 1)
        assert (answer.status, answer.by_aiohttp) == (400, True)


async def test_a_head_with_bare_line_feeds_goes_to_aiohttp_at_once(
    fast: CoordinatorProcess,
) -> None:
    # The fast path looks for CRLF CRLF; a head ended by bare LFs must not wait for it.
    body = empty_saga("fp-lf")
    raw = f"POST {SUBMIT} HTTP/1.1\nHost: t\nContent-Length: {len(body)}\n\n".encode() + body
    (answer,) = await asyncio.to_thread(exchange, fast.port, raw, 1)
    assert answer.by_aiohttp


async def test_connection_close_and_half_close_still_get_their_answer(
    fast: CoordinatorProcess,
) -> None:
    def run() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", fast.port), timeout=15) as sock:
            sock.sendall(_post(SUBMIT, empty_saga("fp-close"), "Connection: close"))
            closed = b""
            while chunk := sock.recv(65536):
                closed += chunk
        with socket.create_connection(("127.0.0.1", fast.port), timeout=15) as sock:
            sock.sendall(_post(SUBMIT, empty_saga("fp-half")))
            sock.shutdown(socket.SHUT_WR)
            half = b""
            while chunk := sock.recv(65536):
                half += chunk
        return closed, half

    closed, half = await asyncio.to_thread(run)
    assert closed.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in closed
    assert half.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_fast_answers_are_counted_in_the_metrics(fast: CoordinatorProcess) -> None:
    raw = b"".join(_post(SUBMIT, empty_saga(f"fp-m{i}")) for i in range(5))
    raw += _post(SUBMIT, b"{")
    answers = await asyncio.to_thread(exchange, fast.port, raw, 6)
    assert [a.status for a in answers] == [200] * 5 + [400]
    metrics = await asyncio.to_thread(
        exchange, fast.port,
        b"GET /api/metrics HTTP/1.1\r\nHost: t\r\n\r\n", 1)
    text = metrics[0].body.decode()
    ok = re.search(r'dtm_server_process_total\{api="submit",status="ok",type="http"\} (\S+)',
                   text)
    failed = re.search(
        r'dtm_server_process_total\{api="submit",status="fail",type="http"\} (\S+)', text)
    assert ok is not None, text
    assert float(ok.group(1)) == 5, text
    assert failed is not None, text
    assert float(failed.group(1)) == 1, text


def test_the_fast_path_is_off_with_tracing_or_when_turned_off() -> None:
    # Spans come from the aiohttp middleware, so with tracing every request goes there.
    from aiohttp import web

    from coordinator.api.fast import FastFront
    from coordinator.settings import ServerSettings

    app = web.Application()
    assert FastFront(app, ServerSettings(), grace=1).enabled
    assert not FastFront(app, ServerSettings(tracing=True), grace=1).enabled
    assert not FastFront(app, ServerSettings(fast_http=False), grace=1).enabled
