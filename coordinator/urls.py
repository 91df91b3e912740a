"""Which URLs the coordinator may be asked to call: the scheme rule and the host allowlist.

Every URL a client hands over (saga actions and compensations, msg actions,
`query_prepared`, tcc confirm/cancel, xa branch URLs, topic subscribers) passes
`check_url` when it arrives, so a URL the engine could never call, or must not call,
is a 400 naming the field rather than a transaction retried until it times out.

Schemes: lowercase `http` and `https` are what the HTTP branch caller speaks. A
transaction whose protocol is `grpc` may also name gRPC targets as go-zero writes them
(`host:port/pkg.Svc/Method`, `etcd://h1:2379[,h2]/key/pkg.Svc/Method`, `discov://…`);
their hosts (the service's, or the etcd members') go through the allowlist too.

This is a policy of the server, not of one wire format, so the service layer applies
it to the typed requests of every front end (HTTP, JSON-RPC, gRPC).

The allowlist (`engine.allowed_branch_hosts`) holds host names, `host:port`, wildcards
(`*.svc.local`, any depth of subdomain, not the bare domain) and CIDRs (`10.0.0.0/8`,
matching IP literals only: names are not resolved at submit time). Empty allows all.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from coordinator.errors import BadRequest
from coordinator.machines.msg import TOPIC_PREFIX
from coordinator.model import Trans
from coordinator.registry.target import (
    TargetError,
    parse_etcd_target,
    split_server_method,
)

MAX_URL = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}
# Longer URLs are worked out anew each time: with this and the entry count a cache of
# URL results holds at most about a megabyte, whatever URLs clients send.
MAX_CACHED_URL = 512

T = TypeVar("T")


class UrlCache(Generic[T]):
    """What was worked out from a URL string, for the URLs the engine calls again and
    again (a participant's few endpoints). At most `size` URLs of at most
    MAX_CACHED_URL characters are kept, the oldest dropped first."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: dict[str, T] = {}

    def get(self, url: str) -> T | None:
        return self._items.get(url)

    def put(self, url: str, value: T) -> None:
        if len(url) > MAX_CACHED_URL:
            return
        items = self._items
        if len(items) >= self.size:
            del items[next(iter(items))]
        items[url] = value

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class HostPort:
    host: str  # lowercase; IPv6 without brackets
    port: int


def _split_host_port(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port`; raises ValueError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(text)
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(text)
    if not port_text:
        return host.lower(), None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(text)
    return host.lower(), int(port_text)


@dataclass(frozen=True)
class _Rule:
    host: str = ""  # exact host, or the suffix after "*." for a wildcard
    wildcard: bool = False
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None  # None: any port

    def matches(self, target: HostPort) -> bool:
        if self.port is not None and self.port != target.port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(target.host) in self.network
            except ValueError:
                return False
        if self.wildcard:
            return target.host.endswith("." + self.host)
        return target.host == self.host


def _rule(entry: str) -> _Rule:
    text = entry.strip()
    if "/" in text:
        return _Rule(network=ipaddress.ip_network(text, strict=False))
    host, port = _split_host_port(text)
    if host.startswith("*."):
        return _Rule(host=host[2:], wildcard=True, port=port)
    if "*" in host:
        raise ValueError(entry)
    return _Rule(host=host, port=port)


class HostAllowlist:
    """`engine.allowed_branch_hosts` compiled once; empty allows every host."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries = tuple(entries)
        rules = []
        for entry in self.entries:
            try:
                rules.append(_rule(entry))
            except ValueError:
                raise ValueError(
                    f"engine.allowed_branch_hosts: {entry!r} is not a host, host:port, "
                    "*.domain or CIDR"
                ) from None
        self._rules = tuple(rules)

    def allows(self, target: HostPort) -> bool:
        return not self._rules or any(r.matches(target) for r in self._rules)


def _http_target(url: str, field: str) -> list[HostPort]:
    """The rule for http and json-rpc transactions: lowercase http(s) with a host."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL", NFKC-unsafe netloc …
        raise BadRequest(f"{field}: not a URL: {exc}", field) from None
    # urlsplit lowercases the scheme; "HTTP://" must still be refused, as the
    # caller only recognises the lowercase form.
    scheme = url.split(":", 1)[0]
    if scheme not in DEFAULT_PORTS:
        raise BadRequest(
            f"{field}: scheme {scheme[:20]!r} cannot be called; use http:// or https://", field
        )
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise BadRequest(f"{field}: the URL's port is not a number 1-65535", field) from None
    if not parts.hostname:
        raise BadRequest(f"{field}: the URL has no host", field)
    if not HOST_NAME.match(parts.hostname):
        raise BadRequest(
            f"{field}: the host must be ASCII letters, digits, '.', '-' (IDNA-encode "
            "names) or an IP address", field,
        )
    return [HostPort(parts.hostname.lower(), port)]


def _grpc_target(url: str, field: str) -> list[HostPort]:
    """The rule for grpc transactions: gRPC targets, or http(s) URLs as for http."""
    if url.startswith(("http://", "https://")):
        return _http_target(url, field)
    try:
        server, _ = split_server_method(url)
        hosts = (parse_etcd_target(server).endpoints if "://" in server else (server,))
        found = [_split_host_port(h) for h in hosts]
    except (TargetError, ValueError) as exc:
        raise BadRequest(f"{field}: {exc}", field) from None
    # The target parser insists on host:port, so every port is there.
    return [HostPort(host, port or 0) for host, port in found]


# Host names (ASCII: IDNA-encoded), IPv4 and IPv6 (brackets removed); the lean HTTP/1.1
# client checks the same before it writes a Host header.
HOST_NAME = re.compile(r"^[0-9A-Za-z._:\-]+\Z")


# protocol → rule returning the hosts a URL makes the coordinator connect to, each
# checked against the allowlist.
_SCHEME_RULES: dict[str, Callable[[str, str], list[HostPort]]] = {
    "http": _http_target,
    "json-rpc": _http_target,
    "grpc": _grpc_target,
}


class UrlPolicy:
    """The scheme rules plus the host allowlist; one per server.

    The allowlist is the one of the settings the server started with (they are read
    once), so a URL that passed keeps passing: such URLs are remembered per protocol,
    which spares the engine the parse on each branch call.
    """

    def __init__(self, allowed_hosts: Iterable[str] = ()) -> None:
        self._hosts = HostAllowlist(allowed_hosts)
        self._passed: dict[str, UrlCache[bool]] = {p: UrlCache() for p in _SCHEME_RULES}

    @property
    def hosts(self) -> HostAllowlist:
        return self._hosts

    def check(self, url: str, field: str, protocol: str = "http") -> None:
        """Raise BadRequest naming `field` unless `url` may be called. Empty is allowed
        (dtm: an empty branch URL succeeds without a call)."""
        if not url or self._passed_before(url, protocol):
            return
        self._check(url, field, protocol)
        passed = self._passed.get(protocol)
        if passed is not None:
            passed.put(url, True)

    def _passed_before(self, url: str, protocol: str) -> bool:
        passed = self._passed.get(protocol)
        return passed is not None and bool(passed.get(url))

    def _check(self, url: str, field: str, protocol: str) -> None:
        if len(url) > MAX_URL:
            raise BadRequest(f"{field}: URL longer than {MAX_URL} characters", field)
        # Spaces and non-ASCII are percent-encoded when the call is made (as Go's
        # client does for dtm); control characters have no meaning in a URL.
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise BadRequest(f"{field}: URL contains control characters", field)
        rule = _SCHEME_RULES.get(protocol, _http_target)
        for target in rule(url, field):
            if not self.hosts.allows(target):
                raise BadRequest(
                    f"{field}: host {target.host}:{target.port} is not in "
                    "engine.allowed_branch_hosts", field,
                )

    def check_trans(self, trans: Trans) -> None:
        """Every URL a prepare/submit names: step actions and compensations (topics are
        resolved to subscribers, checked when they subscribed) and query_prepared."""
        protocol = trans.protocol
        for i, step in enumerate(trans.steps):
            for key in ("action", "compensate"):
                value = step.get(key)
                # Empty and already passed URLs are let through before the field's name
                # is spelled out (only an error needs it).
                if not value or self._passed_before(value, protocol):
                    continue
                if not value.startswith(TOPIC_PREFIX):
                    self.check(value, f"steps[{i}].{key}", protocol)
        self.check(trans.query_prepared, "query_prepared", protocol)

    def allows(self, url: str, protocol: str = "http") -> bool:
        """For the engine: may a stored URL be called (allowlist changed since)?"""
        try:
            self.check(url, "url", protocol)
        except BadRequest:
            return False
        return True


OPEN = UrlPolicy()
