"""dtm's gRPC API, service `dtmgimp.Dtm`: protobuf in, the same service layer, status codes out.

The servicer only translates: each RPC turns its message into the typed request the HTTP
front would build from JSON (through the same validation in `api/wire.py`), calls
`Service`, and answers with a status code instead of dtm's envelope:
failure → ABORTED (the message is the reason), ongoing → FAILED_PRECONDITION,
bad input → INVALID_ARGUMENT, unknown gid → NOT_FOUND, store down → UNAVAILABLE,
missing operator token → UNAUTHENTICATED.

Branch bodies arrive as raw bytes (BinPayloads, BusiPayload) and are stored as text
decoded as latin-1 (one character per byte) with the transaction's protocol "grpc";
`Trans.payload_bytes` gives the same bytes back for the branch call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar, cast

import grpc
import orjson
import redis.exceptions
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

from coordinator.api.auth import bearer_value, token_matches
from coordinator.api.wire import check_gid, parse_register, parse_trans
from coordinator.dtmgpb import dtmgimp_pb2 as pb
from coordinator.dtmgpb import dtmgimp_pb2_grpc as pb_grpc
from coordinator.errors import (
    BadRequest,
    NotFound,
    StoreUnavailable,
    TransactionFailure,
    TransactionOngoing,
    Unauthorized,
)
from coordinator.model import Status
from coordinator.requests import GidRequest, TransRequest
from coordinator.service import Service, new_gid
from coordinator.settings import Settings
from coordinator.startup import StartupError

log = logging.getLogger("coordinator.grpc")

Context = grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]
_R = TypeVar("_R")

# First match wins: StatusConflict is a TransactionFailure, so it answers ABORTED too.
CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    # A store that cannot be reached, as far as the store layer lets it through raw.
    (redis.exceptions.ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (redis.exceptions.TimeoutError, grpc.StatusCode.UNAVAILABLE),
    (TransactionFailure, grpc.StatusCode.ABORTED),
    (TransactionOngoing, grpc.StatusCode.FAILED_PRECONDITION),
)


def _steps(text: str) -> Any:
    """dtm's Go client sends the steps as a JSON string, "null" for TCC and XA."""
    if text in ("", "null"):
        return []
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Steps is not valid JSON: {exc}", "Steps") from None


def trans_request(req: pb.DtmRequest, status: Status) -> TransRequest:
    """A DtmRequest as the transaction JSON the HTTP front reads, then the same checks."""
    o = req.TransOptions
    body = {
        "gid": req.Gid,
        "trans_type": req.TransType,
        "steps": _steps(req.Steps),
        "payloads": [p.decode("latin-1") for p in req.BinPayloads],
        "custom_data": req.CustomedData,
        "query_prepared": req.QueryPrepared,
        "protocol": "grpc",
        "rollback_reason": req.RollbackReason,
        "req_extra": dict(req.ReqExtra),
        "wait_result": o.WaitResult,
        "timeout_to_fail": o.TimeoutToFail,
        "request_timeout": o.RequestTimeout,
        "retry_interval": o.RetryInterval,
        "retry_limit": o.RetryLimit,
        "branch_headers": dict(o.BranchHeaders),
    }
    return parse_trans(body, status)


