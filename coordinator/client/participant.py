"""The participant side: branch requests in, dtm answers out (aiohttp).

    routes = web.RouteTableDef()

    @routes.post("/TransOut")
    @branch_handler
    async def trans_out(request: web.Request, branch: BranchInfo) -> None:
        amount = (await request.json())["amount"]
        await branch.barrier().call(mysql_barrier, lambda conn: withdraw(conn, amount))

    routes.get("/queryPrepared")(query_prepared_handler(pg_barrier))

A handler returns normally for success, raises TransactionFailed for "the business says
no" (409 FAILURE: a saga compensates), TransactionOngoing for "not yet" (425 ONGOING:
asked again later); any other exception is a 500, which the coordinator retries.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from coordinator.client.barrier import BranchBarrier
from coordinator.client.errors import TransactionFailed, TransactionOngoing

log = logging.getLogger("coordinator.client")

_SUCCESS = b'{"dtm_result":"SUCCESS"}'


@dataclass(frozen=True)
class BranchInfo:
    """Who is calling: the query string every branch call carries."""

    gid: str
    trans_type: str
    branch_id: str
    op: str
    dtm: str = ""  # sent by SDK-made calls (TCC try, XA action), not by the coordinator
    phase2_url: str = ""  # XA action calls: where commit/rollback will be sent

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> BranchInfo:
        info = cls(query.get("gid", ""), query.get("trans_type", ""),
                   query.get("branch_id", ""), query.get("op", ""),
                   query.get("dtm", ""), query.get("phase2_url", ""))
        if not (info.gid and info.trans_type and info.branch_id and info.op):
            raise ValueError("a branch call needs gid, trans_type, branch_id and op")
        return info

    def barrier(self) -> BranchBarrier:
        """A fresh barrier for this handler call (barrier ids start at 01)."""
        return BranchBarrier(self.trans_type, self.gid, self.branch_id, self.op)


def success_response(data: Mapping[str, Any] | None = None) -> web.Response:
    """200; a body must never contain FAILURE or ONGOING (the coordinator scans it)."""
    body = _SUCCESS if data is None else orjson.dumps({"dtm_result": "SUCCESS", **data})
    return web.Response(body=body, content_type="application/json")


def failure_response(message: str) -> web.Response:
    return web.json_response({"dtm_result": "FAILURE", "message": message}, status=409)


def ongoing_response(message: str) -> web.Response:
    return web.json_response({"dtm_result": "ONGOING", "message": message}, status=425)


def response_for(exc: BaseException) -> web.Response:
    """The dtm answer for an exception a branch handler raised."""
    if isinstance(exc, TransactionFailed):
        return failure_response(str(exc))
    if isinstance(exc, TransactionOngoing):
        return ongoing_response(str(exc))
    # Never echo FAILURE/ONGOING from an arbitrary message: that would turn a retryable
    # error into a final answer.
    text = f"{type(exc).__name__}: {exc}".replace("FAILURE", "failure")
    return web.json_response({"message": text.replace("ONGOING", "ongoing")}, status=500)


BranchHandler = Callable[[web.Request, BranchInfo], Awaitable[object]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def branch_handler(fn: BranchHandler) -> Handler:
    """Turn ``fn(request, branch)`` into an aiohttp handler speaking dtm's answers.

    A mapping returned by ``fn`` is sent as the success body; anything else (None, a
    BarrierResult) as ``{"dtm_result":"SUCCESS"}``.
    """

    @functools.wraps(fn)
    async def handle(request: web.Request) -> web.Response:
        try:
            info = BranchInfo.from_query(request.query)
        except ValueError as exc:
            return web.json_response({"message": str(exc)}, status=400)
        try:
            result = await fn(request, info)
        except (TransactionFailed, TransactionOngoing) as exc:
            return response_for(exc)
        except Exception as exc:
            log.exception("branch %s %s/%s failed", info.gid, info.branch_id, info.op)
            return response_for(exc)
        return success_response(result if isinstance(result, Mapping) else None)

    return handle


class QueryPrepared(Protocol):
    async def query_prepared(self, gid: str) -> None: ...


def query_prepared_handler(backend: QueryPrepared) -> Handler:
    """The msg back-check endpoint for a barrier backend (SQL or Redis)."""

    async def query_prepared(request: web.Request, branch: BranchInfo) -> None:
        await backend.query_prepared(branch.gid)

    return branch_handler(query_prepared)
