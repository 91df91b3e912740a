"""The dtm-compatible HTTP API under /api/dtmsvr: request parsing and the envelope only."""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from coordinator.api.auth import bearer_of, token_matches
from coordinator.api.envelope import SUCCESS_BODY, Handler, json_response, success
from coordinator.api.render import page_json, query_json, raw_trans_json, workflow_json
from coordinator.api.wire import check_gid, parse_gid_request, parse_register, parse_trans
from coordinator.engine.engine import Engine
from coordinator.errors import BadRequest, Unauthorized
from coordinator.model import Status
from coordinator.service import Service, new_gid
from coordinator.settings import ServerSettings, Settings
from coordinator.store.base import ListFilter, Store
from coordinator.store.codec import CorruptRecord

ENGINE = web.AppKey("engine", Engine)
STORE = web.AppKey("store", Store)
SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", Service)

PREFIX = "/api/dtmsvr"


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number", name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}", name)
    return value


async def handle_new_gid(request: web.Request) -> web.Response:
    return json_response({"gid": new_gid(), "dtm_result": "SUCCESS"})


async def handle_version(request: web.Request) -> web.Response:
    return json_response(Service.version())


async def handle_ping(request: web.Request) -> web.Response:
    return json_response({"msg": "pong"})


@functools.cache
def _openapi() -> bytes:
    # Shipped as package data beside this module (coordinator/api/openapi.json).
    return (importlib.resources.files("coordinator.api") / "openapi.json").read_bytes()


async def handle_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_openapi(), content_type="application/json")


# The routes whose whole input is the JSON body: each is a function of the service and
# the body, returning the JSON of a 200. The aiohttp route and the fast HTTP/1.1 path
# (fast.py) both call it, so the two cannot answer differently.
BodyHandler = Callable[[Service, bytes], Awaitable[bytes]]


async def prepare_body(service: Service, body: bytes) -> bytes:
    await service.prepare(parse_trans(body, Status.PREPARED))
    return SUCCESS_BODY


async def submit_body(service: Service, body: bytes) -> bytes:
    await service.submit(parse_trans(body, Status.SUBMITTED))
    return SUCCESS_BODY


async def abort_body(service: Service, body: bytes) -> bytes:
    await service.abort(parse_gid_request(body))
    return SUCCESS_BODY


async def force_stop_body(service: Service, body: bytes) -> bytes:
    await service.force_stop(parse_gid_request(body))
    return SUCCESS_BODY


async def reset_next_cron_time_body(service: Service, body: bytes) -> bytes:
    await service.reset_next_cron_time(parse_gid_request(body))
    return SUCCESS_BODY


async def register_branch_body(service: Service, body: bytes) -> bytes:
    await service.register_branch(parse_register(body))
    return SUCCESS_BODY


async def prepare_workflow_body(service: Service, body: bytes) -> bytes:
    req = parse_trans(body, Status.PREPARED)
    return orjson.dumps(workflow_json(await service.prepare_workflow(req)))


def from_body(handler: BodyHandler) -> Handler:
    """The aiohttp handler of a body route."""

    async def handle(request: web.Request) -> web.Response:
        payload = await handler(request.app[SERVICE], await request.read())
        return web.Response(body=payload, content_type="application/json")

    return handle


async def handle_query(request: web.Request) -> web.Response:
    gid = check_gid(request.query.get("gid", ""))
    try:
        trans = await request.app[SERVICE].query(gid)
    except CorruptRecord as exc:
        # Shown as stored, so an operator can see what is wrong with it.
        return json_response({"transaction": raw_trans_json(exc.fields), "branches": []})
    return json_response(query_json(trans))


async def handle_all(request: web.Request) -> web.Response:
    where = ListFilter(
        status=request.query.get("status", ""),
        trans_type=request.query.get("transType", ""),
        create_from_ms=_query_int(request, "createTimeStart", 0, 0, 1 << 45),
        create_to_ms=_query_int(request, "createTimeEnd", 0, 0, 1 << 45),
    )
    limit = _query_int(request, "limit", 100, 1, 1000)
    gid = request.query.get("gid", "")
    page = await request.app[SERVICE].all(
        request.query.get("position", ""), limit, where, gid and check_gid(gid)
    )
    return json_response(page_json(page))


