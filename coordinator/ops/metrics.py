"""Prometheus metrics: dtm's names and labels, plus the coordinator's own.

dtm's dashboards and alert rules keep working because the six `dtm_*` series carry the
names and labels of dtm's `dtmsvr/metrics.go` (status "ok"/"fail", api = the last path
segment in lower case). Ours are prefixed `coordinator_`.

Hot-path cost: prometheus-client's own counters and histograms take a lock per
update (and in multiprocess mode write an mmapped file), several microseconds per
transaction in all. So the hooks only add to plain dicts (`_Pending`), and a flush
every half second (and before every scrape this process answers) moves the sums
into the prometheus-client objects. Values read from Redis (backlog, oldest due age,
unfinished by status) are refreshed by a background task every
`server.metrics_refresh` seconds; a scrape only renders what is already in memory
and never touches Redis.

With `--workers N` the parent sets PROMETHEUS_MULTIPROC_DIR (a directory it creates
and removes, see coordinator/workers.py) before the children start, prometheus-client
then keeps every value in a per-process mmapped file, and a scrape answered by any
child sums the files of all of them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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
from coordinator.keys import FINISHED_BAND
from coordinator.machines.base import Outcome, OutcomeKind
from coordinator.model import UNFINISHED, Status, Trans
from coordinator.observer import Observer

log = logging.getLogger("coordinator.metrics")

# The `*_created` timestamp series double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# How many due-index entries per partition the refresher reads statuses of.
STATUS_SAMPLE = 1000
FLUSH_SECONDS = 0.5
# The loop-lag probe's timer: short enough to catch stalls of a few ms, long enough that
# its wake-ups (100 a second, a few µs each) cost nothing measurable.
LAG_PROBE_SECONDS = 0.01
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
        self.loop_lag = Gauge(
            "coordinator_event_loop_lag_seconds",
            f"Longest event-loop stall in the last {2 * FLUSH_SECONDS:g} s: how late a "
            f"{LAG_PROBE_SECONDS * 1000:.0f} ms timer fired (max over the workers)",
            registry=r, multiprocess_mode="livemax",
        )
        self._max_lag = self._previous_lag = 0.0
        self._counts: dict[tuple[Any, tuple[str, ...]], int] = {}
        self._observed: dict[tuple[Any, tuple[str, ...]], _Pending] = {}
        self._branches: dict[tuple[str, str, bool], int] = {}
        self._requests: dict[str, _Pending] = {}

    def _count(self, metric: Any, labels: tuple[str, ...]) -> None:
        key = (metric, labels)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _observe(self, metric: Histogram, labels: tuple[str, ...], value: float) -> None:
        pending = self._observed.get((metric, labels))
        if pending is None:
            child = metric.labels(*labels)
            pending = self._observed[(metric, labels)] = _Pending(child)
        pending.add(value)

    def lag(self, seconds: float) -> None:
        if seconds > self._max_lag:
            self._max_lag = seconds

    def flush(self) -> None:
        """Move what the hooks recorded into the prometheus-client metrics."""
        # Over the last two windows (about a second): a reader polling once a second
        # then misses no stall between its reads.
        self.loop_lag.set(max(self._max_lag, self._previous_lag))
        self._previous_lag, self._max_lag = self._max_lag, 0.0
        counts, self._counts = self._counts, {}
        for (metric, labels), n in counts.items():
            (metric.labels(*labels) if labels else metric).inc(n)
        branches, self._branches = self._branches, {}
        for (model, key, ok), n in branches.items():
            branch_id, _, op = key.partition(":")
            self.branch_total.labels(model, branch_id, op, "ok" if ok else "fail").inc(n)
        for pending in self._observed.values():
            pending.flush()
        for api, pending in self._requests.items():
            requests, failed = pending.flush()
            if requests - failed:
                self.process_total.labels("http", api, "ok").inc(requests - failed)
            if failed:
                self.process_total.labels("http", api, "fail").inc(failed)

    # -- Observer hooks (engine and store) ------------------------------------------------

    def finished(self, trans: Trans, status: Status, now_ms: int) -> None:
        ok = "ok" if status is Status.SUCCEED else "fail"
        self._count(self.transaction_total, (trans.trans_type, ok))
        if trans.create_time:
            seconds = max(0.0, (now_ms - trans.create_time) / 1000)
            self._observe(self.transaction_duration, (trans.trans_type,), seconds)

    def branches_done(self, trans: Trans, outcomes: Mapping[str, Outcome]) -> None:
        # Keyed by the branch key as it comes; split into branchid/branchtype at flush.
        counts = self._branches
        model = trans.trans_type
        for key, outcome in outcomes.items():
            k = (model, key, outcome.kind is OutcomeKind.SUCCESS)
            counts[k] = counts.get(k, 0) + 1

    def retried(self, trans: Trans) -> None:
        self._count(self.retries, (trans.trans_type,))

    def lease_takeover(self) -> None:
        self._count(self.takeovers, ())

    def script(self, name: str, seconds: float) -> None:
        self._observe(self.script_latency, (name,), seconds)

    def branch_call(self, outcome: OutcomeKind, seconds: float) -> None:
        # A StrEnum member is its value as a label (equal, same hash, str() alike)
        # without the Enum.value property, a Python-level call in 3.11.
        self._observe(self.branch_latency, (outcome,), seconds)

    # -- HTTP --------------------------------------------------------------------------

    def request(self, api: str, failed: bool, seconds: float) -> None:
        # One lookup per request: the API's latency histogram and its ok/fail counts.
        pending = self._requests.get(api)
        if pending is None:
            pending = self._requests[api] = _Pending(self.response_duration.labels("http", api))
        pending.add(seconds)
        if failed:
            pending.failed += 1

    def render(self) -> bytes:
        self.flush()
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


class _Pending:
    """Observations of one histogram child not yet handed to prometheus-client.

    The bucket search is a bisect over the same bounds; flushing adds the counts to
    the child's own bucket and sum values (the attributes its `observe` updates).
    """

    __slots__ = ("bounds", "child", "counts", "failed", "n", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.n = 0
        self.failed = 0  # used by API requests: how many of the n answered 4xx/5xx

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def flush(self) -> tuple[int, int]:
        """Hand the observations over; (how many, how many failed)."""
        if not self.n:
            return 0, 0
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        done, self.n, failed, self.failed = self.n, 0, self.failed, 0
        for i, n in enumerate(counts):
            if n:
                self.child._buckets[i].inc(n)
        self.child._sum.inc(total)
        return done, failed


_API_NAMES: dict[str, str] = {}


def api_name(request: web.Request) -> str:
    """dtm's `api` label: the route's last path segment in lower case.

    Taken from the route's pattern, not the request path, so a gid or a topic in the
    path never becomes a label value (label sets must stay bounded).
    """
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    if resource is None:
        return "unknown"
    canonical = resource.canonical
    name = _API_NAMES.get(canonical)
    if name is None:
        name = _API_NAMES[canonical] = api_label(canonical)
    return name


def api_label(route: str) -> str:
    """The `api` label of a route pattern: its last fixed path segment, lower case."""
    parts = [p for p in route.split("/") if p and not p.startswith("{")]
    return parts[-1].lower() if parts else "root"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metrics_middleware(metrics: Metrics) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except BaseException:
            metrics.request(api_name(request), True, time.perf_counter() - started)
            raise
        metrics.request(api_name(request), response.status >= 400,
                        time.perf_counter() - started)
        return response

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
                pipe.zrangebyscore(keys.due(p), "-inf", f"({FINISHED_BAND}", start=0,
                                   num=STATUS_SAMPLE)
            replies = await pipe.execute()
        samples: list[tuple[int, str]] = []
        for p in partitions:
            count, oldest, members = replies[3 * p: 3 * p + 3]
            m.due_backlog.labels(str(p)).set(count)
            age = (now_ms - oldest[0][1]) / 1000 if oldest else 0.0
            m.oldest_due_age.labels(str(p)).set(max(0.0, age))
            # Due entries are listing members, "<13-digit create ms>:<gid>".
            samples += [(p, member[14:]) for member in members]
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
        next_refresh = 0.0
        while True:
            # Often, so that a scrape answered by another worker lags at most that much.
            self.metrics.flush()
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self.every
                try:
                    await self.refresh_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away: keep the last values, try later
                    log.warning("refreshing metrics from Redis failed: %s", exc)
            await asyncio.sleep(min(FLUSH_SECONDS, self.every))


async def probe_loop_lag(metrics: Metrics) -> None:
    """How late a short timer fires is how long the loop was busy with something else:
    the stalls that become tail latency (a GC pass, a slow callback)."""
    # perf_counter, not loop.time(): uvloop's clock is cached per iteration in whole ms.
    clock = time.perf_counter
    while True:
        started = clock()
        await asyncio.sleep(LAG_PROBE_SECONDS)
        metrics.lag(max(0.0, clock() - started - LAG_PROBE_SECONDS))


@contextlib.asynccontextmanager
async def refreshing(refresher: Refresher) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(refresher.run(), name="coordinator-metrics"),
             asyncio.create_task(probe_loop_lag(refresher.metrics), name="coordinator-lag")]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        # Bounded: a Redis read cancelled in flight may only end when the store closes
        # its connections, which comes later in the shutdown; waiting here for it would
        # hang the stop (seen with a SIGTERM right after start-up).
        await asyncio.wait(tasks, timeout=1.0)
