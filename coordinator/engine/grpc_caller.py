"""Calls gRPC branches the way dtm does for transactions submitted over gRPC.

A branch URL names a server and a method (see coordinator/registry/target.py):
``host:port/pkg.Service/Method`` is dialled directly, ``etcd://…/<key>/pkg.Service/Method``
(or ``discov://``) through a resolver that watches go-zero's registry. The request body
is the payload's bytes exactly as submitted: the channel has no serializer, as dtm's raw
codec, so a protobuf message the client encoded reaches the branch unchanged. The
transaction travels as metadata (``dtm-gid``, ``dtm-trans_type``, ``dtm-branch_id``,
``dtm-op``, ``dtm-dtm``, the branch headers, ``dtm-phase2_url`` for XA).

Status codes as dtm reads them: OK is success; ABORTED is failure, except that an
ABORTED whose message is exactly ``ONGOING`` is ongoing (old clients answer that way);
FAILED_PRECONDITION is ongoing; anything else is an error, retried with back-off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from coordinator.machines.base import SUCCESS, Outcome, OutcomeKind
from coordinator.model import Branch, Trans
from coordinator.registry.resolver import Resolvers
from coordinator.registry.target import TargetError, is_registry_url, split_server_method

_MAX_MESSAGE = 300
UnaryCall = Callable[..., "grpc.aio.UnaryUnaryCall[bytes, bytes]"]


def _identity(data: bytes) -> bytes:
    return data


class GrpcBranchCaller:
    def __init__(self, default_timeout: float, resolvers: Resolvers, dtm_address: str = "",
                 resolve_timeout: float = 3.0) -> None:
        self.default_timeout = default_timeout
        self.resolvers = resolvers
        # What a branch is told the coordinator's address is (dtm's `dtm-dtm`).
        self.dtm_address = dtm_address
        self.resolve_timeout = resolve_timeout
        # One channel per address, reused by every call to it (grpc multiplexes them).
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._methods: dict[tuple[str, str], UnaryCall] = {}
        # The endpoint list last seen per registry server, and addresses dialled directly:
        # a channel to an endpoint that left the registry (and is not dialled directly)
        # is closed, so endpoints that come and go do not pile up open channels.
        self._resolved: dict[str, tuple[str, ...]] = {}
        self._direct: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses with an open channel."""
        return tuple(self._channels)

    async def call(self, trans: Trans, branch: Branch, body: bytes) -> Outcome:
        try:
            server, method = split_server_method(branch.url)
        except TargetError as exc:
            return Outcome(OutcomeKind.ERROR, str(exc)[:_MAX_MESSAGE])
        address = await self._address(server)
        if address is None:
            return Outcome(OutcomeKind.ERROR, f"no endpoint registered for {server}")
        seconds = trans.options.request_timeout or self.default_timeout
        try:
            await self._method(address, method)(
                body, timeout=seconds, metadata=self._metadata(trans, branch)
            )
        except grpc.aio.AioRpcError as exc:
            return classify(exc.code(), exc.details() or "")
        except (ValueError, TypeError, OSError, TimeoutError) as exc:
            # A header value grpc will not send, or the like: report, retry later.
            return Outcome(OutcomeKind.ERROR, f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE])
        return SUCCESS

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._methods.clear()
        for channel in channels:
            await channel.close(None)
        for task in list(self._closing):
            await task

    async def _address(self, server: str) -> str | None:
        """host:port to dial: the server itself, or the next endpoint of its registry key."""
        if not is_registry_url(server):
            self._direct.add(server)
            return server
        resolver = self.resolvers.get(server)
        if not resolver.ready.is_set():
            await resolver.wait_ready(self.resolve_timeout)
        endpoints = resolver.endpoints
        previous = self._resolved.get(server, ())
        if endpoints is not previous:
            self._resolved[server] = endpoints
            self._drop(set(previous) - set(endpoints))
        return resolver.pick()

    def _drop(self, gone: set[str]) -> None:
        in_use = self._direct.union(*self._resolved.values())
        for address in gone - in_use:
            channel = self._channels.pop(address, None)
            if channel is None:
                continue
            for key in [k for k in self._methods if k[0] == address]:
                del self._methods[key]
            # Calls still running on it get the usual deadline to finish.
            task = asyncio.create_task(channel.close(self.default_timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _method(self, address: str, method: str) -> UnaryCall:
        call = self._methods.get((address, method))
        if call is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.aio.insecure_channel(address)
                self._channels[address] = channel
            # No serializers: the body goes out as the bytes it is (dtm's raw codec).
            call = channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
            self._methods[(address, method)] = call
        return call

    def _metadata(self, trans: Trans, branch: Branch) -> list[tuple[str, str | bytes]]:
        pairs: list[tuple[str, str | bytes]] = [
            ("dtm-gid", trans.gid),
            ("dtm-trans_type", trans.trans_type),
            ("dtm-branch_id", branch.branch_id),
            ("dtm-op", branch.op_name),
            ("dtm-dtm", self.dtm_address),
        ]
        if trans.trans_type == "xa":
            pairs.append(("dtm-phase2_url", branch.url))
        for headers in (trans.ext_headers, trans.options.branch_headers):
            for key, value in headers.items():
                name = key.lower()  # grpc metadata keys are lower case
                pairs.append((name, value.encode() if name.endswith("-bin") else value))
        return pairs


def classify(code: grpc.StatusCode, message: str) -> Outcome:
    text = f"{code.name}: {message}"[:_MAX_MESSAGE]
    if code == grpc.StatusCode.ABORTED:
        kind = OutcomeKind.ONGOING if message == "ONGOING" else OutcomeKind.FAILURE
        return Outcome(kind, text)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Outcome(OutcomeKind.ONGOING, text)
    if code == grpc.StatusCode.OK:
        return SUCCESS
    return Outcome(OutcomeKind.ERROR, text)
