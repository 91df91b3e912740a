"""The dtm-compatible HTTP API under /api/dtmsvr: request parsing and the envelope only."""

from __future__ import annotations

from aiohttp import web

from coordinator.api.envelope import json_response, success
from coordinator.api.render import page_json, query_json, workflow_json
from coordinator.api.wire import check_gid, parse_gid_request, parse_register, parse_trans
from coordinator.engine.engine import Engine
from coordinator.errors import BadRequest
from coordinator.model import Status
from coordinator.service import Service, new_gid
from coordinator.settings import Settings
from coordinator.store.base import ListFilter, Store

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


async def handle_prepare(request: web.Request) -> web.Response:
    await request.app[SERVICE].prepare(parse_trans(await request.read(), Status.PREPARED))
    return success()


async def handle_submit(request: web.Request) -> web.Response:
    await request.app[SERVICE].submit(parse_trans(await request.read(), Status.SUBMITTED))
    return success()


async def handle_abort(request: web.Request) -> web.Response:
    await request.app[SERVICE].abort(parse_gid_request(await request.read()))
    return success()


async def handle_force_stop(request: web.Request) -> web.Response:
    await request.app[SERVICE].force_stop(parse_gid_request(await request.read()))
    return success()


async def handle_reset_next_cron_time(request: web.Request) -> web.Response:
    await request.app[SERVICE].reset_next_cron_time(parse_gid_request(await request.read()))
    return success()


async def handle_register_branch(request: web.Request) -> web.Response:
    await request.app[SERVICE].register_branch(parse_register(await request.read()))
    return success()


async def handle_prepare_workflow(request: web.Request) -> web.Response:
    req = parse_trans(await request.read(), Status.PREPARED)
    return json_response(workflow_json(await request.app[SERVICE].prepare_workflow(req)))


async def handle_query(request: web.Request) -> web.Response:
    gid = check_gid(request.query.get("gid", ""))
    return json_response(query_json(await request.app[SERVICE].query(gid)))


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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/ping", handle_ping)
    app.router.add_get(f"{PREFIX}/version", handle_version)
    app.router.add_get(f"{PREFIX}/newGid", handle_new_gid)
    app.router.add_post(f"{PREFIX}/prepare", handle_prepare)
    app.router.add_post(f"{PREFIX}/submit", handle_submit)
    app.router.add_post(f"{PREFIX}/abort", handle_abort)
    app.router.add_post(f"{PREFIX}/forceStop", handle_force_stop)
    app.router.add_post(f"{PREFIX}/resetNextCronTime", handle_reset_next_cron_time)
    for name in ("registerBranch", "registerTccBranch", "registerXaBranch"):
        app.router.add_post(f"{PREFIX}/{name}", handle_register_branch)
    app.router.add_post(f"{PREFIX}/prepareWorkflow", handle_prepare_workflow)
    app.router.add_get(f"{PREFIX}/query", handle_query)
    app.router.add_get(f"{PREFIX}/all", handle_all)
    app.router.add_get(f"{PREFIX}/resetCronTime", handle_reset_cron_time)
    app.router.add_get(f"{PREFIX}/subscribe", handle_subscribe)
    app.router.add_get(f"{PREFIX}/unsubscribe", handle_unsubscribe)
    app.router.add_delete(f"{PREFIX}/topic/{{name}}", handle_delete_topic)
    app.router.add_get(f"{PREFIX}/scanKV", handle_scan_kv)
    app.router.add_get(f"{PREFIX}/queryKV", handle_query_kv)
