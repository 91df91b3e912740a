"""One redis-server on a loopback port, for runs that stop, kill and restart it.

Shared by the chaos tool and the Redis-restart test: its data directory outlives the
process, so a restart finds the AOF of the one before (as a real restart would).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis


class RedisServer:
    def __init__(self, port: int, data_dir: Path, *, fsync_always: bool = False) -> None:
        self.port = port
        self.data_dir = data_dir
        # appendfsync always: nothing acknowledged is lost even to a SIGKILL.
        self.fsync_always = fsync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        """Start it and return once it answers PING."""
        fsync = ["--appendfsync", "always"] if self.fsync_always else []
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", *fsync, "--save", "",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGTERM: the AOF is complete, as after a clean restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: what a crash leaves."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
