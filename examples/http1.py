"""A minimal HTTP/1.1 server for hot example endpoints (the flash sale's buyer path).

aiohttp spends most of a trivial request's CPU in its own request and response
machinery; for an endpoint whose real work is one Redis call, that dominates. This
protocol parses just what these endpoints need — method, path, query, Content-Length
body — answers requests of one connection in order, and supports keep-alive. It is not
a general web server: no chunked request bodies, no TLS, no HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

MAX_HEAD = 16 * 1024
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes


Reply = tuple[int, bytes]
Handler = Callable[[Request], Awaitable[Reply]]

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 409: b"Conflict",
            413: b"Payload Too Large", 425: b"Too Early", 500: b"Internal Server Error"}


def _render(status: int, body: bytes, close: bool) -> bytes:
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            % (status, _REASONS.get(status, b"Unknown"), len(body)))
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


# What makes urlsplit read a target other than as path?query: a fragment, the
# characters it deletes, a netloc ("//"); parse_qsl: ";" in older Pythons.
_NOT_PLAIN = re.compile(r"[#;\t\r\n]|^//|^[^/]")


def _target(target: str) -> tuple[str, dict[str, str]]:
    """The path and query of a request target, as urlsplit and parse_qsl read them.

    An origin-form target without a fragment (every one the coordinator sends) is split
    by hand at a fraction of their cost.
    """
    if _NOT_PLAIN.search(target):
        split = urllib.parse.urlsplit(target)
        return split.path, dict(urllib.parse.parse_qsl(split.query))
    path, _, raw = target.partition("?")
    query: dict[str, str] = {}
    for pair in raw.split("&") if raw else ():
        name, _, value = pair.partition("=")
        if not value:  # parse_qsl drops blank values
            continue
        if "%" in pair or "+" in pair:
            name = urllib.parse.unquote(name.replace("+", " "))
            value = urllib.parse.unquote(value.replace("+", " "))
        query[name] = value
    return path, query


class Http1Protocol(asyncio.Protocol):
    def __init__(self, routes: dict[tuple[str, str], Handler]) -> None:
        self.routes = routes
        self.buffer = b""
        self.queue: list[tuple[Request, bool]] = []
        self.worker: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._fail(400)
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail(400)
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail(400)
                return
            if length > MAX_BODY or "chunked" in headers.get("transfer-encoding", ""):
                self._fail(413)
                return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            path, query = _target(parts[1])
            request = Request(parts[0], path, query, body)
            close = headers.get("connection", "").lower() == "close"
            self.queue.append((request, close))
            if self.worker is None:
                self.worker = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        """Answer queued requests one by one, so replies leave in request order."""
        try:
            while self.queue and self.transport is not None:
                request, close = self.queue.pop(0)
                handler = self.routes.get((request.method, request.path))
                if handler is None:
                    status, body = 404, b'{"message":"no such route"}'
                else:
                    try:
                        status, body = await handler(request)
                    except Exception:  # the example's handlers raise only on bugs
                        status, body = 500, b'{"message":"internal error"}'
                if self.transport is None:
                    return
                self.transport.write(_render(status, body, close))
                if close:
                    self.transport.close()
                    return
        finally:
            self.worker = None

    def _fail(self, status: int) -> None:
        if self.transport is not None:
            self.transport.write(_render(status, b'{"message":"bad request"}', True))
            self.transport.close()


async def serve(
    routes: dict[tuple[str, str], Handler], host: str, port: int, *, reuse_port: bool = False
) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http1Protocol(routes), host, port,
                                      reuse_port=reuse_port or None, backlog=2048)
    async with server:
        with contextlib.suppress(asyncio.CancelledError):
            await server.serve_forever()
