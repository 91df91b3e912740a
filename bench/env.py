"""The processes a benchmark runs: a Redis, coordinator workers, participants."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bench.redis_cluster import RedisClusterProcess
from coordinator.embedded_redis import EmbeddedRedis
from coordinator.store.cluster import cluster_client, is_cluster, parse_seeds

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Processes:
    """Child processes started for one run; all stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self) -> None:
        self.children: list[asyncio.subprocess.Process] = []
        self.logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))

    async def spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None, root: Path = ROOT
    ) -> int:
        """Start a child in `root` (another checkout runs another version's code)."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        if root != ROOT:
            full_env["PYTHONPATH"] = str(root)
        log = (self.logs / f"{name}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=root, env=full_env, stdout=log, stderr=log
        )
        log.close()
        self.children.append(proc)
        return proc.pid

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    async def stop(self) -> None:
        for proc in self.children:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.children:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if not os.environ.get("BENCH_KEEP_LOGS"):
            shutil.rmtree(self.logs, ignore_errors=True)


class BenchEnv:
    """A Redis (private unless a URL is given), N coordinator workers on one port.

    With `cluster` > 0 the Redis is a private cluster of that many primaries, each with
    one replica; a given URL may also name a cluster (the coordinator detects it).
    """

    def __init__(
        self, redis_url: str | None, workers: int, root: Path = ROOT, *, cluster: int = 0,
        **coordinator_env: Any,
    ) -> None:
        self.root = root
        self.cluster_size = cluster
        self._cluster: RedisClusterProcess | None = None
        self.redis_url = redis_url or ""
        self.workers = workers
        self.coordinator_env = {k: str(v) for k, v in coordinator_env.items()}
        self.port = free_port()
        self.grpc_port = free_port()
        self.procs = Processes()
        self._embedded: EmbeddedRedis | None = None
        self._data_dir = Path()
        self.redis: aioredis.Redis | RedisCluster | None = None
        self.coordinator_pid = 0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/dtmsvr"

    async def start(self) -> None:
        if self.cluster_size:
            self._cluster = RedisClusterProcess(primaries=self.cluster_size)
            await asyncio.to_thread(self._cluster.start)
            self.redis_url = self._cluster.url
        if not self.redis_url:
            self._data_dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
            self._embedded = EmbeddedRedis(self._data_dir)
            self.redis_url = await self._embedded.start()
        # The gRPC port by environment, not flag: a --compare revision without gRPC
        # ignores an unknown variable but would refuse an unknown flag.
        env = {"COORDINATOR_SERVER_GRPC_PORT": str(self.grpc_port), **self.coordinator_env}
        if not self.redis_url.startswith("unix://") and await is_cluster(self.redis_url):
            # A cluster is not flushed: the run's keys get a prefix of their own.
            self.redis = cluster_client(parse_seeds(self.redis_url), self.redis_url)
            await self.redis.initialize()
            env.setdefault("COORDINATOR_REDIS_KEY_PREFIX", f"bench{os.getpid()}")
        else:
            self.redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
            await self.redis.flushdb()
        self.coordinator_pid = await self.procs.spawn(
            "coordinator", sys.executable, "-m", "coordinator", "serve",
            "--workers", str(self.workers), "--port", str(self.port),
            "--redis-url", self.redis_url, "--log-level", "WARNING", env=env, root=self.root,
        )
        await wait_http(f"http://127.0.0.1:{self.port}/api/ping")

    async def spawn_participant(self, grpc_port: int = 0) -> int:
        """The participant's HTTP port; with `grpc_port` it serves gRPC branches there."""
        port = free_port()
        ports = [str(port)] + ([str(grpc_port)] if grpc_port else [])
        await self.procs.spawn("participant", sys.executable, "-m", "bench.participant", *ports)
        await wait_http(f"http://127.0.0.1:{port}/stats")
        return port

    async def stop(self) -> None:
        await self.procs.stop()
        if self.redis is not None:
            await self.redis.aclose()
        if self._embedded is not None:
            await self._embedded.stop()
            shutil.rmtree(self._data_dir, ignore_errors=True)
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.stop)


async def redis_counters(client: aioredis.Redis | RedisCluster) -> dict[str, int]:
    """Client calls (script invocations and plain commands) and bytes moved so far.

    On a cluster: summed over the primaries, plus ``script_usec@<node>`` per primary.
    """
    if isinstance(client, RedisCluster):
        total: dict[str, int] = {}
        for node in client.get_primaries():
            stats = await client.info("stats", target_nodes=node)
            commands = await client.info("commandstats", target_nodes=node)
            cpu = await client.info("cpu", target_nodes=node)
            one = _counters(stats, commands, cpu)
            total[f"script_usec@{node.name}"] = one["script_usec"]
            for key, value in one.items():
                total[key] = total.get(key, 0) + value
        return total
    return _counters(await client.info("stats"), await client.info("commandstats"),
                     await client.info("cpu"))


def _counters(
    stats: dict[str, Any], commands: dict[str, Any], cpu: dict[str, Any]
) -> dict[str, int]:
    scripts = [v for k, v in commands.items()
               if k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro",
                        "cmdstat_eval_ro")]
    # Per command (inner commands of scripts included), to show where Redis's time goes.
    by_command = {}
    for name, v in commands.items():
        if name.startswith("cmdstat_"):
            by_command[f"calls:{name[8:]}"] = int(v.get("calls", 0))
            by_command[f"usec:{name[8:]}"] = int(v.get("usec", 0))
    return {
        **by_command,
        "script_calls": sum(int(v.get("calls", 0)) for v in scripts),
        # Microseconds Redis spent in scripts (their inner commands included): what the
        # work costs the server itself, so about 1e6 / this per tx is its ceiling on one core.
        "script_usec": sum(int(v.get("usec", 0)) for v in scripts),
        "commands": int(stats["total_commands_processed"]),
        # Redis's own CPU time (all its work, AOF included), unaffected by waiting for a
        # core as the per-script wall times are.
        "cpu_usec": int((float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])) * 1e6),
        # Forks: AOF rewrites (and RDB saves). Each stalls Redis while it forks, and the
        # child, which writes the whole dataset, competes for the cores; its CPU time is
        # counted here once the child has ended.
        "forks": int(stats.get("total_forks", 0)),
        "child_cpu_usec": int((float(cpu.get("used_cpu_sys_children", 0))
                               + float(cpu.get("used_cpu_user_children", 0))) * 1e6),
        "bytes": int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"]),
    }


class Checkout:
    """Another revision of the project in a temporary git worktree, for side-by-side runs."""

    def __init__(self, rev: str) -> None:
        self.rev = rev
        self.path = Path(tempfile.mkdtemp(prefix="bench-rev-")) / "tree"

    def __enter__(self) -> Path:
        import subprocess

        subprocess.run(["git", "worktree", "add", "--detach", str(self.path), self.rev],
                       cwd=ROOT, check=True, capture_output=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        import subprocess

        subprocess.run(["git", "worktree", "remove", "--force", str(self.path)],
                       cwd=ROOT, check=False, capture_output=True)
        shutil.rmtree(self.path.parent, ignore_errors=True)
