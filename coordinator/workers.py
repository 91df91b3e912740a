"""`coordinator serve --workers N`: N processes on one port, one Redis.

Each child is a complete coordinator (HTTP front and engine) bound with SO_REUSEPORT,
so the kernel spreads connections over them; they share work through Redis leases like
separate machines would. Without a configured Redis the parent starts the private
redis-server once and hands its URL to every child.

Children must not outlive the parent, however it dies (kill -9 included): orphans would
go on serving the port that an operator believes closed. On Linux the kernel sends each
child SIGTERM when the parent dies (PR_SET_PDEATHSIG, set between fork and exec); a
watchdog thread in the child checks the parent pid as well, sends the SIGTERM itself
where prctl is unavailable, and ends the process outright if the graceful stop hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from coordinator.embedded_redis import EmbeddedRedis
from coordinator.settings import Settings

log = logging.getLogger("coordinator.workers")

# Tells a child which process is its supervisor (not a setting: set by the parent only).
PARENT_PID_ENV = "_COORDINATOR_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL = 0.5


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
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator", "serve", *_passthrough_args(), env=env,
            preexec_fn=_die_with_parent,
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
    return max((abs(c.returncode or 0) for c in children), default=0)


def _set_parent_death_signal() -> bool:
    """Ask the kernel for SIGTERM when the parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; the setting survives the exec.
    _set_parent_death_signal()


def follow_parent(grace: float) -> None:
    """In a child of `serve --workers`: stop when the supervisor is gone.

    Does nothing in a process that was not started by the supervisor.
    """
    raw = os.environ.get(PARENT_PID_ENV)
    if not raw or not raw.isdigit():
        return
    parent = int(raw)
    by_kernel = _set_parent_death_signal()
    if os.getppid() != parent:  # died before the death signal was armed
        log.warning("the supervisor (pid %d) is gone; exiting", parent)
        sys.exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent, by_kernel, grace),
        name="coordinator-parent-watch", daemon=True,
    ).start()


def _watch_parent(parent: int, by_kernel: bool, grace: float) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    log.warning("the supervisor (pid %d) died; stopping this worker", parent)
    if not by_kernel:  # the kernel has sent SIGTERM already otherwise: only once
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), signal.SIGTERM)
    # The graceful stop keeps to the grace period; if it hangs, end the process anyway.
    time.sleep(grace + 5)
    os._exit(1)


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
