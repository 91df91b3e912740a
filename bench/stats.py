"""Latency and throughput bookkeeping for benchmark runs."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass


class Recorder:
    """Keeps every sample (end time, latency, ok) in compact arrays."""

    def __init__(self) -> None:
        self.ends = array("d")
        self.latencies = array("d")
        self.failed = 0

    def add(self, end: float, latency: float, ok: bool) -> None:
        if ok:
            self.ends.append(end)
            self.latencies.append(latency)
        else:
            self.failed += 1

    def __len__(self) -> int:
        return len(self.latencies)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass(frozen=True)
class Summary:
    count: int
    seconds: float
    per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def summarize(rec: Recorder, seconds: float) -> Summary:
    values = sorted(rec.latencies)
    return Summary(
        count=len(values),
        seconds=seconds,
        per_s=len(values) / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(values, 50) * 1000,
        p95_ms=percentile(values, 95) * 1000,
        p99_ms=percentile(values, 99) * 1000,
        max_ms=(values[-1] * 1000) if values else math.nan,
    )


def timeline(rec: Recorder, start: float, seconds: int) -> list[tuple[float, float, float]]:
    """Per second: (second, completions per second, p99 latency in ms)."""
    buckets: list[list[float]] = [[] for _ in range(max(seconds, 1))]
    for end, lat in zip(rec.ends, rec.latencies, strict=True):
        i = int(end - start)
        if 0 <= i < len(buckets):
            buckets[i].append(lat)
    out = []
    for i, b in enumerate(buckets):
        b.sort()
        out.append((float(i), float(len(b)), percentile(b, 99) * 1000 if b else math.nan))
    return out
