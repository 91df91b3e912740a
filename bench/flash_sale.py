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
import sys
import time
from array import array
from typing import Any

import aiohttp

from bench.env import BenchEnv, free_port, redis_counters, wait_http
from bench.health import CpuMeter, LoopLag, lag_figures, with_lag
from bench.loadgen import run_load
from bench.progress import show_progress
from bench.scenarios import RunOptions, make_env
from bench.stats import Recorder, summarize, timeline
from coordinator.keys import FINISHED_BAND, KeySpace, tag

PARTITION = 3
ITEM = "item-1"
SERVICE_PROCESSES = 2
# A rate over a shorter phase than this is noise (or a division by almost nothing).
MIN_PHASE_SECONDS = 1.0


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
    for i in range(SERVICE_PROCESSES):
        await env.procs.spawn(
            f"flash-sale-{i}", sys.executable, "-m", "examples.flash_sale.service",
            "--port", str(port), "--redis-url", env.redis_url, "--partition", str(PARTITION),
            "--item", ITEM, "--reuse-port", root=env.root,
        )
    await wait_http(f"http://127.0.0.1:{port}/state")
    await wait_all_listening(f"http://127.0.0.1:{port}/state", SERVICE_PROCESSES)
    stock = opts.stock or int(max(2000, 4000 * opts.duration / 4))

    bought = array("d")

    def check(status: int, body: bytes) -> bool:
        if status == 200:
            bought.append(time.perf_counter())
            return True
        return status == 409 and b"sold out" in body

    orders_over_time: list[tuple[float, int]] = []
    recorder = Recorder()
    before: dict[str, int] = {}
    start = time.perf_counter()

    async def count_orders() -> None:
        orders_over_time.append((time.perf_counter() - start - opts.warmup,
                                 int(await r.hlen(orders_key))))

    async def open_sale() -> None:
        await asyncio.sleep(opts.warmup)
        before.update(await redis_counters(r))
        await r.set(stock_key, stock)
        while True:
            await count_orders()
            await asyncio.sleep(0.25)

    sale = asyncio.create_task(open_sale())
    progress = asyncio.create_task(
        show_progress("flash-sale", recorder, opts.warmup, opts.duration)
    )
    user = [0]

    def factory(n: int) -> tuple[str, str, bytes]:
        user[0] += 1
        return "POST", f"/buy?user=u{user[0]}", b""

    lags = LoopLag(env.port)
    cpu = CpuMeter()
    load = await run_load("127.0.0.1", port, factory, check, concurrency=opts.concurrency,
                          duration=opts.duration, warmup=opts.warmup, recorder=recorder)
    cpu_share = cpu.share()
    after = await redis_counters(r)
    lag = await lags.stop()
    progress.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await progress

    # Let the coordinator deliver every message that was created.
    keys = KeySpace("coord", 16)

    async def unfinished_count() -> int:
        # Below the due index's finished band: the transactions still to finish.
        return int(await r.zcount(keys.due(PARTITION), "-inf", f"({FINISHED_BAND}"))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and await unfinished_count():
        await asyncio.sleep(0.2)
    sale.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sale
    # The sampler looks every 0.25 s: the last orders may land after its last look, which
    # left orders_per_s empty. One more look now bounds the finish from above.
    await count_orders()

    left = int(await r.get(stock_key) or 0)
    orders = int(await r.hlen(orders_key))
    unfinished = await unfinished_count()
    sold = stock - left
    successes = sum(1 for x in bought if x >= start + opts.warmup)
    correct = left >= 0 and orders == sold == successes and unfinished == 0
    s = summarize(recorder, opts.duration)
    n = max(s.count, 1)
    measured_start = start + opts.warmup
    buys = [x - measured_start for x in bought if x >= measured_start]
    sell_seconds = (max(buys) - min(buys)) if len(buys) > 1 else 0.0
    sold_out = max(0, s.count - successes)
    # The sold-out phase runs from the last successful buy to the end; a stock that
    # lasted (nearly) the whole run leaves no phase to measure a rate over.
    sold_out_seconds = opts.duration - (max(buys) if buys else 0.0)
    done_at = next((sec for sec, count in orders_over_time if count >= sold), None)
    return {
        "scenario": "flash-sale",
        "tx_per_s": round(s.per_s, 1),
        "requests": s.count,
        "p50_ms": round(s.p50_ms, 2),
        "p95_ms": round(s.p95_ms, 2),
        "p99_ms": round(s.p99_ms, 2),
        "errors": load.errors,
        "error_samples": load.error_samples,
        "loadgen": "python",
        "loadgen_cpu_share": round(cpu_share, 3),
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
        "redis_calls_per_tx": round((after["script_calls"] - before["script_calls"]) / n, 2),
        "redis_commands_per_tx": round((after["commands"] - before["commands"]) / n, 2),
        "redis_bytes_per_tx": round((after["bytes"] - before["bytes"]) / n, 1),
        "redis_usec_per_tx": round((after["script_usec"] - before["script_usec"]) / n, 1),
        "redis_cpu_us_per_tx": round((after["cpu_usec"] - before["cpu_usec"]) / n, 1),
        **lag_figures(lag, measured_start),
        "timeline": with_lag(timeline(recorder, measured_start, int(opts.duration)), lag,
                             measured_start),
        "orders_timeline": orders_over_time,
    }
