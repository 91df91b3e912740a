"""A lean HTTP/1.1 path for the transaction routes that take a JSON body.

aiohttp's request and response machinery costs about 140 µs of CPU per request on the
reference machine, several times what the coordinator itself spends on an empty
saga's submit. Every connection therefore starts here: a request that is a plain
`POST` of one of `BODY_ROUTES` (HTTP/1.1, a `Content-Length` body, no transfer or
content coding, no `Expect`) is parsed, answered and timed here, calling the same body
handler, access check and error mapping as the aiohttp route. At the first request
that is anything else (another route, a chunked or gzip body, a malformed head, an
oversized body) the connection, with every byte not yet consumed, is handed to
aiohttp for good, which answers it exactly as it answers any request, 400s and 413s
included. Requests are answered one at a time and in order, pipelined ones too.

`server.fast_http = false` turns this off; with tracing on it is off (spans come from
the aiohttp middleware).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import time
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

from coordinator.api.auth import bearer_value
from coordinator.api.envelope import error_answer
from coordinator.api.routes import BODY_ROUTES, SERVICE, BodyHandler, check_access
from coordinator.ops.metrics import api_label
from coordinator.settings import ServerSettings

log = logging.getLogger("coordinator.api")

# aiohttp refuses longer request lines and header fields with 400/431: such heads go
# to it untouched.
MAX_HEAD = 8190
# The request line, then fields as RFC 9110 allows them (token name, visible characters,
# spaces and tabs in the value); anything else, obsolete line folding included, goes to
# aiohttp. One match over the whole head: a match per line cost twice as much.
_VCHAR = rb"[!-~\x80-\xff]"
_HEAD = re.compile(
    rb"POST (/[!-~]*) HTTP/1\.1((?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*"
    rb"(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*)*)"
)
_DIGITS = re.compile(rb"[0-9]{1,12}")
# A line ending without its CR: aiohttp decides what such a head means.
_BARE_LF = re.compile(rb"(?<!\r)\n")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            408: "Request Timeout", 409: "Conflict", 425: "Too Early",
            500: "Internal Server Error", 503: "Service Unavailable"}


class Request:
    """What the fast path needs of a request head."""

    __slots__ = ("access", "api", "authorization", "close", "handler", "length", "path")

    def __init__(self, path: bytes, handler: BodyHandler, access: str, api: str) -> None:
        self.path = path
        self.handler = handler
        self.access = access
        self.api = api
        self.length = 0
        self.authorization = ""
        self.close = False


def parse_head(head: bytes, routes: dict[bytes, tuple[BodyHandler, str, str]],
               max_body: int) -> Request | None:
    """The request of a head (without its blank line), or None to leave it to aiohttp."""
    head_match = _HEAD.fullmatch(head)
    if head_match is None:
        return None
    path = head_match.group(1).partition(b"?")[0]
    route = routes.get(path)
    if route is None:
        return None
    req = Request(path, *route)
    seen_length = False
    for raw in head_match.group(2).split(b"\r\n")[1:]:
        name, _, value = raw.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if seen_length or not _DIGITS.fullmatch(value):
                return None
            seen_length = True
            req.length = int(value)
            if req.length > max_body:
                return None  # aiohttp answers the 413
        elif name == b"authorization":
            req.authorization = value.decode("latin-1")
        elif name == b"connection":
            req.close = b"close" in value.lower()
        elif name in (b"transfer-encoding", b"expect", b"upgrade") or (
            name == b"content-encoding" and value.lower() != b"identity"
        ):
            return None
    return req


class FastFront:
    """The fast path of one app: its routes, its open connections and their timeouts."""

    def __init__(self, app: web.Application, server: ServerSettings, *, grace: float,
                 metrics: Any = None) -> None:
        self.app = app
        self.server = server
        self.grace = grace
        self.metrics = metrics
        self.enabled = server.fast_http and not server.tracing
        self.routes: dict[bytes, tuple[BodyHandler, str, str]] = {
            path.encode(): (handler, access, api_label(path))
            for path, (handler, access) in BODY_ROUTES.items()
        }
        self.connections: set[FrontConnection] = set()
        self.closing = False
        self._watch: asyncio.TimerHandle | None = None
        self._date_second = -1
        self._date = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def adopt(self, conn: FrontConnection) -> None:
        self.connections.add(conn)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(1.0, self._check_timeouts)

    def _check_timeouts(self) -> None:
        """Once a second: close connections past the keep-alive or body timeout.

        One look a second over the connections instead of a timer per request.
        """
        self._watch = None
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            conn.check_timeout(now, self.server.keepalive_timeout, self.server.body_timeout)
        if self.connections and not self.closing:
            self._watch = asyncio.get_running_loop().call_later(1.0, self._check_timeouts)

    async def answer(self, req: Request, body: bytes) -> bytes:
        """The whole HTTP response to one request."""
        started = time.perf_counter()
        extra: tuple[tuple[str, str], ...] = ()
        try:
            check_access(self.server, req.access, bearer_value(req.authorization))
            payload = await req.handler(self.app[SERVICE], body)
            status = 200
        except Exception as exc:  # mapped as error_middleware maps it
            status, payload, extra = error_answer(exc, f"POST {req.path.decode('latin-1')}")
        if self.metrics is not None:
            self.metrics.request(req.api, status >= 400, time.perf_counter() - started)
        return self.response(status, payload, extra, req.close or self.closing)

    def response(self, status: int, payload: bytes, extra: tuple[tuple[str, str], ...] = (),
                 close: bool = False) -> bytes:
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n")
        for name, value in extra:
            head += f"{name}: {value}\r\n"
        if close:
            head += "Connection: close\r\n"
        return b"".join((head.encode(), b"Date: ", self.date(), b"\r\n\r\n", payload))

    async def drain(self, _app: web.Application) -> None:
        """On shutdown (after the engine began to stop): close idle connections, let
        requests in progress answer within the grace period, then close the rest."""
        self.closing = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        busy = []
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
            else:
                busy.append(conn.task)
        if busy:
            await asyncio.wait(busy, timeout=self.grace)
        for conn in list(self.connections):
            conn.close()


class FrontConnection(asyncio.Protocol):
    """One client connection: the fast path until a request needs aiohttp, then aiohttp.

    Also keeps the server's open-connection count (server.max_connections).
    """

    def __init__(self, counter: Any, front: FastFront | None,
                 make_inner: Callable[[], asyncio.Protocol]) -> None:
        self.counter = counter
        self.front = front
        self.make_inner = make_inner
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self.since = 0.0  # since when it waits for a head, or for a body
        self.waiting_body = False
        self.paused = False  # reading paused by us
        self.write_blocked = False  # the transport's buffer is full (pause_writing)
        self.eof = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.counter.open += 1
        if self.front is None or not self.front.enabled or self.front.closing:
            self._hand_over()
            return
        self.since = asyncio.get_running_loop().time()
        self.front.adopt(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.open -= 1
        if self.inner is not None:
            self.inner.connection_lost(exc)
        elif self.front is not None:
            # A request in progress goes on (as aiohttp lets its handlers go on): a
            # submit the client stopped waiting for is still carried out.
            self.front.connections.discard(self)
            if self.waiting_body:  # as body_middleware reports it: the client's doing
                head = self.buffer.split(b" ", 2)
                peer = self.transport.get_extra_info("peername") if self.transport else None
                log.info("POST %s: client %s closed the connection during the request body",
                         head[1].decode("latin-1") if len(head) > 1 else "?",
                         peer[0] if peer else "?")

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        self.buffer += data
        if self.task is None:
            self._next()
        elif len(self.buffer) > (1 << 16) and not self.paused:
            # A client that sends far ahead of the answers waits for them.
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        self.eof = True
        if self.task is None:
            return None  # nothing to answer: close
        return True  # answer first, then close (see _answer)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
        else:
            # A client that pipelines requests without reading the answers: no more
            # answers (nor reading) until it has read what is waiting.
            self.write_blocked = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
        else:
            self.write_blocked = False
            self._continue()

    # -- the fast path ----------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the next complete request in the buffer, if there is one."""
        assert self.front is not None
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD or _BARE_LF.search(buffer):
                self._hand_over()
            return
        req = parse_head(buffer[:end], self.front.routes, self.front.server.max_body_bytes)
        if req is None:
            self._hand_over()
            return
        total = end + 4 + req.length
        if len(buffer) < total:
            if not self.waiting_body:
                self.waiting_body = True
                self.since = asyncio.get_running_loop().time()
            return
        self.waiting_body = False
        body = buffer[end + 4:total]
        self.buffer = buffer[total:]
        self.task = asyncio.get_running_loop().create_task(self._answer(req, body))

    async def _answer(self, req: Request, body: bytes) -> None:
        assert self.front is not None
        assert self.transport is not None
        try:
            response = await self.front.answer(req, body)
        finally:
            self.task = None
        if self.transport.is_closing():
            return
        self.transport.write(response)
        if req.close or self.front.closing or self.eof:
            self.transport.close()
            return
        self.since = asyncio.get_running_loop().time()
        self._continue()

    def _continue(self) -> None:
        """After an answer, or once the client read them: on to the next request."""
        transport = self.transport
        if self.task is not None or self.inner is not None or transport is None \
                or transport.is_closing():
            return
        if self.write_blocked:
            if not self.paused:
                self.paused = True
                transport.pause_reading()
            return
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if self.buffer:
            self._next()

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with what is buffered."""
        assert self.transport is not None
        if self.front is not None:
            self.front.connections.discard(self)
        self.inner = self.make_inner()
        self.inner.connection_made(self.transport)
        if self.write_blocked:
            self.inner.pause_writing()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buffer:
            data, self.buffer = self.buffer, b""
            self.inner.data_received(data)
        if self.eof:
            self.inner.eof_received()

    def check_timeout(self, now: float, keepalive: float, body_timeout: float) -> None:
        if self.task is not None or self.inner is not None:
            return
        if self.waiting_body:
            if now - self.since > body_timeout:
                assert self.front is not None
                assert self.transport is not None
                self.transport.write(self.front.response(
                    408, b'{"message":"request body not received in time"}', close=True))
                self.close()
        elif now - self.since > keepalive:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.close()
        if self.front is not None:
            self.front.connections.discard(self)
