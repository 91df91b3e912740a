"""The lean HTTP/1.1 client of branch calls, against raw servers on loopback sockets.

Each server answers with exact bytes, so framing cases aiohttp never produces (chunked
bodies, bodies up to close, a server closing an idle keep-alive connection) are covered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from coordinator.engine.http1 import Http1Error, Http1Pool, Target

Answer = Callable[[bytes], bytes | None]  # request bytes -> answer bytes (None: hang up)


class RawServer:
    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                reply = self.answer(head + body)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[tuple[RawServer, int]]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, close_after: bool = False) -> tuple[RawServer, int]:
        raw = RawServer(answer, close_after)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        return raw, server.sockets[0].getsockname()[1]

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()


def ok(body: bytes = b'{"dtm_result":"SUCCESS"}') -> Answer:
    return lambda _req: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_request_line_headers_and_keep_alive(serve) -> None:  # type: ignore[no-untyped-def]
    raw, port = await serve(ok())
    pool = Http1Pool()
    url = f"http://127.0.0.1:{port}/api/TransOut?tenant=a"
    for _ in range(3):
        status, body = await pool.request("POST", url, "gid=g%201&op=action",
                                          {"Content-Type": "application/json"}, b"{}", 2)
        assert (status, body) == (200, b'{"dtm_result":"SUCCESS"}')
    assert raw.connections == 1  # one connection, kept alive for all three
    first = raw.requests[0].decode()
    assert first.startswith("POST /api/TransOut?tenant=a&gid=g%201&op=action HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n" in first
    assert "Content-Length: 2\r\n" in first
    assert first.endswith("\r\n\r\n{}")
    await pool.close()


async def test_chunked_body_and_body_until_close(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = (b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"dtm\r\n11;ext=1\r\n_result\":\"FAILURE\r\n2\r\n\"}\r\n0\r\n\r\n")
    _, port = await serve(lambda _r: chunked)
    pool = Http1Pool()
    status, body = await pool.request("GET", f"http://127.0.0.1:{port}/x", "", {}, b"", 2)
    assert (status, body) == (409, b'{"dtm_result":"FAILURE"}')
    raw, port2 = await serve(lambda _r: b"HTTP/1.1 200 OK\r\n\r\nno length here",
                             close_after=True)
    status, body = await pool.request("GET", f"http://127.0.0.1:{port2}/x", "", {}, b"", 2)
    assert (status, body) == (200, b"no length here")
    # That connection ended with the body: the next call opens a new one.
    await pool.request("GET", f"http://127.0.0.1:{port2}/x", "", {}, b"", 2)
    assert raw.connections == 2
    await pool.close()


async def test_idle_connection_closed_by_server_is_retried(serve) -> None:  # type: ignore[no-untyped-def]
    raw, port = await serve(ok())
    pool = Http1Pool()
    url = f"http://127.0.0.1:{port}/x"
    await pool.request("GET", url, "", {}, b"", 2)
    for writer in raw.writers:  # the server drops the idle keep-alive connection
        writer.close()
    await asyncio.sleep(0.05)
    status, _ = await pool.request("GET", url, "", {}, b"", 2)
    assert status == 200
    assert raw.connections == 2
    await pool.close()


async def test_failures_are_errors_not_hangs(serve) -> None:  # type: ignore[no-untyped-def]
    pool = Http1Pool()
    _, silent = await serve(lambda _r: b"")  # reads the request, never answers
    with pytest.raises(TimeoutError):
        await pool.request("GET", f"http://127.0.0.1:{silent}/x", "", {}, b"", 0.3)
    _, rude = await serve(lambda _r: None)  # hangs up on a fresh connection
    with pytest.raises(Http1Error, match="closed before an answer"):
        await pool.request("GET", f"http://127.0.0.1:{rude}/x", "", {}, b"", 2)
    _, half = await serve(lambda _r: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                          close_after=True)
    with pytest.raises(Http1Error, match="middle of an answer"):
        await pool.request("GET", f"http://127.0.0.1:{half}/x", "", {}, b"", 2)
    _, junk = await serve(lambda _r: b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(Http1Error, match="not an HTTP answer"):
        await pool.request("GET", f"http://127.0.0.1:{junk}/x", "", {}, b"", 2)
    with pytest.raises(Http1Error, match="cannot connect"):
        await pool.request("GET", "http://127.0.0.1:1/x", "", {}, b"", 2)
    await pool.close()


def test_only_plain_http_targets() -> None:
    assert Target.parse("http://h:81/a?b=1") == Target("h", 81, "/a?b=1")
    assert Target.parse("http://h") == Target("h", 80, "/")
    with pytest.raises(ValueError, match="plain http"):
        Target.parse("https://h/a")


async def test_body_until_close_is_read_to_the_end() -> None:
    """A length-less body arriving in pieces must be read whole, not its first piece."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"dtm_result":')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'"FAILURE"}')
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool()
    status, body = await pool.request("GET", f"http://127.0.0.1:{port}/x", "", {}, b"", 2)
    assert (status, body) == (200, b'{"dtm_result":"FAILURE"}')
    await pool.close()
    server.close()
    await server.wait_closed()


async def test_interim_answers_are_skipped(serve) -> None:  # type: ignore[no-untyped-def]
    reply = (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    _, port = await serve(lambda _r: reply)
    pool = Http1Pool()
    assert await pool.request("GET", f"http://127.0.0.1:{port}/x", "", {}, b"", 2) == (
        200, b"ok")
    # The connection is still in step: a second call gets its own answer.
    assert await pool.request("GET", f"http://127.0.0.1:{port}/x", "", {}, b"", 2) == (
        200, b"ok")
    await pool.close()
