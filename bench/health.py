"""What a run costs besides the server's own work: the load generator's CPU, and how
healthy the coordinator's event loops stayed (their per-second longest stall)."""

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
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
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
