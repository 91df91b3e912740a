"""Plugs metrics, tracing and the admin page into the aiohttp app.

`install` runs in create_app (routes and middlewares must exist before the app
starts); `attach` runs once the store, engine and service exist, and returns the
context that keeps the metrics refresher running.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from coordinator.api.auth import require_token
from coordinator.api.routes import SETTINGS
from coordinator.engine.caller import BranchCaller
from coordinator.engine.engine import Engine
from coordinator.ops.hooks import ObservedCaller, ObservedEngine
from coordinator.ops.metrics import Handler, Metrics, Refresher, metrics_middleware, refreshing
from coordinator.ops.tracing import Tracing, setup
from coordinator.settings import Settings

METRICS = web.AppKey("metrics", Metrics)
TRACING = web.AppKey("tracing", Tracing)


def install(app: web.Application, settings: Settings) -> None:
    if settings.server.metrics:
        metrics = Metrics()
        app[METRICS] = metrics
        app.middlewares.append(metrics_middleware(metrics))
        app.router.add_get("/api/metrics", handle_metrics)
    tracing = setup(settings.server.tracing)
    if tracing is not None:
        app[TRACING] = tracing
        app.middlewares.append(tracing_middleware(tracing))
    from coordinator.admin.routes import add_admin_routes

    add_admin_routes(app)


async def handle_metrics(request: web.Request) -> web.Response:
    server = request.app[SETTINGS].server
    if server.protect_metrics:
        require_token(request, server.api_token)
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def tracing_middleware(tracing: Tracing) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(("/api/dtmsvr/", "/api/json-rpc")):
            return await handler(request)
        name = f"{request.method} {request.path.rsplit('/', 1)[-1]}"
        with tracing.span(name, headers=request.headers, server=True) as span:
            response = await handler(request)
            span.set_attribute("http.status_code", response.status)
            return response

    return middleware


def observed_engine(app: web.Application, *args: Any) -> Engine:
    """The engine, with the metrics hooks and tracing of this app."""
    engine = ObservedEngine(*args)
    engine.tracing = app.get(TRACING)
    metrics = app.get(METRICS)
    if metrics is not None:
        engine.observer = metrics
        engine.store.observer = metrics
    return engine


def observed_caller(app: web.Application, caller: BranchCaller) -> BranchCaller:
    return ObservedCaller(caller, app.get(METRICS), app.get(TRACING))


@contextlib.asynccontextmanager
async def running(app: web.Application, engine: Engine, service: Any) -> AsyncIterator[None]:
    metrics = app.get(METRICS)
    if metrics is None:
        yield
        return
    every = app[SETTINGS].server.metrics_refresh
    async with refreshing(Refresher(metrics, engine.store, engine, service, every)):
        yield
