"""Commands packed by hiredis's C encoder instead of redis-py's Python one.

redis-py's asyncio connections build the RESP bytes of every command in Python, one
``bytes.join`` per argument; under load that is a tenth of a coordinator process's CPU
(every transaction sends two EVALSHA calls of a dozen arguments each). hiredis, which
parses the replies already, also packs commands in C. redis-py's synchronous client uses
it when available; its asyncio client does not, so the store's connections get it here.

Arguments the C encoder does not take (None, bool, anything but str/bytes/int/float)
go through redis-py's own packer, which raises its usual ``DataError`` for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)


def _split_name(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Multi-word command names ("SCRIPT LOAD") travel as separate arguments, as
    # redis-py's packer sends them.
    first = args[0]
    if isinstance(first, str) and " " in first:
        return tuple(first.split()) + args[1:]
    if isinstance(first, bytes) and b" " in first:
        return tuple(first.split()) + args[1:]
    return args


class _CPacking(AbstractConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        try:
            return [hiredis.pack_command(_split_name(args))]
        except TypeError:
            return super().pack_command(*args)

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        # One buffer for the whole pipeline: one socket write, as redis-py does.
        out: list[bytes] = []
        for cmd in commands:
            out.extend(self.pack_command(*cmd))
        return [b"".join(out)]


class CPackedConnection(_CPacking, Connection):
    """TCP."""


class CPackedUnixConnection(_CPacking, UnixDomainSocketConnection):
    """Unix socket (the embedded Redis)."""


class CPackedSSLConnection(_CPacking, SSLConnection):
    """TLS (``rediss://``)."""


_FASTER: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: CPackedConnection,
    UnixDomainSocketConnection: CPackedUnixConnection,
    SSLConnection: CPackedSSLConnection,
}


def faster(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """The C-packing variant of a redis-py connection class (itself if none is known)."""
    return _FASTER.get(connection_class, connection_class)


def use_c_packing(client: Any) -> None:
    """Give a redis-py asyncio client (one Redis or a cluster) C-packing connections.

    Called before the client opens any connection. A cluster client builds a node (and
    its pool) from its connection settings whenever it learns of one, so those settings
    and the seed nodes made already both get the class.
    """
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        kwargs = client.connection_kwargs
        kwargs["connection_class"] = faster(kwargs.get("connection_class", Connection))
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = faster(node.connection_class)  # type: ignore[assignment]
        return
    pool = client.connection_pool
    pool.connection_class = faster(pool.connection_class)
