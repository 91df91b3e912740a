"""Prometheus metrics: dtm's names and labels, plus the coordinator's own.

dtm's dashboards and alert rules keep working because the six `dtm_*` series carry the
names and labels of dtm's `dtmsvr/metrics.go` (status "ok"/"fail", api = the last path
segment in lower case). Ours are prefixed `coordinator_`.

Hot-path cost: label children are looked up once and kept in dicts, so recording is a
dict hit and an increment. Values read from Redis (backlog, oldest due age, unfinished
by status) are refreshed by a background task every `server.metrics_refresh` seconds;
a scrape only
renders what is already in memory and never touches Redis.

With `--workers N` the parent sets PROMETHEUS_MULTIPROC_DIR (a directory it creates
and removes, see coordinator/workers.py) before the children start, prometheus-client
then keeps every value in a per-process mmapped file, and a scrape answered by any
child sums the files of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from coordinator import __version__
from coordinator.machines.base import Outcome, OutcomeKind
from coordinator.model import UNFINISHED, Branch, Status, Trans
from coordinator.observer import Observer

log = logging.getLogger("coordinator.metrics")

# The `*_created` timestamp series double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# How many due-index entries per partition the refresher reads statuses of.
STATUS_SAMPLE = 1000
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


class Metrics(Observer):
    """Every metric of one process, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.server_info = Gauge(
            "dtm_server_info", "The information of this dtm server.",
            ["gin_version", "grpc_version", "version"], registry=r,
            multiprocess_mode="mostrecent",
        )
        self.server_info.labels(f"aiohttp-{aiohttp.__version__}", "", __version__).set(1)
        self.process_total = Counter(
            "dtm_server_process_total", "All request received by dtm",
            ["type", "api", "status"], registry=r,
        )
        self.response_duration = Histogram(
            "dtm_server_response_duration", "The request durations of a dtm server api",
            ["type", "api"], registry=r,
        )
        self.transaction_total = Counter(
            "dtm_transaction_process_total", "All transactions processed by dtm",
            ["model", "status"], registry=r,
        )
        self.transaction_duration = Histogram(
            "dtm_transaction_handled_duration",
            "Histogram of handling latency of the transaction that handled by the server.",
            ["model"], registry=r,
        )
        self.branch_total = Counter(
            "dtm_branch_process_total", "All branches processed by dtm",
            ["model", "branchid", "branchtype", "status"], registry=r,
        )
        self.due_backlog = Gauge(
            "coordinator_due_backlog", "Transactions due now and not leased, per partition",
            ["partition"], registry=r, multiprocess_mode="mostrecent",
        )
        self.oldest_due_age = Gauge(
            "coordinator_oldest_due_age_seconds",
            "How long the oldest due transaction of a partition has been waiting",
            ["partition"], registry=r, multiprocess_mode="mostrecent",
        )
        self.unfinished = Gauge(
            "coordinator_unfinished_transactions",
            f"Unfinished transactions by status (statuses read for the first {STATUS_SAMPLE} "
            "entries of each partition's due index)",
            ["status"], registry=r, multiprocess_mode="mostrecent",
        )
        self.retries = Counter(
            "coordinator_retries_total", "Rounds that ended in a retry later", ["model"],
            registry=r,
        )
        self.takeovers = Counter(
            "coordinator_lease_takeovers_total",
            "Claims of transactions whose previous owner's lease had run out", registry=r,
        )
        self.branch_latency = Histogram(
            "coordinator_branch_call_duration_seconds", "Branch call latency by outcome",
            ["outcome"], registry=r, buckets=LATENCY_BUCKETS,
        )
        self.script_latency = Histogram(
            "coordinator_script_duration_seconds", "Redis script latency by script",
            ["script"], registry=r, buckets=LATENCY_BUCKETS,
        )
        self.inflight = Gauge(
            "coordinator_inflight_transactions", "Transactions being driven right now",
            registry=r, multiprocess_mode="livesum",
        )
        self.waiters = Gauge(
            "coordinator_wait_result_waiters", "Submit requests waiting for the outcome",
            registry=r, multiprocess_mode="livesum",
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- Observer hooks (engine and store) ------------------------------------------------

    def finished(self, trans: Trans, status: Status, now_ms: int) -> None:
        ok = "ok" if status is Status.SUCCEED else "fail"
        self._child(self.transaction_total, trans.trans_type, ok).inc()
        if trans.create_time:
            seconds = max(0.0, (now_ms - trans.create_time) / 1000)
            self._child(self.transaction_duration, trans.trans_type).observe(seconds)

    def branches_done(
        self, trans: Trans, branches: Sequence[Branch], outcomes: Mapping[str, Outcome]
    ) -> None:
        for b in branches:
            outcome = outcomes.get(b.key)
            ok = "ok" if outcome is not None and outcome.kind is OutcomeKind.SUCCESS else "fail"
            self._child(self.branch_total, trans.trans_type, b.branch_id, b.op.value, ok).inc()

    def retried(self, trans: Trans) -> None:
        self._child(self.retries, trans.trans_type).inc()

    def lease_takeover(self) -> None:
        self.takeovers.inc()

    def script(self, name: str, seconds: float) -> None:
        self._child(self.script_latency, name).observe(seconds)

    def branch_call(self, outcome: OutcomeKind, seconds: float) -> None:
        self._child(self.branch_latency, outcome.value).observe(seconds)

    # -- HTTP --------------------------------------------------------------------------

    def request(self, api: str, failed: bool, seconds: float) -> None:
        self._child(self.process_total, "http", api, "fail" if failed else "ok").inc()
        self._child(self.response_duration, "http", api).observe(seconds)

    def render(self) -> bytes:
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)

    def totals(self) -> dict[str, float]:
        """Sums for the admin dashboard, from the same numbers a scrape shows."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self.render().decode()):
            for sample in family.samples:
                name = sample.name
                if name == "dtm_transaction_process_total":
                    key = f"transactions_{sample.labels.get('status', '')}"
                elif name == "dtm_branch_process_total":
                    key = f"branches_{sample.labels.get('status', '')}"
                elif name in ("coordinator_due_backlog", "coordinator_retries_total",
                              "coordinator_inflight_transactions",
                              "coordinator_wait_result_waiters",
                              "coordinator_lease_takeovers_total"):
                    key = name.removeprefix("coordinator_").removesuffix("_total")
                elif name == "coordinator_oldest_due_age_seconds":
                    out["oldest_due_age"] = max(out.get("oldest_due_age", 0.0), sample.value)
                    continue
                elif name == "coordinator_unfinished_transactions":
                    key = f"unfinished_{sample.labels.get('status', '')}"
                else:
                    continue
                out[key] = out.get(key, 0.0) + sample.value
        return out


def api_name(request: web.Request) -> str:
    """dtm's `api` label: the route's last path segment in lower case.

    Taken from the route's pattern, not the request path, so a gid or a topic in the
    path never becomes a label value (label sets must stay bounded).
    """
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    if resource is None:
        return "unknown"
    parts = [p for p in resource.canonical.split("/") if p and not p.startswith("{")]
    return parts[-1].lower() if parts else "root"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metrics_middleware(metrics: Metrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        failed = True
        try:
            response = await handler(request)
            failed = response.status >= 400
            return response
        finally:
            metrics.request(api_name(request), failed, time.perf_counter() - started)

    return middleware


class Refresher:
    """Keeps the Redis-derived gauges fresh, off the scrape path."""

    def __init__(
        self, metrics: Metrics, store: Any, engine: Any, service: Any, every: float
    ) -> None:
        self.every = every
        self.metrics = metrics
        self.store = store
        self.engine = engine
        self.service = service

    async def refresh_once(self) -> None:
        m = self.metrics
        m.inflight.set(self.engine.active)
        m.waiters.set(getattr(self.service, "waiters", 0))
        client = getattr(self.store, "client", None)
        keys = getattr(self.store, "keys", None)
        if client is None or keys is None:
            return
        now_ms = int(time.time() * 1000)
        partitions = range(self.store.partitions)
        async with client.pipeline(transaction=False) as pipe:
            for p in partitions:
                pipe.zcount(keys.due(p), "-inf", now_ms)
                pipe.zrangebyscore(keys.due(p), "-inf", now_ms, start=0, num=1, withscores=True)
                pipe.zrange(keys.due(p), 0, STATUS_SAMPLE - 1)
            replies = await pipe.execute()
        samples: list[tuple[int, str]] = []
        for p in partitions:
            count, oldest, members = replies[3 * p: 3 * p + 3]
            m.due_backlog.labels(str(p)).set(count)
            age = (now_ms - oldest[0][1]) / 1000 if oldest else 0.0
            m.oldest_due_age.labels(str(p)).set(max(0.0, age))
            samples += [(p, g) for g in members]
        counts = {s.value: 0 for s in UNFINISHED}
        async with client.pipeline(transaction=False) as pipe:
            for p, gid in samples:
                pipe.hget(keys.trans_prefix(p) + gid, "status")
            statuses = await pipe.execute() if samples else []
        for status in statuses:
            if status in counts:
                counts[status] += 1
        for status, n in counts.items():
            m.unfinished.labels(status).set(n)

    async def run(self) -> None:
        while True:
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep the last values, try again later
                log.warning("refreshing metrics from Redis failed: %s", exc)
            await asyncio.sleep(self.every)


@contextlib.asynccontextmanager
async def refreshing(refresher: Refresher) -> AsyncIterator[None]:
    task = asyncio.create_task(refresher.run(), name="coordinator-metrics")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
