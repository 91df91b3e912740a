"""go-zero's target formats, parsed the way dtmdriver-gozero and go-zero read them.

Registry targets (where a service is published, or where to find one):

- ``etcd://h1:2379[,h2:2379]/<key>[?user=&password=]`` (dtmdriver-gozero's form; the
  key is the path without its leading slash);
- ``etcd:///h1:2379,h2:2379?key=<key>`` (the form newer go-zero builds);
- ``discov://…`` as an alias of ``etcd://``.

gRPC branch URLs name a server and a method. dtmdriver-gozero's ``ParseServerMethod``
splits ``etcd://h1:2379/trans.rpc/pb.Trans/TransOut`` into the server
``etcd://h1:2379/trans.rpc`` (scheme + host + first path segment) and the method
``/pb.Trans/TransOut``; a URL without ``//`` (``host:port/pb.Trans/TransOut``) is split
at its first slash.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

REGISTRY_SCHEMES = ("etcd", "discov")
# A gRPC method path: /package.Service/Method (the package may be empty, as grpc allows).
_METHOD = re.compile(r"^/[A-Za-z_][\w.]*/[A-Za-z_]\w*\Z")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})\Z")


class TargetError(ValueError):
    """A target or branch URL that cannot be used; the message says why."""


@dataclass(frozen=True)
class EtcdTarget:
    """Where a go-zero registry lives and under which key a service is published."""

    endpoints: tuple[str, ...]  # host:port of each etcd member
    key: str
    user: str = ""
    password: str = ""

    @property
    def prefix(self) -> str:
        """Every instance of the service is a key under this prefix (go-zero's layout)."""
        return self.key + "/"

    def describe(self) -> str:
        """For logs: where and under what key, without the password."""
        return f"etcd {','.join(self.endpoints)} key {self.key!r}"


def is_registry_url(url: str) -> bool:
    return url.partition("://")[0] in REGISTRY_SCHEMES and "://" in url


def parse_etcd_target(target: str) -> EtcdTarget:
    """Read a registry target (see the module docstring) or raise TargetError."""
    scheme, sep, _ = target.partition("://")
    if not sep or scheme not in REGISTRY_SCHEMES:
        raise TargetError(f"registry target {target!r} must start with etcd:// or discov://")
    parts = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(parts.query)
    if parts.netloc:
        hosts, key = parts.netloc, parts.path.removeprefix("/")
    else:  # etcd:///h1:2379,h2:2379?key=k
        hosts, key = parts.path.removeprefix("/"), query.get("key", [""])[0]
    if "@" in hosts:
        raise TargetError(f"registry target {target!r}: give credentials as ?user=&password=")
    endpoints = tuple(h for h in hosts.split(",") if h)
    if not endpoints:
        raise TargetError(f"registry target {target!r} names no etcd host")
    for host in endpoints:
        if not _HOST_PORT.match(host):
            raise TargetError(f"registry target {target!r}: {host!r} is not host:port")
    key = key.strip("/")
    if not key:
        raise TargetError(f"registry target {target!r} names no key")
    user = query.get("user", [""])[0]
    password = query.get("password", [""])[0]
    return EtcdTarget(endpoints, key, user, password)


def split_server_method(url: str) -> tuple[str, str]:
    """dtmdriver-gozero's ParseServerMethod: (server, method) of a gRPC branch URL."""
    if "//" not in url:
        server, sep, rest = url.partition("/")
        if not sep:
            raise TargetError(f"bad gRPC branch URL {url!r}: no '/' found")
        method = "/" + rest
        if not _HOST_PORT.match(server):
            raise TargetError(f"bad gRPC branch URL {url!r}: {server!r} is not host:port")
    else:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in REGISTRY_SCHEMES:
            raise TargetError(
                f"bad gRPC branch URL {url!r}: scheme must be etcd:// or discov:// "
                "(or none, for host:port/pkg.Service/Method)"
            )
        path = parts.path
        index = path.find("/", 1)
        if index < 0:
            raise TargetError(f"bad gRPC branch URL {url!r}: no method after the key")
        server = f"{parts.scheme}://{parts.netloc}{path[:index]}"
        method = path[index:]
        if parts.query:
            server += "?" + parts.query
        parse_etcd_target(server)
    if not _METHOD.match(method):
        raise TargetError(f"bad gRPC branch URL {url!r}: {method!r} is not /pkg.Service/Method")
    return server, method


def validate_grpc_target(url: str) -> str | None:
    """None when `url` can be called over gRPC (or over HTTP), else why it cannot.

    The submit path calls this for every branch URL of a transaction whose protocol is
    grpc, so a typo is a 400 at once rather than a branch retried forever.
    """
    if not url or url.startswith(("http://", "https://", "topic://")):
        return None
    try:
        split_server_method(url)
    except TargetError as exc:
        return str(exc)
    return None