async def handle_reset_cron_time(request: web.Request) -> web.Response:
    default = 3 * request.app[SETTINGS].engine.timeout_to_fail
    timeout = _query_int(request, "timeout", default, 0, 10**8)
    limit = _query_int(request, "limit", 100, 1, 100_000)
    return json_response(await request.app[SERVICE].reset_cron_time(timeout, limit))


async def handle_subscribe(request: web.Request) -> web.Response:
    q = request.query
    await request.app[SERVICE].subscribe(q.get("topic", ""), q.get("url", ""), q.get("remark", ""))
    return success()


async def handle_unsubscribe(request: web.Request) -> web.Response:
    q = request.query
    await request.app[SERVICE].unsubscribe(q.get("topic", ""), q.get("url", ""))
    return success()


async def handle_delete_topic(request: web.Request) -> web.Response:
    await request.app[SERVICE].delete_topic(request.match_info["name"])
    return success()


async def handle_scan_kv(request: web.Request) -> web.Response:
    kv = await request.app[SERVICE].kv(request.query.get("cat", ""))
    return json_response({"kv": kv, "next_position": ""})


async def handle_query_kv(request: web.Request) -> web.Response:
    q = request.query
    kv = await request.app[SERVICE].kv(q.get("cat", ""), q.get("key", ""))
    return json_response({"kv": kv})


# Who may call a route (see auth.py): OPEN always; TRANSACTION unless
# server.protect_transaction_routes, since dtm's clients cannot send a token; OPERATOR
# only with the token once server.api_token is set.
OPEN, TRANSACTION, OPERATOR = "open", "transaction", "operator"

BODY_ROUTES: dict[str, tuple[BodyHandler, str]] = {
    f"{PREFIX}/prepare": (prepare_body, TRANSACTION),
    f"{PREFIX}/submit": (submit_body, TRANSACTION),
    f"{PREFIX}/abort": (abort_body, TRANSACTION),
    f"{PREFIX}/forceStop": (force_stop_body, OPERATOR),
    f"{PREFIX}/resetNextCronTime": (reset_next_cron_time_body, OPERATOR),
    **{f"{PREFIX}/{name}": (register_branch_body, TRANSACTION)
       for name in ("registerBranch", "registerTccBranch", "registerXaBranch")},
    f"{PREFIX}/prepareWorkflow": (prepare_workflow_body, TRANSACTION),
}

ROUTES: list[tuple[str, str, Handler, str]] = [
    ("GET", "/api/ping", handle_ping, OPEN),
    ("GET", "/api/openapi.json", handle_openapi, OPEN),
    ("GET", f"{PREFIX}/version", handle_version, OPEN),
    ("GET", f"{PREFIX}/newGid", handle_new_gid, TRANSACTION),
    *[("POST", path, from_body(handler), access)
      for path, (handler, access) in BODY_ROUTES.items()],
    ("GET", f"{PREFIX}/query", handle_query, TRANSACTION),
    ("GET", f"{PREFIX}/all", handle_all, OPERATOR),
    ("GET", f"{PREFIX}/resetCronTime", handle_reset_cron_time, OPERATOR),
    ("GET", f"{PREFIX}/subscribe", handle_subscribe, OPERATOR),
    ("GET", f"{PREFIX}/unsubscribe", handle_unsubscribe, OPERATOR),
    ("DELETE", f"{PREFIX}/topic/{{name}}", handle_delete_topic, OPERATOR),
    ("GET", f"{PREFIX}/scanKV", handle_scan_kv, OPERATOR),
    ("GET", f"{PREFIX}/queryKV", handle_query_kv, OPERATOR),
]


def check_access(server: ServerSettings, access: str, token: str) -> None:
    """Raise `Unauthorized` unless `token` may call a route of this access class."""
    protected = access == OPERATOR or (
        access == TRANSACTION and server.protect_transaction_routes
    )
    if protected and not token_matches(server.api_token, token):
        raise Unauthorized("this route needs Authorization: Bearer <server.api_token>")


def guarded(handler: Handler, access: str) -> Handler:
    """The handler behind the token check its access class asks for."""
    if access == OPEN:
        return handler

    async def check_then_handle(request: web.Request) -> web.StreamResponse:
        check_access(request.app[SETTINGS].server, access, bearer_of(request))
        return await handler(request)

    return check_then_handle


def add_routes(app: web.Application) -> None:
    for method, path, handler, access in ROUTES:
        if method == "GET":  # with HEAD, as add_get always gave
            app.router.add_get(path, guarded(handler, access))
        else:
            app.router.add_route(method, path, guarded(handler, access))
