"""The two banks as go-zero-style gRPC services (`pb.Trans`), published in etcd.

Each is a `grpc.aio` server on a loopback port, with the bank_transfer example's
business behind the barrier (TransOut on MariaDB, TransIn on PostgreSQL), registered
in etcd exactly as go-zero's publisher registers a zrpc service (`register_service`).
Bodies are the transfer's JSON bytes as the client sent them: the coordinator passes
them through unchanged (raw codec), so any encoding works, protobuf included.

Each service has its own key (``transout.rpc``, ``transin.rpc``), as two zrpc services
each have their own ``Etcd.Key``: every endpoint under one key is taken to serve the
same methods, and calls are spread over them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from coordinator.client import (
    BranchInfo,
    SqlBarrier,
    grpc_branch_handler,
    register_service,
)
from coordinator.registry.publisher import Publisher
from examples.bank_transfer.transfer import Business, Transfer
from examples.common import Journal, barrier_call

SERVICE = "pb.Trans"
Handler = Callable[[bytes, Any], Awaitable[bytes]]


class TransService:
    """One bank's `pb.Trans` methods on a grpc.aio server, published under ``key``."""

    def __init__(self, key: str, journal: Journal, barrier: SqlBarrier, table: str,
                 operations: tuple[tuple[str, Business], ...]) -> None:
        self.key = key
        self.journal = journal
        self.barrier = barrier
        self.table = table
        self.server = grpc.aio.server()
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            path.split("/")[1]: grpc.unary_unary_rpc_method_handler(self._guarded(
                path.split("/")[1], business))
            for path, business in operations
        }
        # The msg back-check: whether the local transaction of a message committed.
        methods["QueryPrepared"] = grpc.unary_unary_rpc_method_handler(
            grpc_branch_handler(self._query_prepared))
        # No (de)serializers: the handlers get the body's bytes as they came.
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, methods),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.publisher: Publisher | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _guarded(self, name: str, business: Business) -> Handler:
        async def handle(request: bytes, branch: BranchInfo) -> bytes:
            transfer = Transfer.parse(request)
            await barrier_call(self.journal, name, branch, self.barrier,
                               lambda conn: business(conn, transfer, self.table))
            return b""

        return grpc_branch_handler(handle)

    async def _query_prepared(self, request: bytes, branch: BranchInfo) -> bytes:
        await self.barrier.query_prepared(branch.gid)  # TransactionFailed → ABORTED
        return b""

    async def start(self, etcd: str) -> TransService:
        """Serve, then publish ``endpoint`` under ``etcd://<etcd>/<key>``."""
        await self.server.start()
        self.publisher = await register_service(f"etcd://{etcd}/{self.key}", self.endpoint)
        return self

    async def stop(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop()  # revokes the lease: the key goes at once
        await self.server.stop(1)
