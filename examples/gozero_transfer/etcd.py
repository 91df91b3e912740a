"""The etcd the example uses: ``EXAMPLES_ETCD`` (``host:port``), or a private one.

A private etcd runs from the ``etcd`` binary on PATH (Debian: etcd-server) on free
loopback ports with its data in a temporary directory, and is stopped at the end.
Without either the example cannot run (exit code 2, with this hint).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator

from coordinator.client import resolve_target
from examples.common import ServiceUnavailable

HINT = ("needs etcd: put the etcd binary on PATH (Debian/Ubuntu: apt-get install "
        "etcd-server) or set EXAMPLES_ETCD=host:port")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def answers(endpoint: str, timeout: float) -> bool:
    """Whether etcd at ``endpoint`` answers a range read within ``timeout`` seconds."""
    host, _, port = endpoint.rpartition(":")
    try:
        # A closed port first, without the registry client's warnings about it.
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        writer.close()
        await resolve_target(f"etcd://{endpoint}/ping", timeout=timeout)
    except (OSError, TimeoutError, ValueError):
        return False
    return True


@contextlib.asynccontextmanager
async def etcd_endpoint() -> AsyncIterator[str]:
    """``host:port`` of an etcd that answers."""
    given = os.environ.get("EXAMPLES_ETCD")
    if given:
        if not await answers(given, 5):
            raise ServiceUnavailable(f"etcd at EXAMPLES_ETCD={given} does not answer")
        yield given
        return
    binary = shutil.which("etcd")
    if binary is None:
        raise ServiceUnavailable(HINT)
    client, peer = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="example-etcd-") as data:
        proc = await asyncio.create_subprocess_exec(
            binary, "--name", "example", "--data-dir", data,
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"example=http://127.0.0.1:{peer}",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            endpoint = f"127.0.0.1:{client}"
            deadline = time.monotonic() + 15
            while not await answers(endpoint, 1):
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise ServiceUnavailable(f"the private etcd on {endpoint} did not start")
                await asyncio.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
