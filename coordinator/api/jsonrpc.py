"""JSON-RPC 2.0 at POST /api/json-rpc, with dtm's methods and error codes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from coordinator.api.envelope import json_response
from coordinator.api.routes import SERVICE
from coordinator.api.wire import parse_gid_request, parse_register, parse_trans
from coordinator.errors import (
    BadRequest,
    CoordinatorError,
    NotFound,
    TransactionFailure,
    TransactionOngoing,
)
from coordinator.model import Status
from coordinator.service import Service, new_gid

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
FAILURE = -32901
ONGOING = -32902

Method = Callable[[Service, dict[str, Any]], Awaitable[Any]]


async def _new_gid(service: Service, params: dict[str, Any]) -> Any:
    return {"gid": new_gid(), "dtm_result": "SUCCESS"}


async def _prepare(service: Service, params: dict[str, Any]) -> Any:
    await service.prepare(parse_trans(params, Status.PREPARED))
    return {"dtm_result": "SUCCESS"}


async def _submit(service: Service, params: dict[str, Any]) -> Any:
    await service.submit(parse_trans(params, Status.SUBMITTED))
    return {"dtm_result": "SUCCESS"}


async def _abort(service: Service, params: dict[str, Any]) -> Any:
    await service.abort(parse_gid_request(params))
    return {"dtm_result": "SUCCESS"}


async def _register(service: Service, params: dict[str, Any]) -> Any:
    await service.register_branch(parse_register(params))
    return {"dtm_result": "SUCCESS"}


METHODS: dict[str, Method] = {
    "newGid": _new_gid,
    "prepare": _prepare,
    "submit": _submit,
    "abort": _abort,
    "registerBranch": _register,
}


def _reply(
    rid: Any, result: Any = None, code: int = 0, message: str = "", field: str | None = None
) -> web.Response:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
    if code:
        body["error"] = {"code": code, "message": message}
        if field:  # as the HTTP front's 400 names it
            body["error"]["data"] = {"field": field}
    else:
        body["result"] = result
    return json_response(body)


async def handle_json_rpc(request: web.Request) -> web.Response:
    try:
        req = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return _reply(None, code=PARSE_ERROR, message=f"parse error: {exc}")
    if not isinstance(req, dict) or req.get("jsonrpc") != "2.0" or "method" not in req:
        rid = req.get("id") if isinstance(req, dict) else None
        return _reply(rid, code=INVALID_REQUEST, message="not a JSON-RPC 2.0 request")
    rid = req.get("id")
    method = METHODS.get(str(req["method"]))
    if method is None:
        return _reply(rid, code=METHOD_NOT_FOUND, message=f"method not found: {req['method']}")
    params = req.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return _reply(rid, code=INVALID_PARAMS, message="params must be an object")
    try:
        return _reply(rid, await method(request.app[SERVICE], params))
    except BadRequest as exc:
        return _reply(rid, code=INVALID_PARAMS, message=str(exc), field=exc.field)
    except TransactionFailure as exc:
        return _reply(rid, code=FAILURE, message=str(exc))
    except TransactionOngoing as exc:
        return _reply(rid, code=ONGOING, message=str(exc))
    except (NotFound, CoordinatorError) as exc:
        return _reply(rid, code=INTERNAL_ERROR, message=str(exc))
