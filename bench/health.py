"""What a run costs besides the server's own work: the load generator's CPU, how
healthy the coordinator's event loops stayed (their per-second longest stall), and when
Redis was rewriting its AOF."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import statistics
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

LAG_METRIC = "coordinator_event_loop_lag_seconds"


class CpuMeter:
    """CPU time of this process (the Python load generator runs in it) over wall time."""

    def __init__(self) -> None:
        self.cpu = self._cpu()
        self.wall = time.monotonic()

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def share(self) -> float:
        """Fraction of the machine's CPU (all cores) this process used since creation."""
        wall = time.monotonic() - self.wall
        return (self._cpu() - self.cpu) / (wall * (os.cpu_count() or 1)) if wall else 0.0


def tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds used so far by a process and its live descendants.

    Read from /proc (Linux): the coordinator's supervisor and its `--workers` children.
    A figure per transaction from it does not depend on how busy the rest of the machine
    is, unlike throughput, so revisions compare fairly on a shared machine.
    """
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces: split after its closing paren.
        fields = raw[raw.rindex(b")") + 2:].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root_pid]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total


class CoordinatorCpu:
    """CPU seconds the coordinator's processes use from `after` seconds on (the end of
    the warm-up, which the Python generator runs inside the same call) until `used()`."""

    def __init__(self, pid: int, after: float) -> None:
        self.pid = pid
        self._start: float | None = None
        self._timer = asyncio.get_running_loop().call_later(after, self._mark)

    def _mark(self) -> None:
        self._start = tree_cpu_seconds(self.pid)

    def used(self) -> float:
        self._timer.cancel()
        if self._start is None:
            return 0.0
        return tree_cpu_seconds(self.pid) - self._start


class LoopLag:
    """Reads the coordinator's loop-lag gauge (the longest stall of the last second, the
    largest over the workers) once a second while a run goes on.

    A revision without the gauge (an older one under --compare) simply yields none.
    """

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/api/metrics"
        self.samples: list[tuple[float, float]] = []  # (perf_counter, lag in ms)
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(aiohttp.ClientError, ValueError, TimeoutError):
                    async with session.get(self.url) as reply:
                        text = await reply.text()
                    for line in text.splitlines():
                        if line.startswith(LAG_METRIC + " "):
                            value = float(line.split()[1]) * 1000
                            self.samples.append((time.perf_counter(), value))

    async def stop(self) -> list[tuple[float, float]]:
        self._task.cancel()
        # Bounded: a cancel swallowed inside a client (Python 3.11) must not hold the run.
        await asyncio.wait({self._task}, timeout=5)
        return self.samples


def lag_figures(samples: list[tuple[float, float]], start: float) -> dict[str, Any]:
    """Median and worst of the per-second longest stall over the measured window."""
    values = [v for t, v in samples if t >= start]
    if not values:
        return {"loop_lag_ms_median": None, "loop_lag_ms_max": None}
    return {"loop_lag_ms_median": round(statistics.median(values), 2),
            "loop_lag_ms_max": round(max(values), 2)}


def with_lag(
    points: list[tuple[float, float, float]], samples: list[tuple[float, float]], start: float
) -> list[tuple[float, float, float, float]]:
    """Each timeline second gets the longest loop stall read during it (NaN if none)."""
    by_second: dict[int, float] = {}
    for t, v in samples:
        i = int(t - start)
        by_second[i] = max(by_second.get(i, 0.0), v)
    return [(s, n, p99, by_second.get(int(s), math.nan)) for s, n, p99 in points]


class RedisRewrites:
    """Asks Redis every 0.2 s whether a fork child is at work (an AOF rewrite, or an RDB
    save) while a run goes on: the child writes the whole dataset on another core, and
    its fork stalls Redis, so a report should say when one ran (on a cluster: on any
    primary)."""

    INTERVAL = 0.2

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.client = client
        self.samples: list[tuple[float, bool]] = []  # (perf_counter, a child at work)
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                self.samples.append((time.perf_counter(), await self._busy()))
            await asyncio.sleep(self.INTERVAL)

    async def _busy(self) -> bool:
        if isinstance(self.client, RedisCluster):
            infos = [await self.client.info("persistence", target_nodes=node)
                     for node in self.client.get_primaries()]
        else:
            infos = [await self.client.info("persistence")]
        return any(int(i.get("aof_rewrite_in_progress", 0)) or
                   int(i.get("rdb_bgsave_in_progress", 0)) for i in infos)

    async def stop(self) -> list[tuple[float, bool]]:
        self._task.cancel()
        # Bounded, as LoopLag.stop.
        await asyncio.wait({self._task}, timeout=5)
        return self.samples


def rewrite_figures(samples: list[tuple[float, bool]], start: float,
                    duration: float) -> dict[str, Any]:
    """The spans of the measured window (seconds from `start`, clipped to `duration`)
    during which Redis had a fork child at work, and their total length. A span runs
    from the first look that saw the child to the first that no longer did (or the last
    look)."""
    spans: list[list[float]] = []
    begun: float | None = None
    for t, busy in samples:
        if busy and begun is None:
            begun = t
        elif not busy and begun is not None:
            spans.append([begun, t])
            begun = None
    if begun is not None and samples:
        spans.append([begun, samples[-1][0]])
    clipped = [[max(a - start, 0.0), min(b - start, duration)] for a, b in spans]
    clipped = [[round(a, 2), round(b, 2)] for a, b in clipped if b > a]
    return {"redis_rewrite_spans": clipped,
            "redis_rewrite_s": round(sum(b - a for a, b in clipped), 2)}
