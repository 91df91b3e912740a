"""Every benchmark scenario, run for a couple of seconds, with its checks asserted.

Not a speed test: it keeps the benchmarks working (processes start, requests succeed,
the flash sale's books balance), so that the figures in bench/README.md stay
reproducible. Each scenario starts its own private redis-server.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from bench import report
from bench.cli import median_of
from bench.env import redis_counters
from bench.flash_sale import flash_sale
from bench.health import RedisRewrites, rewrite_figures
from bench.scenarios import RunOptions, redis_ceiling, redis_cost, saga_empty, saga_http
from bench.wrk import wrk_path
from tests.cluster_support import have_cluster_tools
from tests.conftest import private_redis_server, require_service

SHORT = RunOptions(duration=2.0, warmup=0.5, concurrency=8, workers=1)


@pytest.fixture(autouse=True)
def _redis_server_binary() -> None:
    if shutil.which("redis-server") is None:
        require_service("redis-server", "not on PATH")


def _check_common(result: dict[str, object]) -> None:
    assert result["errors"] == 0, result.get("error_samples")
    for key in ("tx_per_s", "p50_ms", "p95_ms", "p99_ms", "redis_calls_per_tx",
                "redis_bytes_per_tx"):
        assert key in result
    assert isinstance(result["tx_per_s"], float)
    assert result["tx_per_s"] > 0


def _check_two_scripts(result: dict[str, object]) -> None:
    """Two scripts per saga (create, then finish), which the batch script carries in
    fewer EVALSHA calls when sagas run concurrently, plus the poller's idle looks: 12
    commands a saga in Redis, fewer with batching, more at a low rate."""
    calls = float(result["redis_calls_per_tx"])  # type: ignore[arg-type]
    assert 0 < calls <= 2.1
    assert float(result["redis_commands_per_tx"]) < 16  # type: ignore[arg-type]


async def test_saga_empty_runs() -> None:
    result = await saga_empty(SHORT)
    _check_common(result)
    _check_two_scripts(result)
    ceiling = result["ceiling"]
    assert isinstance(ceiling, dict)
    assert ceiling["tx_per_s"] > 0


async def test_saga_empty_driven_by_wrk_reports_its_figures() -> None:
    """--loadgen wrk: unique-gid submits from wrk's Lua script, every answer counted by
    status code, wrk's CPU share and the coordinator's loop stalls in the report."""
    if wrk_path() is None:
        require_service("wrk", "not on PATH (Debian: apt-get install wrk)")
    result = await saga_empty(replace(SHORT, loadgen="wrk"))
    _check_common(result)
    assert result["loadgen"] == "wrk"
    transactions = result["transactions"]
    assert isinstance(transactions, int)
    assert transactions > 0
    # Every answer was a 200, and each was a distinct saga that Redis created and finished.
    assert result["status_codes"] == {"200": transactions}, result["status_codes"]
    _check_two_scripts(result)
    share = result["loadgen_cpu_share"]
    assert isinstance(share, float)
    assert 0 < share < 1
    lag = result["loop_lag_ms_max"]
    assert isinstance(lag, float)
    assert lag >= 0
    timeline = result["timeline"]
    assert isinstance(timeline, list)
    assert sum(point[1] for point in timeline) == transactions
    assert any(not math.isnan(point[3]) for point in timeline)


async def test_python_loadgen_reports_its_cpu_share() -> None:
    result = await saga_empty(replace(SHORT, loadgen="python", duration=1.5))
    _check_common(result)
    assert result["loadgen"] == "python"
    share = result["loadgen_cpu_share"]
    assert isinstance(share, float)
    assert 0 < share < 1


async def test_saga_with_participants_runs() -> None:
    result = await saga_http(SHORT)
    _check_common(result)
    assert set(result["branch_calls"]) == {"/TransOut", "/TransIn"}  # type: ignore[arg-type]
    # create, the first action's result (written before the second call), finish; the
    # batch script carries the scripts of concurrent sagas in fewer EVALSHA calls.
    assert 0 < float(result["redis_calls_per_tx"]) <= 3.1  # type: ignore[arg-type]
    assert float(result["redis_commands_per_tx"]) < 24  # type: ignore[arg-type]


async def test_saga_over_grpc_calls_grpc_branches() -> None:
    """--protocol grpc: submitted over dtmgimp.Dtm, both actions called over gRPC."""
    result = await saga_http(replace(SHORT, protocol="grpc"))
    _check_common(result)
    assert result["scenario"] == "saga (grpc)"
    calls = result["branch_calls"]
    assert isinstance(calls, dict)
    assert set(calls) == {"/busi.Busi/TransOut", "/busi.Busi/TransIn"}, calls
    # Every measured transaction called both (warm-up ones too, hence at least).
    assert calls["/busi.Busi/TransIn"] >= result["transactions"]  # type: ignore[operator]


async def test_saga_empty_over_grpc_runs() -> None:
    result = await saga_empty(replace(SHORT, protocol="grpc"))
    _check_common(result)
    assert result["scenario"] == "saga-empty (grpc)"
    _check_two_scripts(result)


def _check_books(result: dict[str, object], stock: int) -> None:
    assert result["errors"] == 0, result.get("error_samples")
    assert result["stock_sold"] == stock, result
    assert result["orders"] == result["stock_sold"] == result["successful_buys"]
    assert result["unfinished_transactions"] == 0
    assert result["correct"] is True
    # Sold out for most of the run: those requests still succeed as "sold out".
    assert int(result["requests"]) > stock  # type: ignore[call-overload]


async def test_flash_sale_books_balance() -> None:
    result = await flash_sale(RunOptions(duration=3.0, warmup=0.5, concurrency=16,
                                         workers=1, stock=300))
    _check_books(result, 300)
    # The table `coordinator bench flash-sale` prints (per run, and the median summary)
    # shows the books, not only the speed.
    for shown in (result, median_of([result])):
        header, row = report.table([shown]).splitlines()
        columns = dict(zip(header.split(), row.split()[-len(header.split()):], strict=True))
        assert columns["correct"] == "true"
        assert columns["orders"] == columns["stock_sold"] == "300"


async def test_redis_ceiling_runs() -> None:
    result = await redis_ceiling(RunOptions(duration=1.0, warmup=0.0))
    assert result["tx_per_s"] > 0
    assert result["scripts_per_tx"] == 2


async def test_saga_empty_on_a_private_cluster_reports_redis_time_per_primary() -> None:
    if not have_cluster_tools():
        require_service("Redis Cluster", "redis-server and redis-cli must be on PATH")
    result = await saga_empty(replace(SHORT, cluster=3, wait_replicas=1))
    _check_common(result)
    assert result["scenario"] == "saga-empty cluster3 wait1"
    by_node = result["redis_usec_per_tx_by_node"]
    assert isinstance(by_node, dict)
    # gids spread over the partitions, partitions over the primaries: each does its share.
    assert len(by_node) == 3
    assert all(v > 0 for v in by_node.values()), by_node
    assert "ceiling" not in result  # a one-node figure


async def test_flash_sale_driven_by_wrk_keeps_exact_books() -> None:
    """--loadgen wrk: unique buyers from wrk's script, 200s counted exactly as successes
    and 409 "sold out" apart, the books as exact as with the Python buyers."""
    if wrk_path() is None:
        require_service("wrk", "not on PATH (Debian: apt-get install wrk)")
    result = await flash_sale(RunOptions(duration=3.0, warmup=1.0, concurrency=16,
                                         workers=1, stock=300, loadgen="wrk"))
    assert result["loadgen"] == "wrk"
    _check_books(result, 300)
    for rate in ("buys_per_s", "sold_out_per_s", "orders_per_s"):
        assert result[rate], rate
    assert 0 < float(result["loadgen_cpu_share"]) < 0.5  # type: ignore[arg-type]


async def test_an_aof_rewrite_shows_as_a_fork_and_a_span() -> None:
    """An AOF rewrite in the window shows as a fork, its child's CPU is counted once the
    child has ended, and the watcher reports when it ran: the figures that tell a run
    measured during a rewrite."""
    with private_redis_server() as server:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            for i in range(200):
                await client.hset(f"h{i}", mapping={"a": "x" * 100, "b": i})
            # 2 ms a key: the child works for about 0.4 s, longer than a look's interval.
            await client.config_set("rdb-key-save-delay", 2000)
            before = await redis_counters(client)
            watch = RedisRewrites(client)
            start = time.perf_counter()
            await client.bgrewriteaof()
            deadline = asyncio.get_running_loop().time() + 10
            while (await client.info("persistence"))["aof_rewrite_in_progress"]:
                assert asyncio.get_running_loop().time() < deadline, "rewrite did not end"
                await asyncio.sleep(0.05)
            await asyncio.sleep(2 * RedisRewrites.INTERVAL)
            samples = await watch.stop()
            after = await redis_counters(client)
        finally:
            await client.aclose()
    cost = redis_cost(before, after, 1)
    assert cost["redis_forks"] == 1
    assert cost["redis_child_cpu_us_per_tx"] >= 0
    assert after["child_cpu_usec"] >= before["child_cpu_usec"]
    figures = rewrite_figures(samples, start, 60.0)
    spans = figures["redis_rewrite_spans"]
    assert len(spans) == 1, samples
    assert 0.2 <= figures["redis_rewrite_s"] < 5, spans
    assert spans[0][0] < 1.0


def test_rewrite_spans_are_clipped_to_the_window() -> None:
    looks = [(9.0, True), (10.5, True), (11.0, False), (12.0, True), (13.0, False),
             (14.0, True), (31.0, True)]
    figures = rewrite_figures(looks, 10.0, 20.0)
    # Begun before the window, ended in it; one inside; one still running at its end.
    assert figures["redis_rewrite_spans"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 20.0]]
    assert figures["redis_rewrite_s"] == 18.0
    assert rewrite_figures([], 0.0, 20.0) == {"redis_rewrite_spans": [],
                                               "redis_rewrite_s": 0}


def test_store_cost_reports_both_phases_and_sweeps_every_entry() -> None:
    """bench/README.md's store figures come from this tool: it must run, and its sweep
    must drop the entry of every saga it finished."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.store_cost", "--transactions", "320", "--at-once", "16"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.splitlines()[-1]
    assert line.startswith("320 sagas, 16 at once: create + finish "), line
    assert "the commands inside: hset" in line or ", hset" in line, line
    assert "(320 entries dropped)" in line, line


def test_store_cost_counts_redis_instructions_under_callgrind() -> None:
    """The instruction counts in bench/README.md come from this mode."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.store_cost", "--callgrind", "--transactions", "160"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.splitlines()[-1]
    found = re.fullmatch(r"160 sagas, 16 at once: create \+ finish ([\d,]+) instructions "
                         r"per saga in redis-server \(0\.\d+ script calls per saga\)", line)
    assert found, line
    # Tens of thousands of instructions per saga at least: the count is of real work.
    assert 50_000 < int(found[1].replace(",", "")) < 5_000_000, line
