"""The admin page, `/admin`: transactions, one transaction, topics, a dashboard.

Server-rendered Jinja2 templates (shipped in the package, no build step, nothing from
a CDN); the only script is a confirm() before an action and the dashboard's refresh.
Actions go through the same service calls as the API, so they follow the same
compare-and-set rules. Branch header values are never rendered (they may carry
credentials), and nor is the token.
"""

from __future__ import annotations

import calendar
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jinja2
import orjson
from aiohttp import web

from coordinator.admin import session
from coordinator.api.auth import token_matches
from coordinator.api.routes import SERVICE, SETTINGS, STORE
from coordinator.errors import BadRequest, NotFound, TransactionFailure
from coordinator.keys import SPEC_FIELD
from coordinator.model import Status, Trans
from coordinator.requests import GidRequest
from coordinator.store.base import ListFilter
from coordinator.store.codec import CorruptRecord, spec_as_stored

PREVIEW_CHARS = 200
MAX_PAGES_SCANNED = 20  # a gid-prefix filter reads at most this many pages per view

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("coordinator.admin", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _fmt_ms(ms: int) -> str:
    if not ms:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


_env.filters["ms"] = _fmt_ms

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _token(request: web.Request) -> str:
    return request.app[SETTINGS].server.api_token


def render(request: web.Request, name: str, status: int = 200, **ctx: Any) -> web.Response:
    csrf = session.csrf_token(request)
    html = _env.get_template(name).render(
        csrf=csrf, logged_in=bool(_token(request)), statuses=[s.value for s in Status],
        types=["saga", "msg", "tcc", "xa", "workflow"], **ctx,
    )
    response = web.Response(text=html, status=status, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    session.remember_csrf(response, csrf)
    return response


def guarded(handler: Handler) -> Handler:
    """Log-in (or Bearer) required when a token is set; a CSRF check on every POST."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        token = _token(request)
        if not session.is_authenticated(request, token):
            if request.method != "GET":
                raise web.HTTPUnauthorized(text="log in first")
            raise web.HTTPSeeOther("/admin/login?" + urllib.parse.urlencode(
                {"next": request.path_qs}))
        if request.method == "POST":
            form = await request.post()
            if not session.csrf_ok(request, str(form.get("csrf", "")), token):
                raise web.HTTPForbidden(text="stale or foreign form: reload the page")
        return await handler(request)

    return wrapper


# -- log-in ---------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.StreamResponse:
    if not _token(request):
        raise web.HTTPSeeOther("/admin/transactions")
    return render(request, "login.html", next=_safe_next(request.query.get("next", "")),
                  error="")


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = _token(request)
    next_url = _safe_next(str(form.get("next", "")))
    if not session.csrf_ok(request, str(form.get("csrf", "")), token):
        raise web.HTTPForbidden(text="stale or foreign form: reload the page")
    if not token or not token_matches(token, str(form.get("token", ""))):
        return render(request, "login.html", status=401, next=next_url,
                      error="That is not the token.")
    response = web.HTTPSeeOther(next_url)
    session.set_session(response, token)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/admin/login")
    session.clear_session(response)
    raise response


def _safe_next(value: str) -> str:
    """Only a path of this admin page: no open redirect to another site."""
    if value.startswith("/admin") and not value.startswith("//"):
        return value
    return "/admin/transactions"


# -- transactions ---------------------------------------------------------------------------


def _ms_of(value: str) -> int:
    """`2026-11-30T21:05` (UTC, from <input type=datetime-local>) → ms since the epoch."""
    if not value:
        return 0
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return calendar.timegm(time.strptime(value, fmt)) * 1000
        except ValueError:
            continue
    raise BadRequest(f"not a time: {value!r}", "time")


def _cursor(trans: Trans) -> str:
    return f"{trans.create_time:013d}:{trans.gid}"


async def transactions(request: web.Request) -> web.StreamResponse:
    q = request.query
    status, kind, prefix = q.get("status", ""), q.get("type", ""), q.get("gid", "").strip()
    try:
        limit = max(1, min(200, int(q.get("limit", "50"))))
        where = ListFilter(status=status if status in {s.value for s in Status} else "",
                           trans_type=kind, create_from_ms=_ms_of(q.get("from", "")),
                           create_to_ms=_ms_of(q.get("to", "")))
    except (ValueError, BadRequest) as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    store = request.app[STORE]
    position = q.get("position", "")
    if position and (len(position) < 15 or position[13] != ":" or not position[:13].isdigit()):
        raise web.HTTPBadRequest(text="position is not one this page made")
    rows: list[Trans] = []
    next_position = ""
    for _ in range(MAX_PAGES_SCANNED):
        page = await store.list(position, limit, where)
        for trans in page.transactions:
            if trans.gid.startswith(prefix):
                rows.append(trans)
                if len(rows) == limit:
                    break
        if len(rows) == limit:
            next_position = _cursor(rows[-1])
            break
        if not page.next_position:
            break
        position = page.next_position
    else:  # read as many pages as one view may: offer the rest on the next one
        next_position = position
    params = {k: v for k, v in q.items() if k != "position" and v}
    next_link = ("/admin/transactions?" + urllib.parse.urlencode(
        {**params, "position": next_position})) if next_position else ""
    return render(request, "transactions.html", rows=rows, q=q, next_link=next_link,
                  limit=limit)


def _timeline(trans: Trans) -> list[tuple[int, str]]:
    events = [(trans.create_time, f"created as {trans.trans_type}")]
    for b in trans.branches:
        if b.finish_time:
            events.append((b.finish_time, f"branch {b.branch_id} {b.op_name}: {b.status.value}"))
        elif b.update_time and b.update_time != b.create_time:
            events.append((b.update_time, f"branch {b.branch_id} {b.op_name} updated"))
    if trans.rollback_time:
        events.append((trans.rollback_time, "rolling back: " + trans.rollback_reason))
    if trans.finish_time:
        events.append((trans.finish_time, f"finished: {trans.status.value}"))
    elif trans.next_cron_time:
        events.append((trans.next_cron_time, "next attempt due"))
    return sorted(e for e in events if e[0])


def _shown(name: str, value: str) -> str:
    """A stored field of an unreadable record as the page may show it: options and ext
    may hold branch_headers (credentials), on their own (layout 4) or in the spec."""
    if name in ("options", "ext"):
        return HIDDEN
    if name != SPEC_FIELD:
        return value
    spec = spec_as_stored(value)
    if spec is None:
        return HIDDEN  # what it holds cannot be told apart
    for secret in ("options", "ext"):
        if secret in spec:
            spec[secret] = HIDDEN
    return orjson.dumps(spec).decode()


HIDDEN = "(hidden)"


async def transaction(request: web.Request) -> web.StreamResponse:
    gid = request.match_info["gid"]
    try:
        trans = await request.app[STORE].load(gid)
    except CorruptRecord as exc:
        # Shown as stored (as `query` does), not a 500: an operator came to look at it.
        fields = sorted((k, _shown(k, v)[:PREVIEW_CHARS]) for k, v in exc.fields.items())
        return render(request, "corrupt.html", status=200, gid=gid, reason=str(exc),
                      fields=fields)
    if trans is None:
        return render(request, "missing.html", status=404, gid=gid)
    branches = [
        {"b": b, "preview": _preview(trans.payload_of(b))} for b in trans.branches
    ]
    messages = {"force-stop": "Force-stopped.", "retry": "Made due now; a worker picks it up.",
                "conflict": "Not changed: the transaction is already finished."}
    return render(
        request, "transaction.html", t=trans, branches=branches, timeline=_timeline(trans),
        header_names=sorted(trans.options.branch_headers), finished=trans.status.value
        in ("succeed", "failed"), message=messages.get(request.query.get("done", ""), ""),
        custom=_preview(trans.custom_data),
    )


def _preview(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


async def _act(request: web.Request, action: str) -> web.StreamResponse:
    gid = request.match_info["gid"]
    service = request.app[SERVICE]
    done = action
    try:
        if action == "force-stop":
            await service.force_stop(GidRequest(gid))
        else:
            await service.reset_next_cron_time(GidRequest(gid))
    except TransactionFailure:
        done = "conflict"
    except NotFound:
        raise web.HTTPNotFound(text=f"no transaction {gid!r}") from None
    raise web.HTTPSeeOther(f"/admin/transactions/{urllib.parse.quote(gid, safe='')}"
                           f"?done={done}")


async def force_stop(request: web.Request) -> web.StreamResponse:
    return await _act(request, "force-stop")


async def retry_now(request: web.Request) -> web.StreamResponse:
    return await _act(request, "retry")


# -- topics ---------------------------------------------------------------------------------


async def topics(request: web.Request) -> web.StreamResponse:
    found = await request.app[STORE].topics()
    return render(request, "topics.html", topics=sorted(found.values(), key=lambda t: t.name),
                  error=request.query.get("error", ""))


async def topic_change(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    what = request.match_info["what"]
    topic, url = str(form.get("topic", "")).strip(), str(form.get("url", "")).strip()
    service = request.app[SERVICE]
    error = ""
    try:
        if what == "subscribe":
            await service.subscribe(topic, url, str(form.get("remark", "")))
        elif what == "unsubscribe":
            await service.unsubscribe(topic, url)
        else:
            await service.delete_topic(topic)
    except (BadRequest, NotFound, TransactionFailure) as exc:
        error = str(exc)
    suffix = "?" + urllib.parse.urlencode({"error": error}) if error else ""
    raise web.HTTPSeeOther("/admin/topics" + suffix)


# -- dashboard ------------------------------------------------------------------------------


def _totals(request: web.Request) -> Mapping[str, float]:
    from coordinator.ops.wiring import METRICS

    metrics = request.app.get(METRICS)
    return metrics.totals() if metrics is not None else {}


async def dashboard(request: web.Request) -> web.StreamResponse:
    return render(request, "dashboard.html", totals=_totals(request),
                  enabled=bool(request.app[SETTINGS].server.metrics))


async def dashboard_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=orjson.dumps(_totals(request)), content_type="application/json")


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/admin/transactions")


def add_admin_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/login", login_form)
    r.add_post("/admin/login", login)
    r.add_post("/admin/logout", logout)
    r.add_get("/admin", guarded(index))
    r.add_get("/admin/", guarded(index))
    r.add_get("/admin/transactions", guarded(transactions))
    r.add_get("/admin/transactions/{gid}", guarded(transaction))
    r.add_post("/admin/transactions/{gid}/force-stop", guarded(force_stop))
    r.add_post("/admin/transactions/{gid}/retry", guarded(retry_now))
    r.add_get("/admin/topics", guarded(topics))
    r.add_post("/admin/topics/{what:subscribe|unsubscribe|delete}", guarded(topic_change))
    r.add_get("/admin/dashboard", guarded(dashboard))
    r.add_get("/admin/dashboard.json", guarded(dashboard_json))
