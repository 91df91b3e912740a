"""`serve --workers N`: the children never outlive their supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support import ROOT, free_port


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.update(int(c) for c in (task / "children").read_text().split())
    return out


def alive(pid: int) -> bool:
    """Running (a zombie left for a non-reaping init counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_exit_when_the_parent_is_killed(redis_url: str, prefix: str) -> None:
    port = free_port()
    env = dict(os.environ, COORDINATOR_REDIS_KEY_PREFIX=prefix)
    log = Path(f"/tmp/coordinator-workers-{uuid.uuid4().hex[:8]}.log")
    with log.open("wb") as out:
        parent = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--workers", "2", "--port",
             str(port), "--grpc-port", str(free_port()), "--redis-url", redis_url,
             "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    children: set[int] = set()
    try:
        assert wait(lambda: len(children_of(parent.pid)) == 2 and answers(port), 20), (
            log.read_text())
        children = children_of(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        # The port closes and both children are gone within a few seconds.
        assert wait(lambda: not answers(port), 5), "the children still serve the port"
        assert wait(lambda: not any(alive(c) for c in children), 5), (
            f"children {children} outlived the parent:\n{log.read_text()}")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for child in children:
            if alive(child):
                os.kill(child, signal.SIGKILL)
        log.unlink(missing_ok=True)


CHILD = """
import signal, sys, time
from pathlib import Path
import coordinator.lifeline as lifeline
lifeline._set_parent_death_signal = lambda: False  # as where prctl is unavailable
# A stop that hangs: SIGTERM is noted and then ignored.
signal.signal(signal.SIGTERM, lambda *_: Path(sys.argv[1]).write_text("term"))
lifeline.follow_parent(0.0)
Path(sys.argv[1] + ".ready").write_text("")
time.sleep(60)
"""

PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, _COORDINATOR_SUPERVISOR_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_watchdog_signals_and_then_ends_a_hung_child(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(mark)], cwd=ROOT, stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert wait(lambda: Path(str(mark) + ".ready").exists(), 10)
        parent.kill()
        parent.wait(5)
        # Without the kernel's help the watchdog sends SIGTERM itself...
        assert wait(mark.exists, 3), "no SIGTERM from the watchdog"
        # ...and ends the process when the stop hangs past the grace period (0 + 5 s).
        assert wait(lambda: not alive(child), 8), "the hung child was not ended"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
