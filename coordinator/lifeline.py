"""Child processes that must not outlive their parent, however it dies.

A `serve --workers` child left behind by a parent killed with SIGKILL would go on serving
the port that an operator believes closed. On Linux the kernel sends the child SIGTERM
when its parent dies (PR_SET_PDEATHSIG, set between fork and exec by `die_with_parent`
as a `preexec_fn`; it survives the exec). `follow_parent`, run in the child, arms it
again, notices a parent that died before that, and starts a watchdog thread that checks
the parent pid: it sends the SIGTERM itself where prctl is unavailable, and ends the
process outright if the graceful stop hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("coordinator.lifeline")

# Tells a child which process is its supervisor (not a setting: set by the parent only).
PARENT_PID_ENV = "_COORDINATOR_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL = 0.5


def _set_parent_death_signal() -> bool:
    """Ask the kernel for SIGTERM when the parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
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
