"""The participant side over gRPC: branch calls into `grpc.aio` handlers, dtm's codes out.

The coordinator (and the SDK, for a TCC try or an XA action) calls a gRPC branch with
the raw body and metadata ``dtm-gid``, ``dtm-trans_type``, ``dtm-branch_id``,
``dtm-op`` (plus ``dtm-dtm`` and ``dtm-phase2_url`` where they apply). A handler wrapped
by `grpc_branch_handler` gets that as a `BranchInfo` and answers as dtm expects:

    @grpc_branch_handler
    async def trans_out(request: bytes, branch: BranchInfo) -> bytes:
        amount = orjson.loads(request)["amount"]
        await branch.barrier().call(pg_barrier, lambda conn: withdraw(conn, amount))
        return b""

Returning is success (status OK); TransactionFailed → ABORTED (a saga compensates),
TransactionOngoing → FAILED_PRECONDITION (asked again later); any other exception →
INTERNAL, which the coordinator retries. Missing metadata → INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc

from coordinator.client.errors import TransactionFailed, TransactionOngoing
from coordinator.client.participant import BranchInfo

log = logging.getLogger("coordinator.client")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Context = grpc.aio.ServicerContext[Any, Any]


def branch_info(metadata: Iterable[tuple[str, str | bytes]] | None) -> BranchInfo:
    """A `BranchInfo` from a call's metadata (``context.invocation_metadata()``)."""
    md = {str(k): v if isinstance(v, str) else v.decode() for k, v in metadata or ()}
    return BranchInfo.from_query({
        name: md.get(f"dtm-{name}", "")
        for name in ("gid", "trans_type", "branch_id", "op", "dtm", "phase2_url")
    })


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message that give dtm's answer for an exception."""
    if isinstance(exc, TransactionFailed):
        return grpc.StatusCode.ABORTED, str(exc) or "FAILURE"
    if isinstance(exc, TransactionOngoing):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc) or "ONGOING"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def grpc_branch_handler(
    fn: Callable[[_Req, BranchInfo], Awaitable[_Resp]],
) -> Callable[[_Req, Context], Awaitable[_Resp]]:
    """Turn ``fn(request, branch)`` into a grpc.aio handler ``(request, context)``."""

    @functools.wraps(fn)
    async def handle(request: _Req, context: Context) -> _Resp:
        try:
            info = branch_info(context.invocation_metadata())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            return await fn(request, info)
        except (TransactionFailed, TransactionOngoing) as exc:
            code, message = status_for(exc)
        except Exception as exc:
            log.exception("branch %s %s/%s failed", info.gid, info.branch_id, info.op)
            code, message = status_for(exc)
        await context.abort(code, message)

    return handle
