"""The flash-sale scenario: buyers hammer one item; stock runs out; everything must add up.

During the warm-up the stock is zero (every buyer is told "sold out"); when measuring
starts the stock is set, buyers succeed until it runs out, then the sold-out path takes
over. Afterwards the run waits for the coordinator to deliver every purchase message and
checks: orders == units sold == successful buyer answers, stock never negative, one
order per purchase, no unfinished transaction left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import sys
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.env import BenchEnv, free_port, redis_counters, wait_http
from bench.health import (
    CpuMeter,
    LoopLag,
    RedisRewrites,
    lag_figures,
    rewrite_figures,
    tree_cpu_seconds,
    with_lag,
)
from bench.loadgen import run_load
from bench.progress import show_progress
from bench.scenarios import RunOptions, make_env, redis_cost
from bench.stats import Recorder, summarize, timeline
from bench.wrk import run_wrk
from coordinator.keys import FINISHED_BAND, KeySpace, tag

PARTITION = 3
ITEM = "item-1"
SERVICE_PROCESSES = 2
# A rate over a shorter phase than this is noise (or a division by almost nothing).
MIN_PHASE_SECONDS = 1.0
# How often the order count is read while orders are still coming: orders_per_s takes the
# first look that finds them all, so a look every 0.25 s put the finish up to 0.25 s late
# (6 % of a 4 s delivery). HLEN is cheap; once every unit is ordered, a look every 0.25 s.
ORDER_LOOK_S = 0.02
SETTLED_LOOK_S = 0.25


async def wait_all_listening(url: str, processes: int, timeout: float = 20.0) -> None:
    """Until `processes` different processes have answered on fresh connections.

    The load generator's keep-alive connections stay with the process that accepted
    them: opened while only the first service process listened, they all went to it
    and its sibling sat idle for the whole run.
    """
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {processes} processes answer at {url}")
        # A new connection each time: the kernel spreads connections, not requests.
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            state = await r.json(content_type=None)
        if "pid" not in state:
            return  # a service of an older revision (--compare) does not say
        seen.add(int(state["pid"]))
        await asyncio.sleep(0.02)


async def flash_sale(opts: RunOptions) -> dict[str, Any]:
    # The service creates each purchase's message unowned: the coordinator finds it by
    # polling, so a short poll interval is what delivers orders promptly.
    env = make_env(opts, COORDINATOR_ENGINE_POLL_INTERVAL="0.05")
    await env.start()
    try:
        return await _run(env, opts)
    finally:
        await env.stop()


async def _run(env: BenchEnv, opts: RunOptions) -> dict[str, Any]:
    assert env.redis is not None
    r = env.redis
    t = tag(PARTITION)
    stock_key, orders_key = f"flash:stock:{t}:{ITEM}", f"flash:orders:{t}:{ITEM}"
    await r.set(stock_key, 0)
    port = free_port()
    services = []
    for i in range(SERVICE_PROCESSES):
        services.append(await env.procs.spawn(
            f"flash-sale-{i}", sys.executable, "-m", "examples.flash_sale.service",
            "--port", str(port), "--redis-url", env.redis_url, "--partition", str(PARTITION),
            "--item", ITEM, "--reuse-port", root=env.root,
        ))
    await wait_http(f"http://127.0.0.1:{port}/state")
    await wait_all_listening(f"http://127.0.0.1:{port}/state", SERVICE_PROCESSES)
    stock = opts.stock or int(max(2000, 4000 * opts.duration / 4))

    orders_over_time: list[tuple[float, int]] = []
    before: dict[str, int] = {}
    # perf_counter time at which the stock is set, where the measured window starts.
    opened = [0.0]
    # CPU seconds of the coordinator's and of the service's processes at that moment.
    cpu_at_open = [0.0, 0.0]

    def cpu_now() -> list[float]:
        return [tree_cpu_seconds(env.coordinator_pid),
                sum(tree_cpu_seconds(pid) for pid in services)]

    async def count_orders() -> None:
        orders_over_time.append((time.perf_counter() - opened[0], int(await r.hlen(orders_key))))

    delivered = asyncio.Event()  # every order created (or given up on): sampling ends

    async def open_sale() -> None:
        before.update(await redis_counters(r))
        cpu_at_open[:] = cpu_now()
        opened[0] = time.perf_counter()
        await r.set(stock_key, stock)
        while not delivered.is_set():
            await count_orders()
            every = SETTLED_LOOK_S if orders_over_time[-1][1] >= stock else ORDER_LOOK_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(delivered.wait(), every)

    lags = LoopLag(env.port)
    rewrites = RedisRewrites(r)
    if opts.loadgen == "wrk":
        load = await _wrk_buyers(port, opts, open_sale)
    else:
        load = await _python_buyers(port, opts, open_sale)
    after = await redis_counters(r)
    lag = await lags.stop()
    forked = await rewrites.stop()
    sale = load.sale
    # Let the coordinator deliver every message that was created.
    keys = KeySpace("coord", 16)

    async def unfinished_count() -> int:
        # Below the due index's finished band: the transactions still to finish.
        return int(await r.zcount(keys.due(PARTITION), "-inf", f"({FINISHED_BAND}"))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and await unfinished_count():
        await asyncio.sleep(0.2)
    # Ended by the event rather than a cancel, which redis-py can swallow on Python 3.11
    # (a wait_for around a reply): the run then waited on the sampler for good.
    delivered.set()
    await sale
    # The sampler looks from time to time: the last orders may land after its last look, which
    # left orders_per_s empty. One more look now bounds the finish from above.
    await count_orders()
    coordinator_s, service_s = (b - a for a, b in zip(cpu_at_open, cpu_now(), strict=True))

    left = int(await r.get(stock_key) or 0)
    orders = int(await r.hlen(orders_key))
    unfinished = await unfinished_count()
    sold = stock - left
    successes = load.successes
    correct = left >= 0 and orders == sold == successes and unfinished == 0
    n = max(load.requests, 1)
    measured_start = opened[0]
    sell_seconds = load.last_buy - load.first_buy if successes > 1 else 0.0
    sold_out = max(0, load.requests - successes)
    # The sold-out phase runs from the last successful buy to the end; a stock that
    # lasted (nearly) the whole run leaves no phase to measure a rate over.
    sold_out_seconds = opts.duration - (load.last_buy - measured_start if successes else 0.0)
    done_at = next((sec for sec, count in orders_over_time if count >= sold), None)
    return {
        "scenario": "flash-sale",
        "tx_per_s": round(load.requests / opts.duration, 1),
        "requests": load.requests,
        "p50_ms": round(load.p50_ms, 2),
        "p95_ms": round(load.p95_ms, 2),
        "p99_ms": round(load.p99_ms, 2),
        "errors": load.errors,
        "error_samples": load.error_samples,
        "loadgen": opts.loadgen,
        "loadgen_cpu_share": round(load.cpu_share, 3),
        "stock": stock,
        "stock_sold": sold,
        "stock_left": left,
        "orders": orders,
        "successful_buys": successes,
        "unfinished_transactions": unfinished,
        "correct": correct,
        "buys_per_s": round(successes / sell_seconds, 1) if sell_seconds else None,
        "orders_per_s": round(sold / done_at, 1) if done_at else None,
        "sold_out_per_s": (round(sold_out / sold_out_seconds, 1)
                           if sold_out_seconds >= MIN_PHASE_SECONDS else None),
        # From the sale's opening to the last order delivered: the coordinator's CPU per
        # order (claim, branch call, finish; plus its idle polls), and the service's per
        # request it answered (buys, sold-out answers and the coordinator's order calls).
        "coordinator_cpu_us_per_order": round(coordinator_s * 1e6 / max(sold, 1), 1),
        "service_cpu_us_per_request": round(service_s * 1e6 / max(load.requests + orders, 1),
                                            1),
        **redis_cost(before, after, n),
        **lag_figures(lag, measured_start),
        **rewrite_figures(forked, measured_start, opts.duration),
        "timeline": with_lag(load.timeline, lag, measured_start),
        "orders_timeline": orders_over_time,
    }


@dataclass
class Buyers:
    """What the buyers saw over the measured window (successes: over the whole run)."""

    sale: asyncio.Task[None]  # open_sale, still counting orders
    requests: int  # answered as they should be (bought or sold out), measured window
    successes: int  # successful buys, exact
    first_buy: float  # perf_counter times of the first and the last successful buy
    last_buy: float
    errors: int
    error_samples: list[str]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_share: float
    timeline: list[tuple[float, float, float]]  # measured second, completions, p99 ms


async def _python_buyers(
    port: int, opts: RunOptions, open_sale: Callable[[], Coroutine[Any, Any, None]]
) -> Buyers:
    """bench/loadgen.py: warm-up and measured window in one run, the sale opened
    (stock set) when the warm-up ends."""
    bought = array("d")

    def check(status: int, body: bytes) -> bool:
        if status == 200:
            bought.append(time.perf_counter())
            return True
        return status == 409 and b"sold out" in body

    async def open_after_warmup() -> None:
        await asyncio.sleep(opts.warmup)
        await open_sale()

    recorder = Recorder()
    start = time.perf_counter()
    sale = asyncio.create_task(open_after_warmup())
    progress = asyncio.create_task(
        show_progress("flash-sale", recorder, opts.warmup, opts.duration)
    )
    user = [0]

    def factory(n: int) -> tuple[str, str, bytes]:
        user[0] += 1
        return "POST", f"/buy?user=u{user[0]}", b""

    cpu = CpuMeter()
    load = await run_load("127.0.0.1", port, factory, check, concurrency=opts.concurrency,
                          duration=opts.duration, warmup=opts.warmup, recorder=recorder)
    cpu_share = cpu.share()
    progress.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await progress
    s = summarize(recorder, opts.duration)
    return Buyers(
        sale=sale, requests=s.count, successes=len(bought),
        first_buy=min(bought, default=0.0), last_buy=max(bought, default=0.0),
        errors=load.errors, error_samples=load.error_samples,
        p50_ms=s.p50_ms, p95_ms=s.p95_ms, p99_ms=s.p99_ms, cpu_share=cpu_share,
        timeline=timeline(recorder, start + opts.warmup, int(opts.duration)),
    )


async def _wrk_buyers(
    port: int, opts: RunOptions, open_sale: Callable[[], Coroutine[Any, Any, None]]
) -> Buyers:
    """wrk: an unrecorded warm-up run (stock 0: every buyer told "sold out"), then the
    sale opens as the measured run starts. Every answer is counted by wrk's script:
    200 a success, 409 "sold out" a refusal, anything else an error.

    wrk drops the answers still in flight when its time is up: the stock has to sell
    out before then (as it does, in about a quarter of the run), or a buy whose answer
    was dropped leaves the books one success short."""
    buy = functools.partial(
        run_wrk, f"http://127.0.0.1:{port}", "", "", path="/buy?user=", id_in_path=True,
        refused=(409, "sold out"), concurrency=opts.concurrency, warmup=0.0,
    )
    runs = []
    if opts.warmup > 0:
        runs.append(await buy(duration=opts.warmup))
    measure = asyncio.create_task(buy(duration=opts.duration))
    sale = asyncio.create_task(open_sale())
    w = await measure
    runs.append(w)
    # perf_counter and time.time() differ by a constant (up to clock steps).
    offset = time.perf_counter() - time.time()
    successes = sum(x.ok for x in runs)
    samples = [e for x in runs for e in x.error_samples][:5]
    first = min(w.per_second, default=0)
    return Buyers(
        sale=sale, requests=w.ok + w.refused, successes=successes,
        first_buy=w.first_ok + offset if w.ok else 0.0,
        last_buy=w.last_ok + offset if w.ok else 0.0,
        errors=sum(x.failed for x in runs), error_samples=samples,
        p50_ms=w.p50_ms, p95_ms=w.p95_ms, p99_ms=w.p99_ms, cpu_share=w.cpu_share,
        timeline=[(float(sec - first), float(n), math.nan)
                  for sec, n in sorted(w.per_second.items())],
    )