class DtmServicer(pb_grpc.DtmServicer):
    def __init__(self, service: Service, settings: Settings) -> None:
        self.service = service
        server = settings.server
        # As over HTTP: the transaction RPCs need the token only with
        # protect_transaction_routes, the topic RPCs (operator routes) whenever it is set.
        self.token = server.api_token if server.protect_transaction_routes else ""
        self.operator_token = server.api_token

    async def _answer(
        self, context: Context, run: Callable[[], Awaitable[_R]], empty: _R,
        operator: bool = False,
    ) -> _R:
        try:
            token = self.operator_token if operator else self.token
            if token:
                auth = dict(context.invocation_metadata() or ()).get("authorization", "")
                if not token_matches(token, bearer_value(str(auth))):
                    raise Unauthorized("this call needs metadata authorization: Bearer <token>")
            return await run()
        except Exception as exc:
            code = next((c for kind, c in CODES if isinstance(exc, kind)), None)
            if code is None:
                log.exception("gRPC call failed")
                code, exc = grpc.StatusCode.INTERNAL, Exception("internal error; see the log")
            context.set_code(code)
            context.set_details(str(exc))
            return empty

    async def NewGid(self, request: empty_pb2.Empty, context: Context) -> pb.DtmGidReply:
        async def run() -> pb.DtmGidReply:
            return pb.DtmGidReply(Gid=new_gid())

        return await self._answer(context, run, pb.DtmGidReply())

    async def Submit(self, request: pb.DtmRequest, context: Context) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            await self.service.submit(trans_request(request, Status.SUBMITTED))
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty())

    async def Prepare(self, request: pb.DtmRequest, context: Context) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            await self.service.prepare(trans_request(request, Status.PREPARED))
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty())

    async def Abort(self, request: pb.DtmRequest, context: Context) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            await self.service.abort(GidRequest(
                check_gid(request.Gid), request.RollbackReason,
                request.TransOptions.WaitResult,
            ))
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty())

    async def RegisterBranch(
        self, request: pb.DtmBranchRequest, context: Context
    ) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            # dtm reads confirm/cancel (tcc), url (xa), op and status (workflow) from Data.
            fields: dict[str, str] = {"op": request.Op} if request.Op else {}
            fields.update(request.Data)
            fields.update(gid=request.Gid, trans_type=request.TransType,
                          branch_id=request.BranchID,
                          data=request.BusiPayload.decode("latin-1"))
            await self.service.register_branch(parse_register(fields))
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty())

    async def PrepareWorkflow(
        self, request: pb.DtmRequest, context: Context
    ) -> pb.DtmProgressesReply:
        async def run() -> pb.DtmProgressesReply:
            state = await self.service.prepare_workflow(trans_request(request, Status.PREPARED))
            t = state.trans
            return pb.DtmProgressesReply(
                Transaction=pb.DtmTransaction(Gid=t.gid, Status=t.status.value,
                                              RollbackReason=t.rollback_reason, Result=t.result),
                Progresses=[
                    pb.DtmProgress(Status=b.status.value, BinData=t.payload_bytes(b),
                                   BranchID=b.branch_id, Op=b.op_name)
                    for b in state.progresses
                ],
            )

        return await self._answer(context, run, pb.DtmProgressesReply())

    async def Subscribe(self, request: pb.DtmTopicRequest, context: Context) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            await self.service.subscribe(request.Topic, request.URL, request.Remark)
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty(), operator=True)

    async def Unsubscribe(
        self, request: pb.DtmTopicRequest, context: Context
    ) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            await self.service.unsubscribe(request.Topic, request.URL)
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty(), operator=True)

    async def DeleteTopic(
        self, request: pb.DtmTopicRequest, context: Context
    ) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            await self.service.delete_topic(request.Topic)
            return empty_pb2.Empty()

        return await self._answer(context, run, empty_pb2.Empty(), operator=True)


class _Corrupt:
    """What a request that is no valid protobuf decodes to, for the handler to refuse."""


def _lenient(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return _Corrupt()

    return read


# A string: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class CorruptMessages(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A request body that does not parse answers INVALID_ARGUMENT (bad input, like any
    other), where grpcio itself would answer UNKNOWN from its deserializer's exception."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        # The servicer's coroutine method, typed by grpc's stubs as a plain function.
        behaviour = cast(Callable[[Any, Any], Awaitable[Any]], handler.unary_unary)

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Corrupt):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "the request is not a valid protobuf message")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


async def start_grpc(service: Service, settings: Settings) -> grpc.aio.Server:
    """The gRPC server on `server.host`:`server.grpc_port`, in the running event loop.

    gRPC turns SO_REUSEPORT on by default; it is set from `server.reuse_port` instead,
    so a port already taken is an error at start-up, while `--workers` processes (which
    set reuse_port) share the port as they share the HTTP one.
    """
    server = grpc.aio.server(
        interceptors=[CorruptMessages()],
        options=[("grpc.so_reuseport", 1 if settings.server.reuse_port else 0)]
    )
    pb_grpc.add_DtmServicer_to_server(DtmServicer(service, settings), server)
    address = f"{settings.server.host}:{settings.server.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        # Taken between the start-up probe and now: still one line, not a traceback.
        raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from None
    await server.start()
    return server
