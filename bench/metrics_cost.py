"""What metrics cost per transaction, in CPU time of the coordinator process.

Throughput on a shared machine swings by 2x between runs of the same code, so this
measures what contention disturbs least: the CPU seconds the coordinator process
itself spends (utime + stime from /proc) per saga-empty transaction, alternating
`server.metrics` off and on. With `--multiprocess` the process keeps its values in
prometheus-client's mmapped files, as each child of `--workers N` does.

    python -m bench.metrics_cost --pairs 5 --transactions 3000 [--multiprocess]
    python -m bench.metrics_cost --hooks

`--hooks` times, in this process, exactly what one saga-empty transaction records (two
script latencies, one round of two branches, the finish, one API request through the
middleware) against the same calls on the no-op observer: the cost without any noise
from Redis, the network or the other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import aiohttp
import redis

from bench.env import ROOT, free_port, wait_http
from coordinator.machines.base import SUCCESS
from coordinator.model import Status, Trans
from coordinator.observer import NULL_OBSERVER, Observer
from coordinator.ops.metrics import Metrics, metrics_middleware

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / float(TICK)


async def drive(base: str, count: int, concurrency: int) -> None:
    body = {"trans_type": "saga", "wait_result": True,
            "steps": [{"action": "", "compensate": ""}, {"action": "", "compensate": ""}],
            "payloads": ["{}", "{}"]}
    gate = asyncio.Semaphore(concurrency)
    run = uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            async with gate, s.post(f"{base}/api/dtmsvr/submit",
                                    json={**body, "gid": f"{run}-{i}"}) as r:
                assert r.status == 200, await r.text()

        await asyncio.gather(*(one(i) for i in range(count)))


async def measure(metrics: bool, args: argparse.Namespace) -> float:
    """CPU µs per transaction of one coordinator process."""
    prefix = "mc" + uuid.uuid4().hex[:8]
    port = free_port()
    env = {**os.environ, "COORDINATOR_SERVER_METRICS": str(metrics).lower(),
           "COORDINATOR_REDIS_KEY_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    folder = tempfile.mkdtemp(prefix="metrics-cost-") if args.multiprocess else ""
    if folder:
        env["PROMETHEUS_MULTIPROC_DIR"] = folder
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--port", str(port),
         "--redis-url", args.redis_url, "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/api/ping")
        await drive(base, args.transactions // 5, args.concurrency)  # warm-up
        before = cpu_seconds(proc.pid)
        await drive(base, args.transactions, args.concurrency)
        used: float = cpu_seconds(proc.pid) - before
        return float(used / args.transactions * 1e6)
    finally:
        proc.terminate()
        proc.wait(30)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        client.close()


async def main(args: argparse.Namespace) -> None:
    off: list[float] = []
    on: list[float] = []
    for i in range(args.pairs):
        for metrics, out in ((False, off), (True, on)) if i % 2 == 0 else (
                (True, on), (False, off)):
            out.append(await measure(metrics, args))
        print(f"pair {i + 1}: off {off[-1]:.0f} µs/tx, on {on[-1]:.0f} µs/tx", flush=True)
    a, b = statistics.median(off), statistics.median(on)
    print(f"median CPU per transaction: metrics off {a:.0f} µs, on {b:.0f} µs "
          f"({(b - a) / a * 100:+.1f} %)")


class _Request:
    """What the middleware reads of a request: its route's pattern."""

    class match_info:
        http_exception = None

        class route:
            class resource:
                canonical = "/api/dtmsvr/submit"


class _Response:
    status = 200


async def _handler(request: Any) -> Any:
    return _Response()


async def _plain(request: Any, handler: Any) -> Any:
    return await handler(request)


async def hooks(n: int = 100_000) -> None:
    trans = Trans("g", "saga", Status.SUBMITTED, create_time=1)
    outcomes = {"01:action": SUCCESS, "02:action": SUCCESS}

    async def run(obs: Observer, middleware: Any) -> float:
        started = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            obs.script("create", time.perf_counter() - t0)
            obs.branches_done(trans, outcomes)
            t0 = time.perf_counter()
            obs.script("transition", time.perf_counter() - t0)
            obs.finished(trans, Status.SUCCEED, 5)
            await middleware(_Request, _handler)
        return (time.process_time() - started) / n * 1e6

    metrics = Metrics()
    off = min([await run(NULL_OBSERVER, _plain) for _ in range(5)])
    on = min([await run(metrics, metrics_middleware(metrics)) for _ in range(5)])
    print(f"per transaction, best of 5: no-op hooks {off:.2f} µs, metrics {on:.2f} µs: "
          f"metrics cost {on - off:.2f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--transactions", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--multiprocess", action="store_true",
                        help="values in mmapped files, as under --workers N")
    parser.add_argument("--hooks", action="store_true",
                        help="only time the hooks in this process")
    options = parser.parse_args()
    asyncio.run(hooks() if options.hooks else main(options))
