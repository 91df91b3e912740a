"""What `coordinator serve` and `coordinator demo` check before they say they are ready.

A new user's first mistakes (a port already taken, a Redis URL that is wrong or points
nowhere, a data directory another coordinator holds) must end in one line on stderr and a
non-zero exit, never in a traceback, and never after the server has claimed to be ready.
So the checks run in the order that is cheapest to undo:

1. bind the listening sockets (nothing else runs yet, so a busy port costs nothing);
2. parse the configured Redis URL and PING it once, without retries;
3. only then start the private redis-server and the application, on the sockets
   already bound, so nothing after "ready" can still fail for the port.

The sockets are bound *and listening* here: connections that arrive while the rest
starts wait in the backlog instead of being refused.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import Final, NoReturn

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from coordinator.embedded_redis import SOCKET_NAME, EmbeddedRedisError, find_redis_server
from coordinator.settings import Settings

__all__ = [
    "StartupError",
    "bind_listeners",
    "check_redis",
    "describe_listeners",
    "describe_redis",
    "exit_with",
    "prepare",
    "redact",
]

_BACKLOG: Final = 128  # aiohttp's default, which create_server would otherwise apply
# How long the start-up PING may take: long enough for a Redis across a slow network,
# short enough that a wrong address is reported while the user still waits for it.
_PING_TIMEOUT: Final = 5.0


class StartupError(Exception):
    """A start-up failure the user can fix; its message is the whole report."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_with(message: str, code: int) -> NoReturn:
    print(f"coordinator: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def bind_listeners(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind and listen on every address `host` resolves to, as aiohttp's TCPSite would.

    Raises StartupError naming the address when one cannot be bound; any socket bound
    before it is closed again.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:  # getaddrinfo may repeat an address
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Each address gets its own socket, as asyncio does: no dual-stack surprises.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                where = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                hint = " (another process is listening there)" if (
                    exc.errno == errno.EADDRINUSE) else ""
                raise StartupError(
                    f"cannot listen on {where}:{port}: {exc.strerror}{hint}"
                ) from None
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL redis-py cannot use, naming the setting (exit code 2)."""
    try:
        parse_url(url)
    except (ValueError, TypeError) as exc:
        raise StartupError(f"redis.url {redact(url)!r} is not a Redis URL: {exc}", 2) from None


async def check_redis(url: str) -> None:
    """PING the configured Redis once; unreachable or refusing it is a start-up error."""
    check_redis_url(url)
    client = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=_PING_TIMEOUT,
        socket_timeout=_PING_TIMEOUT,
        # One attempt: retrying here only delays the message the user is waiting for.
        retry=Retry(NoBackoff(), 0),
    )
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise StartupError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        await client.aclose()


async def prepare(settings: Settings, *, reuse_port: bool = False) -> list[socket.socket]:
    """Everything that may fail before the application starts: the sockets, then Redis."""
    sockets = bind_listeners(settings.server.host, settings.server.port, reuse_port=reuse_port)
    try:
        if settings.server.grpc_port:
            # Only a probe: grpc binds its own socket later, but a taken port must be
            # one line now, not a traceback after the private Redis has started.
            try:
                probes = bind_listeners(
                    settings.server.host, settings.server.grpc_port, reuse_port=reuse_port
                )
            except StartupError as exc:
                raise StartupError(f"gRPC API (--grpc-port): {exc}") from None
            for probe in probes:
                probe.close()
        if settings.redis.url:
            await check_redis(settings.redis.url)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def redact(url: str) -> str:
    """The URL with its password (in the user part or the query) replaced by ***."""
    # On the text itself: urlsplit().geturl() would turn unix:///path into unix:/path.
    url = _USERINFO_PASSWORD.sub(r"\1:***@", url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


_USERINFO_PASSWORD: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^/?#]*@")
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)[^&#]*")


def describe_listeners(sockets: list[socket.socket]) -> str:
    names = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"http://[{host}]:{port}" if sock.family == socket.AF_INET6
                     else f"http://{host}:{port}")
    return ", ".join(names)


def describe_redis(settings: Settings) -> str:
    """Where the state lives: the configured URL, or the private server's socket."""
    if settings.redis.url:
        return f"Redis {redact(settings.redis.url)}"
    data_dir = Path(settings.redis.data_dir).expanduser().absolute()
    try:
        binary = find_redis_server()
    except EmbeddedRedisError:
        binary = "redis-server"
    return (f"private Redis on unix socket {data_dir / SOCKET_NAME} "
            f"({binary}, data in {data_dir}{os.sep})")
