"""`coordinator serve --workers N`: N processes on one port, one Redis.

Each child is a complete coordinator (HTTP front and engine) bound with SO_REUSEPORT,
so the kernel spreads connections over them; they share work through Redis leases like
separate machines would. Without a configured Redis the parent starts the private
redis-server once and hands its URL to every child.

Children must not outlive the parent, however it dies (kill -9 included): orphans would
go on serving the port that an operator believes closed (see lifeline.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from coordinator.embedded_redis import EmbeddedRedis
from coordinator.lifeline import PARENT_PID_ENV, die_with_parent
from coordinator.settings import Settings


def serve_workers(settings: Settings) -> int:
    return asyncio.run(_supervise(settings))


async def _supervise(settings: Settings) -> int:
    embedded: EmbeddedRedis | None = None
    url = settings.redis.url
    if not url:
        embedded = EmbeddedRedis(Path(settings.redis.data_dir))
        url = await embedded.start()
    env = dict(os.environ)
    env.update(
        COORDINATOR_REDIS_URL=url,
        COORDINATOR_HOST=settings.server.host,
        COORDINATOR_PORT=str(settings.server.port),
        COORDINATOR_SERVER_WORKERS="1",
        COORDINATOR_SERVER_REUSE_PORT="true",
    )
    env[PARENT_PID_ENV] = str(os.getpid())
    # Metrics of all children in one scrape: prometheus-client's multiprocess mode keeps
    # each child's values in files of this run's own directory, removed at the end.
    metrics_dir = tempfile.mkdtemp(prefix="coordinator-metrics-")
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator", "serve", *_passthrough_args(), env=env,
            preexec_fn=die_with_parent,
        )
        for _ in range(settings.server.workers)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Run until asked to stop or until any child dies: a half-dead pool would serve
        # some connections and refuse others.
        waits = [asyncio.create_task(c.wait()) for c in children]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        for child in children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        grace = settings.engine.shutdown_grace + 5
        for child in children:
            try:
                await asyncio.wait_for(child.wait(), grace)
            except TimeoutError:
                child.kill()
                await child.wait()
        if embedded is not None:
            await embedded.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((abs(c.returncode or 0) for c in children), default=0)


def _passthrough_args() -> list[str]:
    """The parent's own flags minus those the environment now carries."""
    out: list[str] = []
    args = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "serve" else []
    skip = {"--workers", "--redis-url", "--host", "--port"}
    i = 0
    while i < len(args):
        if args[i] in skip:
            i += 2
            continue
        if args[i].split("=", 1)[0] in skip:
            i += 1
            continue
        out.append(args[i])
        i += 1
    return out
