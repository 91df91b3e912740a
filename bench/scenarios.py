"""The benchmark scenarios. Each returns a result dict that the report prints and saves."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from redis.asyncio.cluster import RedisCluster

from bench.env import ROOT, BenchEnv, free_port, redis_counters
from bench.grpc_load import run_grpc_saga_load
from bench.health import (
    CoordinatorCpu,
    CpuMeter,
    LoopLag,
    RedisRewrites,
    lag_figures,
    rewrite_figures,
    tree_cpu_seconds,
    with_lag,
)
from bench.loadgen import LoadResult, RequestFactory, run_load
from bench.progress import show_progress
from bench.stats import Recorder, summarize, timeline
from bench.wrk import run_wrk, wrk_path
from coordinator.keys import KeySpace
from coordinator.machines.saga import branches_for
from coordinator.model import BranchStatus, Options, Status, Trans
from coordinator.store.base import Transition
from coordinator.store.redis_store import RedisStore


@dataclass(frozen=True)
class RunOptions:
    duration: float = 20.0
    warmup: float = 3.0
    concurrency: int = 64
    workers: int = 2
    redis_url: str | None = None
    stock: int = 0
    # Run the coordinator from this checkout instead of the current code (--compare).
    root: Path | None = None
    # How the load generator submits: dtm's HTTP API or its gRPC API (dtmgimp.Dtm).
    protocol: str = "http"
    # A private Redis Cluster of this many primaries (one replica each) instead of Redis.
    cluster: int = 0
    # redis.wait_replicas for the coordinator.
    wait_replicas: int = 0
    # Who drives HTTP saga submits and flash-sale buys: "wrk" (when installed) or
    # "python" (bench/loadgen.py).
    loadgen: str = "python"

    @property
    def label(self) -> str:
        """What the run stores on, for the report."""
        where = f" cluster{self.cluster}" if self.cluster else ""
        return where + (f" wait{self.wait_replicas}" if self.wait_replicas else "")


def ok_200(status: int, body: bytes) -> bool:
    return status == 200 and b"FAILURE" not in body


async def measure(
    label: str, env: BenchEnv, steps: list[dict[str, str]], opts: RunOptions
) -> dict[str, Any]:
    """Drive load at the coordinator and summarise latency, throughput and Redis cost."""
    assert env.redis is not None
    recorder = Recorder()
    progress = asyncio.create_task(show_progress(label, recorder, opts.warmup, opts.duration))
    before: dict[str, int] = {}

    async def snapshot_after_warmup() -> None:
        await asyncio.sleep(opts.warmup)
        assert env.redis is not None
        before.update(await redis_counters(env.redis))

    if opts.protocol == "http" and opts.loadgen == "wrk":
        return await measure_wrk(label, env, steps, opts)
    snap = asyncio.create_task(snapshot_after_warmup())
    lags = LoopLag(env.port)
    rewrites = RedisRewrites(env.redis)
    start = time.perf_counter()
    cpu = CpuMeter()
    coordinator_cpu = CoordinatorCpu(env.coordinator_pid, opts.warmup)
    result: LoadResult
    if opts.protocol == "grpc":
        result = await run_grpc_saga_load(
            env.grpc_port, uuid.uuid4().hex[:8], steps, concurrency=opts.concurrency,
            duration=opts.duration, warmup=opts.warmup, recorder=recorder,
        )
    else:
        result = await run_load(
            "127.0.0.1", env.port, saga_factory(steps), ok_200, concurrency=opts.concurrency,
            duration=opts.duration, warmup=opts.warmup, recorder=recorder,
        )
    cpu_share = cpu.share()
    coordinator_s = coordinator_cpu.used()
    await snap
    after = await redis_counters(env.redis)
    lag = await lags.stop()
    forked = await rewrites.stop()
    progress.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await progress
    s = summarize(recorder, opts.duration)
    return {
        "scenario": label if opts.protocol == "http" else f"{label} ({opts.protocol})",
        "loadgen": "python" if opts.protocol == "http" else "python-grpc",
        "tx_per_s": round(s.per_s, 1),
        "transactions": s.count,
        "p50_ms": round(s.p50_ms, 2),
        "p95_ms": round(s.p95_ms, 2),
        "p99_ms": round(s.p99_ms, 2),
        "max_ms": round(s.max_ms, 2),
        "errors": result.errors,
        "error_samples": result.error_samples,
        "loadgen_cpu_share": round(cpu_share, 3),
        "coordinator_cpu_us_per_tx": round(coordinator_s * 1e6 / max(s.count, 1), 1),
        **redis_cost(before, after, s.count),
        **lag_figures(lag, start + opts.warmup),
        **rewrite_figures(forked, start + opts.warmup, opts.duration),
        "timeline": with_lag(timeline(recorder, start + opts.warmup, int(opts.duration)),
                             lag, start + opts.warmup),
    }


def redis_cost(before: dict[str, int], after: dict[str, int], count: int) -> dict[str, Any]:
    """Redis's work per transaction from INFO counter deltas over the measured window."""
    n = max(count, 1)
    return {
        "redis_calls_per_tx": round((after["script_calls"] - before["script_calls"]) / n, 2),
        "redis_commands_per_tx": round((after["commands"] - before["commands"]) / n, 2),
        "redis_bytes_per_tx": round((after["bytes"] - before["bytes"]) / n, 1),
        "redis_usec_per_tx": round((after["script_usec"] - before["script_usec"]) / n, 1),
        "redis_cpu_us_per_tx": round((after["cpu_usec"] - before["cpu_usec"]) / n, 1),
        "redis_forks": after["forks"] - before["forks"],
        "redis_child_cpu_us_per_tx": round(
            (after["child_cpu_usec"] - before["child_cpu_usec"]) / n, 1),
        # On a cluster: the same per primary (its share of the partitions' work).
        "redis_usec_per_tx_by_node": {
            key.split("@", 1)[1]: round((value - before.get(key, 0)) / n, 1)
            for key, value in after.items() if key.startswith("script_usec@")
        },
        # Calls and µs per transaction of each command Redis ran, inside scripts or not.
        "redis_by_command_per_tx": {
            key.split(":", 1)[1]: [round((after[key] - before.get(key, 0)) / n, 2),
                                   round((after["usec:" + key.split(":", 1)[1]]
                                          - before.get("usec:" + key.split(":", 1)[1], 0)) / n,
                                         1)]
            for key in after if key.startswith("calls:") and after[key] != before.get(key, 0)
        },
    }


