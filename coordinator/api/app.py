"""The application factory: long-lived resources opened and closed in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from coordinator.api.envelope import error_middleware
from coordinator.api.jsonrpc import handle_json_rpc
from coordinator.api.routes import (
    ENGINE,
    SERVICE,
    SETTINGS,
    STORE,
    TRANSACTION,
    add_routes,
    guarded,
)
from coordinator.api.server import body_middleware
from coordinator.api.urls import UrlPolicy
from coordinator.embedded_redis import EmbeddedRedis
from coordinator.engine.caller import BranchCaller
from coordinator.engine.engine import Engine
from coordinator.engine.http1 import Http1Pool
from coordinator.keys import KeySpace
from coordinator.machines.base import Machine
from coordinator.machines.msg import MsgMachine
from coordinator.machines.saga import SagaMachine
from coordinator.machines.tcc import TccMachine, XaMachine
from coordinator.machines.workflow import WorkflowMachine
from coordinator.service import Service
from coordinator.settings import Settings
from coordinator.store.redis_store import RedisStore

log = logging.getLogger("coordinator")

MACHINES: dict[str, Machine] = {
    "saga": SagaMachine(),
    "msg": MsgMachine(),
    "tcc": TccMachine(),
    "xa": XaMachine(),
    "workflow": WorkflowMachine(),
}


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[error_middleware, body_middleware],
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_resources)
    # On SIGTERM aiohttp runs on_shutdown before it waits for open requests.
    app.on_shutdown.append(_begin_stop)
    add_routes(app)
    app.router.add_post("/api/json-rpc", guarded(handle_json_rpc, TRANSACTION))
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    embedded: EmbeddedRedis | None = None
    url = settings.redis.url
    if not url:
        embedded = EmbeddedRedis(Path(settings.redis.data_dir))
        url = await embedded.start()
        log.info("started a private redis-server with its data in %s", settings.redis.data_dir)
    keys = KeySpace(settings.redis.key_prefix, settings.redis.partitions)
    store = RedisStore.from_url(
        url,
        keys,
        lease_ms=int(settings.engine.lease_seconds * 1000),
        finished_ttl_s=settings.engine.finished_ttl,
        batch=settings.redis.pipeline,
    )
    session: aiohttp.ClientSession | None = None
    pool: Http1Pool | None = None
    engine: Engine | None = None
    try:
        await store.start()
        # One keep-alive pool for every branch call; the per-host limit keeps one slow
        # participant from taking every socket.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, skip_auto_headers=["User-Agent"])
        pool = Http1Pool(limit_per_host=256)
        urls = UrlPolicy(settings.engine.allowed_branch_hosts)
        caller = BranchCaller(session, settings.engine.request_timeout, pool, urls.allows)
        engine = Engine(store, caller, MACHINES, settings.engine)
        app[STORE] = store
        app[ENGINE] = engine
        app[SERVICE] = Service(engine, settings)
        engine.start()
        log.info("coordinator %s ready, store %s", engine.instance, _safe_url(url))
        yield
    finally:
        if engine is not None:
            await engine.stop()
        if session is not None:
            await session.close()
        if pool is not None:
            await pool.close()
        await store.close()
        if embedded is not None:
            await embedded.stop()


async def _begin_stop(app: web.Application) -> None:
    """Let wait_result requests answer now, so the shutdown keeps to the grace period."""
    if ENGINE in app:
        app[ENGINE].begin_stop()


def _safe_url(url: str) -> str:
    """The store URL without a password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
