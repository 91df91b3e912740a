"""`coordinator bench SCENARIO`: run a scenario N times, print a table, save JSON and a plot."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report
from bench.env import Checkout
from bench.scenarios import (
    RunOptions,
    loadgen_ceiling,
    redis_ceiling,
    resolve_loadgen,
    saga_empty,
    saga_http,
)
from bench.wrk import wrk_path

Scenario = Callable[[RunOptions], Coroutine[Any, Any, dict[str, Any]]]


def _scenarios() -> dict[str, Scenario]:
    from bench.flash_sale import flash_sale

    return {
        "saga-empty": saga_empty,
        "saga": saga_http,
        "flash-sale": flash_sale,
        "redis-ceiling": redis_ceiling,
        "loadgen-ceiling": loadgen_ceiling,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", choices=["saga-empty", "saga", "flash-sale", "redis-ceiling",
                                        "loadgen-ceiling"])
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent client connections")
    p.add_argument("--workers", type=int, default=2, help="coordinator processes")
    p.add_argument("--runs", type=int, default=1, help="repeat and report the median")
    p.add_argument("--redis-url", help="use this Redis (default: a private redis-server)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="PNG of throughput and p99 over time")
    p.add_argument("--compare", metavar="REV",
                   help="also run the coordinator of git revision REV, alternating runs")
    p.add_argument("--protocol", choices=["http", "grpc", "both"], default="http",
                   help="saga-empty/saga: submit over dtm's HTTP or gRPC API; both: "
                   "alternate the two in one run, side by side")
    p.add_argument("--stock", type=int, default=0,
                   help="flash-sale: units in stock (default: about 5 s of selling)")
    p.add_argument("--cluster", type=int, default=0, metavar="N",
                   help="saga-empty: also run on a private Redis Cluster of N primaries "
                   "(one replica each), without and with redis.wait_replicas = 1, next to "
                   "one private Redis")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                   help="who drives saga-empty and saga over HTTP, and the flash sale's "
                   "buyers: wrk (a C load generator, the default when installed) or the "
                   "Python one")
    p.add_argument("--wait-replicas", type=int, default=0,
                   help="redis.wait_replicas for the coordinator (a cluster or replicas)")


def run(args: argparse.Namespace) -> int:
    opts = RunOptions(duration=args.duration, warmup=args.warmup,
                      concurrency=args.concurrency, workers=args.workers,
                      redis_url=args.redis_url, stock=args.stock,
                      protocol="http" if args.protocol == "both" else args.protocol,
                      wait_replicas=args.wait_replicas,
                      loadgen=resolve_loadgen(args.loadgen))
    if opts.loadgen == "wrk" and not wrk_path():
        print("--loadgen wrk: wrk is not installed (Debian: apt-get install wrk)",
              file=sys.stderr)
        return 2
    if args.cluster:
        if args.scenario != "saga-empty" or args.compare or args.protocol != "http":
            print("--cluster goes with saga-empty only, over HTTP, without --compare",
                  file=sys.stderr)
            return 2
        return _run_cluster(args, opts)
    if args.protocol == "both":
        if args.compare or args.scenario not in ("saga-empty", "saga"):
            sys.exit("--protocol both: saga-empty or saga only, and not with --compare")
        args.compare = "grpc"
        return _run(args, opts, replace(opts, protocol="grpc"))
    if args.compare:
        with Checkout(args.compare) as tree:
            return _run(args, opts, replace(opts, root=tree))
    return _run(args, opts, None)


def _run(args: argparse.Namespace, opts: RunOptions, other: RunOptions | None) -> int:
    """Run the scenario `runs` times; with `other`, alternate with the other version so
    that both see the same machine conditions."""
    scenario = _scenarios()[args.scenario]
    results: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for i in range(args.runs):
        for label, o, bucket in (("current", opts, results), (args.compare, other, others)):
            if o is None:
                continue
            print(f"run {i + 1}/{args.runs}: {args.scenario} ({label})", file=sys.stderr)
            result = asyncio.run(scenario(o))
            ceiling = result.get("ceiling") or {}
            if ceiling.get("tx_per_s"):
                result["ceiling_tx_per_s"] = ceiling["tx_per_s"]
                result["ceiling_ratio"] = round(result["tx_per_s"] / ceiling["tx_per_s"], 3)
            if o is other and o.protocol == opts.protocol:
                result["scenario"] = f"{result['scenario']}@{args.compare}"
            bucket.append(result)
            print(report.table([result]), file=sys.stderr)
    summary = median_of(results)
    summaries = [summary] + ([median_of(others)] if others else [])
    print(report.table(summaries))
    if args.json:
        report.save_json(args.json, [*summaries, *results, *others], vars(args))
        print(f"report written to {args.json}")
    if args.plot:
        median_run = min(results, key=lambda r: abs(r["tx_per_s"] - summary["tx_per_s"]))
        if report.plot(args.plot, median_run):
            print(f"plot written to {args.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    correct = all(r.get("correct", True) for r in results + others)
    return 0 if correct else 1


def _run_cluster(args: argparse.Namespace, opts: RunOptions) -> int:
    """One Redis, the cluster, the cluster with wait_replicas = 1: one table, same run."""
    variants = [replace(opts, redis_url=None, wait_replicas=0),
                replace(opts, redis_url=None, cluster=args.cluster, wait_replicas=0),
                replace(opts, redis_url=None, cluster=args.cluster, wait_replicas=1)]
    rows: list[list[dict[str, Any]]] = [[] for _ in variants]
    for i in range(args.runs):
        for bucket, variant in zip(rows, variants, strict=True):
            print(f"run {i + 1}/{args.runs}: saga-empty{variant.label}", file=sys.stderr)
            bucket.append(asyncio.run(saga_empty(variant)))
    summaries = [median_of(bucket) for bucket in rows]
    print(report.table(summaries))
    for bucket in rows:
        by_node = bucket[-1].get("redis_usec_per_tx_by_node")
        if by_node:
            print(f"{bucket[-1]['scenario']}: Redis µs per transaction by primary: "
                  + ", ".join(f"{n} {v}" for n, v in sorted(by_node.items())))
    if args.json:
        report.save_json(args.json, [*summaries, *(r for b in rows for r in b)], vars(args))
        print(f"report written to {args.json}")
    return 0 if all(r.get("correct", True) for b in rows for r in b) else 1


def median_of(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over the runs, plus min and max of throughput."""
    out: dict[str, Any] = {"scenario": results[0]["scenario"] + " (median)",
                           "runs": len(results)}
    if "loadgen" in results[0]:
        out["loadgen"] = results[0]["loadgen"]
    # Over the runs that have the figure: a rate can be None in one run (a phase too
    # short to measure) and a number in the next.
    for key in dict.fromkeys(k for r in results for k in r):
        if key in ("scenario", "timeline"):
            continue
        values = [r[key] for r in results
                  if isinstance(r.get(key), int | float) and not isinstance(r[key], bool)]
        if values:
            out[key] = statistics.median(values)
    out["tx_per_s_min"] = min(r["tx_per_s"] for r in results)
    out["tx_per_s_max"] = max(r["tx_per_s"] for r in results)
    if "correct" in results[0]:
        out["correct"] = all(r["correct"] for r in results)
    return out
