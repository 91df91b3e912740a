"""The application factory: long-lived resources opened and closed in cleanup contexts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web

from coordinator.api.envelope import error_middleware
from coordinator.api.grpc_front import start_grpc
from coordinator.api.health import handle_health
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
from coordinator.embedded_redis import EmbeddedRedis
from coordinator.engine.caller import BranchCaller
from coordinator.engine.engine import Engine
from coordinator.engine.grpc_caller import GrpcBranchCaller
from coordinator.engine.http1 import Http1Pool
from coordinator.keys import KeySpace
from coordinator.machines.base import Machine
from coordinator.machines.msg import MsgMachine
from coordinator.machines.saga import SagaMachine
from coordinator.machines.tcc import TccMachine, XaMachine
from coordinator.machines.workflow import WorkflowMachine
from coordinator.ops import wiring
from coordinator.ops.hooks import ObservedService
from coordinator.registry.etcd import EtcdTls
from coordinator.registry.publisher import Publisher
from coordinator.registry.resolver import Resolvers
from coordinator.settings import Settings
from coordinator.startup import redact
from coordinator.store.connect import log_topology, open_store
from coordinator.urls import UrlPolicy

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
    app.router.add_get("/api/health", handle_health)
    wiring.install(app, settings)  # /api/metrics, /admin, tracing
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
    store = await open_store(
        url,
        settings.redis,
        keys,
        lease_ms=int(settings.engine.lease_seconds * 1000),
        finished_ttl_s=settings.engine.finished_ttl,
        batch=settings.redis.pipeline,
        batch_scripts=settings.redis.batch_scripts,
    )
    session: aiohttp.ClientSession | None = None
    pool: Http1Pool | None = None
    engine: Engine | None = None
    publisher: Publisher | None = None
    registry = settings.registry
    tls = EtcdTls(registry.etcd_ca, registry.etcd_cert, registry.etcd_key)
    resolvers = Resolvers(tls)
    grpc_caller = GrpcBranchCaller(
        settings.engine.request_timeout, resolvers, settings.advertised_endpoint()
    )
    grpc_server: grpc.aio.Server | None = None
    try:
        await store.start()
        await log_topology(store)
        # One keep-alive pool for every branch call; the per-host limit keeps one slow
        # participant from taking every socket.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, skip_auto_headers=["User-Agent"])
        pool = Http1Pool(limit_per_host=256)
        urls = UrlPolicy(settings.engine.allowed_branch_hosts)
        caller = BranchCaller(session, settings.engine.request_timeout, pool, grpc_caller,
                              urls.allows)
        caller = wiring.observed_caller(app, caller)
        engine = wiring.observed_engine(app, store, caller, MACHINES, settings.engine)
        app[STORE] = store
        app[ENGINE] = engine
        app[SERVICE] = ObservedService(engine, settings)
        engine.start()
        if settings.server.grpc_port:
            # Same process, same event loop, same Service as the HTTP front.
            grpc_server = await start_grpc(app[SERVICE], settings)
            log.info("gRPC API dtmgimp.Dtm on %s:%d",
                     settings.server.host, settings.server.grpc_port)
        log.info("coordinator %s ready, store %s", engine.instance, redact(url))
        if registry.target:
            # In the background: etcd being down must not keep the coordinator from serving.
            publisher = Publisher(registry.target, settings.advertised_endpoint(), tls)
            publisher.start()
            log.info("registering %s in %s", publisher.endpoint, publisher.target.describe())
        async with wiring.running(app, engine, app[SERVICE]):
            yield
    finally:
        if publisher is not None:
            # First, so clients stop picking this coordinator while it drains.
            await publisher.stop()
        if grpc_server is not None:
            # In-flight calls (wait_result) answer at once: the engine's begin_stop ran.
            await grpc_server.stop(settings.engine.shutdown_grace)
        if engine is not None:
            await engine.stop()
        if session is not None:
            await session.close()
        if pool is not None:
            await pool.close()
        await grpc_caller.close()
        await resolvers.close()
        await store.close()
        if embedded is not None:
            await embedded.stop()


async def _begin_stop(app: web.Application) -> None:
    """Let wait_result requests answer now, so the shutdown keeps to the grace period."""
    if ENGINE in app:
        app[ENGINE].begin_stop()