async def measure_wrk(
    label: str, env: BenchEnv, steps: list[dict[str, str]], opts: RunOptions
) -> dict[str, Any]:
    """measure() with wrk driving the submits: warm-up run, counters, measured run."""
    assert env.redis is not None
    head, tail = submit_template(steps)
    url = f"http://127.0.0.1:{env.port}"
    if opts.warmup > 0:
        await run_wrk(url, head, tail, concurrency=opts.concurrency, duration=opts.warmup,
                      warmup=0)
    before = await redis_counters(env.redis)
    lags = LoopLag(env.port)
    rewrites = RedisRewrites(env.redis)
    start = time.perf_counter()
    cpu_before = tree_cpu_seconds(env.coordinator_pid)
    w = await run_wrk(url, head, tail, concurrency=opts.concurrency, duration=opts.duration,
                      warmup=0)
    coordinator_s = tree_cpu_seconds(env.coordinator_pid) - cpu_before
    after = await redis_counters(env.redis)
    lag = await lags.stop()
    forked = await rewrites.stop()
    first = min(w.per_second, default=0)
    points = [(float(s - first), float(n), math.nan) for s, n in sorted(w.per_second.items())]
    # wrk counts by wall-clock second: the lag samples are placed on the same clock.
    offset = time.time() - time.perf_counter()
    lag_wall = [(t + offset - first, v) for t, v in lag]
    return {
        "scenario": label,
        "loadgen": "wrk",
        "tx_per_s": round(w.ok / w.seconds, 1),
        "transactions": w.ok,
        "p50_ms": round(w.p50_ms, 2),
        "p95_ms": round(w.p95_ms, 2),
        "p99_ms": round(w.p99_ms, 2),
        "max_ms": round(w.max_ms, 2),
        "errors": w.failed,
        "error_samples": w.error_samples,
        "status_codes": w.statuses,
        "loadgen_cpu_share": round(w.cpu_share, 3),
        "coordinator_cpu_us_per_tx": round(coordinator_s * 1e6 / max(w.ok, 1), 1),
        **redis_cost(before, after, w.ok),
        **lag_figures(lag, start),
        # On the timeline's clock: wrk's wall-clock seconds, from its first one.
        **rewrite_figures(forked, first - offset, opts.duration),
        "timeline": with_lag(points, lag_wall, 0.0),
    }


