"""A programmable gRPC participant: a real grpc.aio server taking any method as raw bytes.

Each method answers from a queue of replies (the last one repeats): a status code and a
message. Every call is recorded with its metadata and its body exactly as received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests.support import free_port


@dataclass
class GrpcCall:
    method: str
    metadata: dict[str, str]
    body: bytes
    started: float
    code: grpc.StatusCode | None = None  # None until answered (never, if cancelled)
    # Seconds after which the caller gave up (its deadline), if it did.
    cancelled_after: float | None = None

    @property
    def op(self) -> str:
        return self.metadata.get("dtm-op", "")


GrpcReply = tuple[grpc.StatusCode, str]
OK: GrpcReply = (grpc.StatusCode.OK, "")
FAILURE: GrpcReply = (grpc.StatusCode.ABORTED, "business refused")
ONGOING: GrpcReply = (grpc.StatusCode.FAILED_PRECONDITION, "not yet")
OLD_ONGOING: GrpcReply = (grpc.StatusCode.ABORTED, "ONGOING")
ERROR: GrpcReply = (grpc.StatusCode.UNAVAILABLE, "try again")


@dataclass
class GrpcParticipant:
    port: int = 0
    delay: float = 0.0
    calls: list[GrpcCall] = field(default_factory=list)
    # The client addresses calls came from: one per connection the caller opened.
    peers: set[str] = field(default_factory=set)
    # Method -> seconds the first call of it takes (later ones take `delay`).
    slow_first: dict[str, float] = field(default_factory=dict)
    _plans: dict[str, list[GrpcReply]] = field(default_factory=dict)
    _server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, method: str) -> str:
        """A direct branch URL, host:port/pkg.Service/Method."""
        return f"{self.address}/busi.Busi/{method}"

    def slow(self, method: str, seconds: float) -> None:
        self.slow_first[f"/busi.Busi/{method}"] = seconds

    def plan(self, method: str, *replies: GrpcReply) -> None:
        self._plans[f"/busi.Busi/{method}"] = list(replies)

    def calls_to(self, method: str, gid: str | None = None) -> list[GrpcCall]:
        return [c for c in self.calls if c.method == f"/busi.Busi/{method}"
                and (gid is None or c.metadata.get("dtm-gid") == gid)]

    def _handler(self, method: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def handle(body: bytes, context: Any) -> bytes:
            call = GrpcCall(method, {k: v for k, v in context.invocation_metadata()
                                     if isinstance(v, str)}, body, time.monotonic())
            self.calls.append(call)
            self.peers.add(context.peer())
            delay = self.slow_first.pop(method, self.delay)
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                call.cancelled_after = time.monotonic() - call.started
                raise
            queue = self._plans.get(method) or [OK]
            code, message = queue.pop(0) if len(queue) > 1 else queue[0]
            call.code = code
            if code != grpc.StatusCode.OK:
                await context.abort(code, message)
            return b""

        return handle

    async def start(self) -> GrpcParticipant:
        participant = self

        class Any_(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                # No (de)serializers: the handler sees the bytes as they came.
                return grpc.unary_unary_rpc_method_handler(participant._handler(details.method))

        self.port = self.port or free_port()
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((Any_(),))
        self._server.add_insecure_port(self.address)
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
