"""Serving the app: connection cap, read timeouts, and what a misbehaving client costs.

A client that opens a connection and sends nothing, or half a request head, is closed
after `server.keepalive_timeout` (aiohttp's keep-alive timer runs from the moment a
connection opens and again after each answer, until a whole head has arrived). A
client that sends a head and then dribbles or stops its body gets 408 after
`server.body_timeout`. At most `server.max_connections` connections are open at once;
one more is closed on arrival, so slow clients cannot exhaust file descriptors.
Every connection starts on the fast path (fast.py), which applies the same two
timeouts itself until it hands the connection to aiohttp.

A body the client itself broke (invalid gzip) is a 400, and a client that hangs up in
the middle of its body is an INFO line: neither is the server's fault, so neither may
log a traceback or answer 500.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from coordinator.api.envelope import Handler, json_response
from coordinator.api.fast import FastFront, FrontConnection
from coordinator.api.routes import SETTINGS
from coordinator.ops.wiring import METRICS

log = logging.getLogger("coordinator.api")


@web.middleware
async def body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the whole body within `server.body_timeout`, before the handler sees it
    (aiohttp keeps it, so the handler's `request.read()` returns it at once)."""
    if not request.body_exists:
        return await handler(request)
    try:
        async with asyncio.timeout(request.app[SETTINGS].server.body_timeout):
            await request.read()
    except TimeoutError:
        return await _answer_and_close(
            request, json_response({"message": "request body not received in time"}, 408)
        )
    except RequestPayloadError as exc:
        # Bad Content-Encoding data or broken chunked framing: the client's mistake.
        cause = exc.__cause__ or exc
        message = f"request body cannot be read: {type(cause).__name__}: {cause}"
        return await _answer_and_close(
            request, json_response({"message": message.strip()[:300]}, 400)
        )
    except ConnectionError:
        log.info("%s %s: client %s closed the connection during the request body",
                 request.method, request.path, request.remote)
        return await _answer_and_close(request, json_response({"message": "closed"}, 400))
    return await handler(request)


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send the answer, then close at once: the rest of an unread body must not be
    taken for a next request, and aiohttp would otherwise linger to drain it."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client is gone already
    if request.protocol is not None:
        request.protocol.force_close()
    return response


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a NUL in a header, a bad request line)
    as an ERROR with a traceback, though it answers 400: the client's fault. Make it one
    INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            what = (str(exc.message).strip().splitlines() or [type(exc).__name__])[0]
            record.msg, record.args = "%s: malformed request (400): %s", (
                record.getMessage(), what[:200])
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


class _Refused(asyncio.Protocol):
    """A connection over server.max_connections: closed on arrival."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ConnectionCap:
    """A protocol factory around aiohttp's that admits at most `limit` connections,
    each starting on the fast path of `front` (see fast.py)."""

    def __init__(self, factory: Any, limit: int, front: FastFront | None = None) -> None:
        self.factory = factory
        self.front = front
        self.limit = limit
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        # Counted at connection_made: a burst accepted in one loop iteration may pass
        # the limit by its size before the count catches up (the backlog bounds it).
        if self.open >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("server.max_connections (%d) reached; closed %d connection(s)",
                            self.limit, self.refused)
            return _Refused()
        return FrontConnection(self, self.front, self.factory)


async def serve_app(
    app: web.Application,
    settings: Any,
    sockets: Sequence[socket.socket],
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Run `app` on the already bound `sockets` until SIGINT or SIGTERM, then stop
    gracefully. `on_ready` runs once connections are accepted."""
    server = settings.server
    runner = web.AppRunner(
        app, access_log=None, keepalive_timeout=server.keepalive_timeout,
        # In-flight branch calls get the engine's grace period, then the server exits.
        shutdown_timeout=settings.engine.shutdown_grace,
    )
    # Handlers first: a SIGTERM while Redis is being connected must still be a graceful
    # stop, not the default action (web.run_app installs them this early too).
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())
    # Added before the app starts (its signals freeze then), after the engine's own
    # shutdown hook, so that waiting submits are told ONGOING before the drain waits.
    front = FastFront(app, server, grace=settings.engine.shutdown_grace,
                      metrics=app.get(METRICS))
    app.on_shutdown.append(front.drain)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listeners: list[asyncio.AbstractServer] = []
    try:
        await runner.setup()
        cap = ConnectionCap(runner.server, server.max_connections, front)
        for sock in sockets:
            listeners.append(await loop.create_server(cap, sock=sock, backlog=1024))
        on_ready()
        await stop.wait()
    finally:
        for listener in listeners:
            listener.close()
        await runner.cleanup()