def submit_template(steps: list[dict[str, str]]) -> tuple[str, str]:
    """The JSON of a saga submit around its gid: (before the gid, after it)."""
    payloads = ["{}"] * len(steps)
    template = orjson.dumps(
        {"gid": "GID", "trans_type": "saga", "steps": steps, "payloads": payloads,
         "wait_result": True}
    ).decode()
    head, tail = template.split("GID")
    return head, tail


def resolve_loadgen(choice: str) -> str:
    """--loadgen auto: wrk when it is installed, else the Python generator."""
    if choice == "auto":
        return "wrk" if wrk_path() else "python"
    return choice


def saga_factory(steps: list[dict[str, str]]) -> RequestFactory:
    run = uuid.uuid4().hex[:8]
    head, tail = submit_template(steps)

    def factory(n: int) -> tuple[str, str, bytes]:
        return "POST", "/api/dtmsvr/submit", f"{head}{run}-{n}{tail}".encode()

    return factory


def make_env(opts: RunOptions, workers: int | None = None, **env: Any) -> BenchEnv:
    """The scenario's Redis and coordinator, with the coordinator's default settings
    except those `env` names (environment variables)."""
    if opts.wait_replicas:
        env["COORDINATOR_REDIS_WAIT_REPLICAS"] = opts.wait_replicas
    return BenchEnv(opts.redis_url, workers or opts.workers, root=opts.root or ROOT,
                    cluster=opts.cluster, **env)


async def saga_empty(opts: RunOptions) -> dict[str, Any]:
    env = make_env(opts)
    await env.start()
    try:
        steps = [{"action": "", "compensate": ""}, {"action": "", "compensate": ""}]
        out = await measure("saga-empty" + opts.label, env, steps, opts)
        if not isinstance(env.redis, RedisCluster):  # the ceiling is a one-node figure
            out["ceiling"] = await redis_ceiling_on(env, opts, with_branch_writes=False)
        return out
    finally:
        await env.stop()


async def saga_http(opts: RunOptions) -> dict[str, Any]:
    """Two steps at a real participant: HTTP branches, or over --protocol grpc gRPC
    branches (``host:port/busi.Busi/TransOut``), as a go-zero service would be called."""
    env = make_env(opts)
    await env.start()
    try:
        grpc_port = free_port() if opts.protocol == "grpc" else 0
        port = await env.spawn_participant(grpc_port)
        base = f"127.0.0.1:{grpc_port}/busi.Busi" if grpc_port else f"http://127.0.0.1:{port}"
        steps = [
            {"action": f"{base}/TransOut", "compensate": f"{base}/TransOutRevert"},
            {"action": f"{base}/TransIn", "compensate": f"{base}/TransInRevert"},
        ]
        out = await measure("saga", env, steps, opts)
        # Which branches were called how often, by path: the proof of the protocol used.
        out["branch_calls"] = await branch_calls(port)
        out["ceiling"] = await redis_ceiling_on(env, opts, with_branch_writes=True)
        return out
    finally:
        await env.stop()


async def branch_calls(port: int) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}/stats"
    ) as reply:
        counts: dict[str, int] = await reply.json()
    return counts


