"""An aetcd client that also speaks TLS and knows several etcd members.

aetcd (the maintained asyncio etcd v3 client) opens only plaintext channels to one
host. dtm's open issue #557 asks for client certificates, so `connect` is overridden
here to open a secure channel when certificates are configured; everything else
(KV, leases, watches, auth) is aetcd's own. With several members, `rotate` moves the
next connection to the next member, so the publisher and the resolver fail over.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from coordinator.registry.target import EtcdTarget

# Errors that mean "etcd is not there right now": retry later, maybe on another member.
ETCD_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    grpc.RpcError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True)
class EtcdTls:
    """PEM files: the CA that signed etcd's certificate, and our client certificate."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


class EtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd.Client over TLS when asked, with fail-over between the target's members."""

    def __init__(self, target: EtcdTarget, tls: EtcdTls | None = None,
                 timeout: float = 5.0) -> None:
        self.target = target
        self._member = 0
        host, port = _split(target.endpoints[0])
        super().__init__(
            host=host, port=port, username=target.user or None,
            password=target.password or None, timeout=timeout,
        )
        self._tls = tls if tls is not None and tls.enabled else None
        # Read the files once: a bad path should fail at start-up, not on every retry.
        self._credentials = self._tls.credentials() if self._tls else None

    @property
    def member(self) -> str:
        return self.target.endpoints[self._member]

    async def rotate(self) -> None:
        """Drop the connection; the next call connects to the next member."""
        await self.close_quietly()
        self._member = (self._member + 1) % len(self.target.endpoints)
        self._host, port = _split(self.member)
        self._port = port

    async def close_quietly(self) -> None:
        try:
            await self.close()
        except ETCD_ERRORS:
            self._init_channel_attrs()
            self._connected.clear()

    async def connect(self) -> None:
        """aetcd's connect, with a secure channel when TLS is configured."""
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]  # set by aetcd.Client
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._credentials is not None:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options)
            else:
                self.channel = grpc.aio.insecure_channel(target, options)
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def describe_error(exc: BaseException) -> str:
    """One line for a log: grpc errors carry their detail in a method, not in str()."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    cause: Any = exc.__cause__ or exc.__context__
    if isinstance(cause, grpc.aio.AioRpcError):
        return f"{type(exc).__name__}: {cause.code().name}: {cause.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
