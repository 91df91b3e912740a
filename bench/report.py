"""Printing, saving and plotting benchmark results."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        rev = ""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "revision": rev}


# Shown only when a scenario reports them: the flash sale's books, the point of that run.
_CHECK_COLUMNS = ["correct", "orders", "stock_sold"]


def table(results: list[dict[str, Any]]) -> str:
    cols = ["scenario", "loadgen", "tx_per_s", "p50_ms", "p95_ms", "p99_ms", "errors",
            "redis_calls_per_tx", "redis_commands_per_tx", "redis_usec_per_tx",
            "redis_cpu_us_per_tx", "redis_forks", "coordinator_cpu_us_per_tx",
            "loadgen_cpu_share", "loop_lag_ms_max", "ceiling_ratio"]
    cols += [c for c in _CHECK_COLUMNS if any(c in r for r in results)]
    rows = [[_fmt(r.get(c)) for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def save_json(path: Path, results: list[dict[str, Any]], options: dict[str, Any]) -> None:
    # File options are saved by name only: a report should not carry this machine's paths.
    options = {k: (v.name if isinstance(v, Path) else v) for k, v in options.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "options": options, "runs": results},
                               indent=2, default=str))


def plot(path: Path, result: dict[str, Any]) -> bool:
    """Throughput, p99 latency (the Python load generator measures it per second, wrk
    does not) and the coordinator's longest event-loop stall per second, with the spans
    when Redis rewrote its AOF shaded; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = result.get("timeline") or []
    if not points:
        return False
    seconds = [p[0] for p in points]
    fig, (top, bottom, lag) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    top.plot(seconds, [p[1] for p in points], color="tab:blue")
    top.set_ylabel("completed per second")
    top.set_title(f"{result['scenario']}: {result.get('tx_per_s', 0):,.0f}/s median run")
    top.grid(alpha=0.3)
    bottom.plot(seconds, [p[2] for p in points], color="tab:red")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.grid(alpha=0.3)
    lag.plot(seconds, [p[3] if len(p) > 3 else math.nan for p in points], color="tab:green")
    lag.set_ylabel("longest loop stall (ms)")
    lag.set_xlabel("second of the measured window")
    lag.grid(alpha=0.3)
    # When Redis rewrote its AOF (a fork, then a child writing the dataset on another
    # core): the usual reason for a dip in throughput and a rise in p99.
    for i, (begin, end) in enumerate(result.get("redis_rewrite_spans") or []):
        for ax in (top, bottom, lag):
            ax.axvspan(begin, end, color="tab:orange", alpha=0.15,
                       label="Redis rewriting its AOF" if ax is top and i == 0 else None)
    if result.get("redis_rewrite_spans"):
        top.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