async def redis_ceiling_on(
    env: BenchEnv, opts: RunOptions, *, with_branch_writes: bool, seconds: float = 5.0
) -> dict[str, Any]:
    """The same scripts a two-step saga runs, sent straight to Redis by EVALSHA.

    The physical reference: what this Redis sustains for the same work with no HTTP and
    no coordinator logic, pipelined 50 transactions deep on 4 connections.
    """
    assert env.redis_url
    store = RedisStore.from_url(env.redis_url, KeySpace("ceiling", 16))
    await store.start()
    steps = ({"action": "", "compensate": ""}, {"action": "", "compensate": ""})
    branches = branches_for(steps)
    template = Trans(gid="", trans_type="saga", status=Status.SUBMITTED, steps=steps,
                     payloads=("{}", "{}"), branches=branches, options=Options(wait_result=True))
    shas = {name: store.scripts[name].sha for name in ("create", "transition")}
    # The branch records as the engine holds them after its create (see
    # Transition.records): the finish sends them whole, as the engine does. The create
    # time is this host's, close enough for records nobody reads.
    created = int(time.time() * 1000)
    held = {b.key: replace(b, seq=i + 1, create_time=created, update_time=created)
            for i, b in enumerate(branches)}
    expected = frozenset({Status.SUBMITTED})
    scripts_per_tx = 3 if with_branch_writes else 2
    done = 0
    run = uuid.uuid4().hex[:8]
    deadline = time.perf_counter() + seconds

    async def lane(lane_id: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            gids = [f"{run}-{lane_id}-{n + i}" for i in range(50)]
            n += 50
            async with store.client.pipeline(transaction=False) as pipe:
                for gid in gids:
                    token = f"ceiling:{gid}"
                    keys, args = store.create_call(replace(template, gid=gid), due_in_ms=0,
                                                   owner=token)
                    pipe.evalsha(shas["create"], len(keys), *keys, *args)
                    if with_branch_writes:
                        keys, args = store.transition_call(gid, Transition(
                            expected=expected, owner=token, lease="renew",
                            branch_updates={branches[1].key: BranchStatus.SUCCEED},
                            records={branches[1].key: held[branches[1].key]}))
                        pipe.evalsha(shas["transition"], len(keys), *keys, *args)
                    keys, args = store.transition_call(gid, Transition(
                        expected=expected, new_status=Status.SUCCEED, owner=token,
                        lease="renew", branch_updates={branches[3].key: BranchStatus.SUCCEED},
                        records={branches[3].key: held[branches[3].key]}))
                    pipe.evalsha(shas["transition"], len(keys), *keys, *args)
                replies = await pipe.execute()
            assert all(r[0] == "OK" for r in replies), replies[:3]
            for gid, reply in zip(gids, replies[::scripts_per_tx], strict=True):
                store.created(gid, reply)  # its buckets are registered
            done += len(gids)

    start = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(4)))
    elapsed = time.perf_counter() - start
    await store.close()
    return {
        "tx_per_s": round(done / elapsed, 1),
        "scripts_per_tx": scripts_per_tx,
        "scripts_per_s": round(done * scripts_per_tx / elapsed, 1),
        "seconds": round(elapsed, 1),
    }


async def redis_ceiling(opts: RunOptions) -> dict[str, Any]:
    env = BenchEnv(opts.redis_url, 1)
    await env.start()
    try:
        result = await redis_ceiling_on(env, opts, with_branch_writes=False,
                                        seconds=opts.duration)
        return {"scenario": "redis-ceiling", **result, "p50_ms": None, "p95_ms": None,
                "p99_ms": None, "errors": 0, "redis_calls_per_tx": result["scripts_per_tx"],
                "redis_bytes_per_tx": None, "timeline": []}
    finally:
        await env.stop()


async def loadgen_ceiling(opts: RunOptions) -> dict[str, Any]:
    """The load generator against a trivial server: what it can drive at most.

    If this is far above a scenario's rate, the generator is not what limits it.
    """
    env = BenchEnv(opts.redis_url, 1)
    await env.start()
    try:
        port = await env.spawn_participant()
        recorder = Recorder()
        progress = asyncio.create_task(
            show_progress("loadgen", recorder, opts.warmup, opts.duration)
        )

        def factory(n: int) -> tuple[str, str, bytes]:
            return "POST", "/noop", b"{}"

        result = await run_load("127.0.0.1", port, factory, ok_200,
                                concurrency=opts.concurrency, duration=opts.duration,
                                warmup=opts.warmup, recorder=recorder)
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress
        s = summarize(recorder, opts.duration)
        return {"scenario": "loadgen-ceiling", "tx_per_s": round(s.per_s, 1),
                "p50_ms": round(s.p50_ms, 2), "p95_ms": round(s.p95_ms, 2),
                "p99_ms": round(s.p99_ms, 2), "errors": result.errors,
                "redis_calls_per_tx": 0, "redis_bytes_per_tx": 0,
                "timeline": timeline(recorder, time.perf_counter() - opts.duration,
                                     int(opts.duration))}
    finally:
        await env.stop()
