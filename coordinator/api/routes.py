"""The dtm-compatible HTTP API under /api/dtmsvr."""

from __future__ import annotations

import asyncio
import secrets
import string

from aiohttp import web

from coordinator import __version__
from coordinator.api.envelope import failure, json_response, ongoing, success
from coordinator.api.render import branch_json, trans_json
from coordinator.api.wire import check_gid, parse_gid_only, parse_trans
from coordinator.engine.engine import Engine
from coordinator.errors import AlreadyExists, BadRequest, NotFound, TransactionFailure
from coordinator.machines.base import timeout_of
from coordinator.model import FINISHED, UNFINISHED, Status, Trans
from coordinator.settings import Settings
from coordinator.store.base import ListFilter, Store, Transition

ENGINE = web.AppKey("engine", Engine)
STORE = web.AppKey("store", Store)
SETTINGS = web.AppKey("settings", Settings)

_ALPHABET = string.ascii_letters + string.digits
PREFIX = "/api/dtmsvr"


def new_gid() -> str:
    """22 random base62 characters (about 131 bits), like dtm's short UUIDs."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(22))


async def handle_new_gid(request: web.Request) -> web.Response:
    return json_response({"gid": new_gid(), "dtm_result": "SUCCESS"})


async def handle_version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


async def handle_ping(request: web.Request) -> web.Response:
    return json_response({"msg": "pong"})


async def handle_prepare(request: web.Request) -> web.Response:
    req = parse_trans(await request.read(), Status.PREPARED)
    engine = request.app[ENGINE]
    trans = req.trans
    # A prepared transaction is looked at again when it times out (msg back-check,
    # tcc/xa rollback).
    due = timeout_of(trans, engine.defaults) * 1000
    try:
        await engine.store.create(trans, due_in_ms=due)
    except AlreadyExists as exc:
        if exc.status != Status.PREPARED.value:
            raise TransactionFailure(
                f"transaction {trans.gid} has status '{exc.status}', cannot prepare"
            ) from None
    return success()


async def handle_submit(request: web.Request) -> web.Response:
    req = parse_trans(await request.read(), Status.SUBMITTED)
    engine = request.app[ENGINE]
    trans = req.trans
    if trans.trans_type == "saga" and not trans.steps:
        raise BadRequest("a saga needs at least one step", "steps")
    try:
        task = await engine.create_and_run(trans, due_in_ms=0)
    except AlreadyExists as exc:
        if exc.status == Status.SUBMITTED.value:
            # Submitting twice is harmless: the first submit already drives it.
            return success()
        if exc.status != Status.PREPARED.value:
            raise TransactionFailure(
                f"transaction {trans.gid} has status '{exc.status}', cannot submit"
            ) from None
        task = await engine.take_over(trans.gid, frozenset({Status.PREPARED}), Status.SUBMITTED)
    if not trans.options.wait_result:
        return success()
    return await _await_result(request, trans.gid, task)


async def _await_result(
    request: web.Request, gid: str, task: asyncio.Task[Trans] | None
) -> web.Response:
    """Answer a wait_result submit: 200 when it succeeded, 409 when it failed."""
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    final: Trans | None = None
    if task is not None:
        try:
            final = await asyncio.wait_for(
                asyncio.shield(task), settings.server.wait_result_timeout
            )
        except TimeoutError:
            final = None
    if final is None or final.status not in FINISHED:
        final = await store.load(gid)
    if final is None:
        raise NotFound(f"no transaction with gid '{gid}'")
    if final.status is Status.SUCCEED:
        return success()
    if final.status is Status.FAILED:
        return failure(final.rollback_reason or f"transaction {gid} failed")
    return ongoing(f"transaction {gid} is {final.status.value}; it will be retried")


async def handle_abort(request: web.Request) -> web.Response:
    gid, data = parse_gid_only(await request.read())
    engine = request.app[ENGINE]
    trans = await engine.store.load(gid)
    if trans is None:
        raise NotFound(f"no transaction with gid '{gid}'")
    if trans.trans_type == "msg" and trans.status is Status.PREPARED:
        await engine.store.transition(
            gid, Transition(expected=frozenset({Status.PREPARED}), new_status=Status.FAILED)
        )
        return success()
    if trans.trans_type in ("tcc", "xa") and trans.status in (Status.PREPARED, Status.ABORTING):
        reason = data.get("rollback_reason") or ""
        fields = {"rollback_reason": reason} if isinstance(reason, str) and reason else {}
        task = await engine.take_over(
            gid, frozenset({Status.PREPARED, Status.ABORTING}), Status.ABORTING, fields
        )
        if data.get("wait_result") is True:
            return await _await_result(request, gid, task)
        return success()
    raise TransactionFailure(
        f"{trans.trans_type} transaction {gid} has status '{trans.status.value}', cannot abort"
    )


async def handle_force_stop(request: web.Request) -> web.Response:
    gid, _ = parse_gid_only(await request.read())
    await request.app[STORE].transition(
        gid, Transition(expected=UNFINISHED, new_status=Status.FAILED,
                        fields={"rollback_reason": "force stopped"})
    )
    return success()


async def handle_reset_next_cron_time(request: web.Request) -> web.Response:
    gid, _ = parse_gid_only(await request.read())
    await request.app[STORE].transition(gid, Transition(expected=UNFINISHED, next_due_ms=0))
    return success()


async def handle_query(request: web.Request) -> web.Response:
    gid = check_gid(request.query.get("gid"))
    trans = await request.app[STORE].load(gid)
    if trans is None:
        return json_response({"transaction": None, "branches": []})
    return json_response(
        {
            "transaction": trans_json(trans),
            "branches": [branch_json(trans, b) for b in trans.branches],
        }
    )


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


async def handle_all(request: web.Request) -> web.Response:
    store = request.app[STORE]
    gid = request.query.get("gid", "")
    if gid:
        found = await store.load(check_gid(gid))
        return json_response(
            {"transactions": [trans_json(found)] if found else [], "next_position": ""}
        )
    limit = _query_int(request, "limit", 100, 1, 1000)
    where = ListFilter(
        status=request.query.get("status", ""),
        trans_type=request.query.get("transType", ""),
        create_from_ms=_query_int(request, "createTimeStart", 0, 0, 1 << 45),
        create_to_ms=_query_int(request, "createTimeEnd", 0, 0, 1 << 45),
    )
    if where.status and where.status not in {s.value for s in Status}:
        raise BadRequest(f"unknown status {where.status!r}", "status")
    position = request.query.get("position", "")
    if position and (len(position) < 15 or position[13] != ":" or not position[:13].isdigit()):
        raise BadRequest("position is not one this server returned", "position")
    page = await store.list(position, limit, where)
    return json_response(
        {"transactions": [trans_json(t) for t in page.transactions],
         "next_position": page.next_position}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/ping", handle_ping)
    app.router.add_get(f"{PREFIX}/version", handle_version)
    app.router.add_get(f"{PREFIX}/newGid", handle_new_gid)
    app.router.add_post(f"{PREFIX}/prepare", handle_prepare)
    app.router.add_post(f"{PREFIX}/submit", handle_submit)
    app.router.add_post(f"{PREFIX}/abort", handle_abort)
    app.router.add_post(f"{PREFIX}/forceStop", handle_force_stop)
    app.router.add_post(f"{PREFIX}/resetNextCronTime", handle_reset_next_cron_time)
    app.router.add_get(f"{PREFIX}/query", handle_query)
    app.router.add_get(f"{PREFIX}/all", handle_all)
