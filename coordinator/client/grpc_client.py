"""The SDK over dtm's gRPC API (dtmgimp.Dtm) instead of HTTP.

`DtmGrpcClient` is a `DtmClient` whose coordinator calls go over gRPC, so every
transaction class of the SDK (Saga, Msg, Tcc, Xa, WorkflowRegistry) works with it
unchanged: it translates the SDK's transaction JSON into dtm's protobuf messages and the
status codes back into the SDK's exceptions (ABORTED → TransactionFailed,
FAILED_PRECONDITION → TransactionOngoing, UNAVAILABLE/DEADLINE_EXCEEDED →
CoordinatorUnavailable, anything else → RequestRejected).

    async with DtmGrpcClient("127.0.0.1:36790") as dtm:
        saga = Saga(dtm, await new_gid(dtm)).add("127.0.0.1:9000/pb.Trans/TransOut", ...)
        await saga.submit()

Targets: ``host:port``, or a registry target such as ``etcd://127.0.0.1:2379/dtmservice``
resolved by ``resolver`` (an async callable returning the registered endpoints; by
default `coordinator.client.registry.resolve_target`, which reads go-zero's etcd keys).
Branch calls the SDK makes itself (TCC try, XA action) go over gRPC to
``host:port/pkg.Service/Method`` URLs, with dtm's metadata and the raw body; ``http://``
URLs are still called over HTTP.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import orjson
from google.protobuf import empty_pb2

from coordinator.client.errors import (
    BranchCallError,
    CoordinatorUnavailable,
    RequestRejected,
    TransactionFailed,
    TransactionOngoing,
)
from coordinator.client.http import BranchReply, DtmClient
from coordinator.client.registry import resolve_target
from coordinator.dtmgpb import dtmgimp_pb2 as pb
from coordinator.dtmgpb import dtmgimp_pb2_grpc as pb_grpc
from coordinator.registry.target import TargetError, split_server_method

Resolver = Callable[[str], Awaitable[list[str]]]

_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# registerBranch fields that are the request's own, not entries of its Data map.
_BRANCH_KEYS = frozenset({"gid", "trans_type", "branch_id", "data"})


def split_grpc_url(url: str) -> tuple[str, str]:
    """``host:port/pkg.Service/Method`` → (``host:port``, ``/pkg.Service/Method``);
    for ``etcd://h:2379/key/pkg.Service/Method`` the server keeps scheme, hosts and the
    key's first segment, as dtmdriver-gozero's ParseServerMethod does (the coordinator's
    own reading of these URLs, so the SDK and the engine call the same servers)."""
    try:
        return split_server_method(url)
    except TargetError as exc:
        raise ValueError(
            f"not a gRPC branch URL host:port/pkg.Service/Method: {url!r} ({exc})"
        ) from None


def trans_message(body: Mapping[str, Any]) -> pb.DtmRequest:
    """The SDK's transaction JSON as dtm's DtmRequest."""
    steps = body.get("steps")
    concurrent = bool(body.get("concurrent"))
    custom = str(body.get("custom_data") or "")
    if concurrent and not custom:
        # DtmRequest has no concurrent flag: dtm carries it in the custom data.
        custom = orjson.dumps({"concurrent": True}).decode()
    return pb.DtmRequest(
        Gid=str(body.get("gid") or ""),
        TransType=str(body.get("trans_type") or ""),
        TransOptions=pb.DtmTransOptions(
            WaitResult=bool(body.get("wait_result")),
            TimeoutToFail=int(body.get("timeout_to_fail") or 0),
            RetryInterval=int(body.get("retry_interval") or 0),
            BranchHeaders=dict(body.get("branch_headers") or {}),
            RequestTimeout=int(body.get("request_timeout") or 0),
            RetryLimit=int(body.get("retry_limit") or 0),
        ),
        CustomedData=custom,
        BinPayloads=[str(p or "").encode() for p in body.get("payloads") or []],
        QueryPrepared=str(body.get("query_prepared") or ""),
        Steps=orjson.dumps(steps).decode() if steps else "null",
        ReqExtra=dict(body.get("req_extra") or {}),
        RollbackReason=str(body.get("rollback_reason") or ""),
    )


def branch_message(body: Mapping[str, Any]) -> pb.DtmBranchRequest:
    data = {k: str(v) for k, v in body.items() if k not in _BRANCH_KEYS and v is not None}
    return pb.DtmBranchRequest(
        Gid=str(body.get("gid") or ""), TransType=str(body.get("trans_type") or ""),
        BranchID=str(body.get("branch_id") or ""), Op=data.get("op", ""), Data=data,
        BusiPayload=str(body.get("data") or "").encode(),
    )


def progresses_json(reply: pb.DtmProgressesReply) -> dict[str, Any]:
    """PrepareWorkflow's answer in the shape of the HTTP API's JSON."""
    t = reply.Transaction
    return {
        "transaction": {"gid": t.Gid, "status": t.Status, "trans_type": "workflow",
                        "rollback_reason": t.RollbackReason, "result": t.Result},
        "progresses": [
            {"status": p.Status, "branch_id": p.BranchID, "op": p.Op,
             "bin_data": base64.b64encode(p.BinData).decode()}
            for p in reply.Progresses
        ],
    }


def _coordinator_error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    code, details = exc.code(), str(exc.details() or "")
    if code == grpc.StatusCode.ABORTED:
        return TransactionFailed(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return TransactionOngoing(details)
    if code in _UNAVAILABLE:
        return CoordinatorUnavailable(f"{what}: {code.name}: {details}")
    return RequestRejected(code.value[0], f"{code.name}: {details}")


class DtmGrpcClient(DtmClient):
    """Talks to a coordinator (ours or dtm) over dtm's gRPC API at ``target``."""

    def __init__(
        self, target: str, *, timeout: float = 35.0, resolver: Resolver | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(target, timeout=timeout)
        self.target = target
        self.resolver = resolver
        self.metadata = tuple((metadata or {}).items())  # e.g. authorization: Bearer …
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stub: pb_grpc.DtmStub | None = None

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(None)
        self._stub = None
        await super().close()

    async def _endpoint(self, target: str) -> str:
        if "://" not in target:
            return target
        resolver = self.resolver or resolve_target
        endpoints = await resolver(target)
        if not endpoints:
            raise CoordinatorUnavailable(f"{target}: no endpoint is registered")
        return random.choice(endpoints)

    async def _channel(self, target: str) -> grpc.aio.Channel:
        # One channel per server, kept open: gRPC multiplexes every call over it.
        channel = self._channels.get(target)
        if channel is None:
            channel = grpc.aio.insecure_channel(await self._endpoint(target))
            self._channels[target] = channel
        return channel

    async def stub(self) -> pb_grpc.DtmStub:
        if self._stub is None:
            self._stub = pb_grpc.DtmStub(await self._channel(self.target))
        return self._stub

    async def _rpc(self, name: str, request: Any) -> Any:
        method = getattr(await self.stub(), name)
        try:
            return await method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise _coordinator_error(exc, f"{name} at {self.target}") from exc

    async def post(self, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """prepare, submit, abort, registerBranch and prepareWorkflow over gRPC."""
        if op in ("prepare", "submit", "abort"):
            await self._rpc(op.capitalize(), trans_message(body))
        elif op in ("registerBranch", "registerTccBranch", "registerXaBranch"):
            await self._rpc("RegisterBranch", branch_message(body))
        elif op == "prepareWorkflow":
            reply = progresses_json(await self._rpc("PrepareWorkflow", trans_message(body)))
            # dtm's reply has no custom data (the workflow's name and recorded input):
            # a resumed workflow runs on the input given now, as dtm's gRPC client does.
            reply["transaction"]["custom_data"] = body.get("custom_data") or ""
            return reply
        else:
            raise RequestRejected(0, f"{op} is not part of dtm's gRPC API")
        return {"dtm_result": "SUCCESS"}

    async def get(self, op: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """newGid, subscribe and unsubscribe over gRPC; the rest is HTTP-only in dtm."""
        q = params or {}
        if op == "newGid":
            reply = await self._rpc("NewGid", empty_pb2.Empty())
            return {"gid": reply.Gid, "dtm_result": "SUCCESS"}
        if op in ("subscribe", "unsubscribe"):
            topic = pb.DtmTopicRequest(Topic=q.get("topic", ""), URL=q.get("url", ""),
                                       Remark=q.get("remark", ""))
            await self._rpc(op.capitalize(), topic)
            return {"dtm_result": "SUCCESS"}
        raise RequestRejected(0, f"{op} is not part of dtm's gRPC API; use the HTTP API")

    async def delete_topic(self, topic: str) -> None:
        await self._rpc("DeleteTopic", pb.DtmTopicRequest(Topic=topic))

    async def call_branch(
        self, url: str, *, body: str, params: Mapping[str, str],
        headers: Mapping[str, str] | None = None, timeout: float | None = None,
    ) -> BranchReply:
        """Call a branch as the coordinator would: gRPC for gRPC URLs, else HTTP."""
        if url.startswith(("http://", "https://")):
            return await super().call_branch(url, body=body, params=params, headers=headers,
                                             timeout=timeout)
        try:
            server, method = split_grpc_url(url)
        except ValueError as exc:
            raise BranchCallError(url, str(exc)) from None
        metadata = [(f"dtm-{k}", v) for k, v in params.items()]
        metadata += [(k.lower(), v) for k, v in (headers or {}).items()]
        # No (de)serializers: the body goes out as the raw bytes, as dtm's raw codec sends it.
        call = (await self._channel(server)).unary_unary(method, None, None)
        try:
            reply = await call(body.encode(), timeout=timeout or self.timeout,
                               metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), str(exc.details() or "")
            if code == grpc.StatusCode.FAILED_PRECONDITION or (
                code == grpc.StatusCode.ABORTED and details == "ONGOING"
            ):
                raise TransactionOngoing(details) from exc
            if code == grpc.StatusCode.ABORTED:
                raise TransactionFailed(details) from exc
            raise BranchCallError(url, f"{code.name}: {details}") from exc
        return BranchReply(200, bytes(reply).decode(errors="replace"))
