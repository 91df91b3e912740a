"""What a request may leave behind in a coordinator's memory: nothing that grows with
the size of its fields (caches are bounded by bytes, or absent)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from tests.support import CoordinatorProcess

REQUESTS = 1000
FIELD = 900 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def bodies(i: int) -> bytes:
    """Large fields a cache might keep: a saga ordering (custom_data) and a branch URL.
    Each body is refused (no steps; a URL too long), so Redis keeps nothing either."""
    pad = f"{i:08d}" + "x" * FIELD
    if i % 2:
        body = {"gid": f"mem-{i}", "trans_type": "saga", "steps": [],
                "custom_data": orjson.dumps({"concurrent": True, "pad": pad}).decode()}
    else:
        body = {"gid": f"mem-{i}", "trans_type": "saga",
                "steps": [{"action": f"http://127.0.0.1:1/{pad}", "compensate": ""}]}
    return orjson.dumps(body)


async def _send(session: aiohttp.ClientSession, api: str, first: int, count: int) -> None:
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with gate, session.post(
            f"{api}/submit", data=bodies(i), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400, await r.text()

    await asyncio.gather(*(one(i) for i in range(first, first + count)))


async def test_rss_stays_flat_under_large_fields(
    coordinator: CoordinatorProcess, session: aiohttp.ClientSession
) -> None:
    assert coordinator.proc is not None
    pid = coordinator.proc.pid
    # Warm up first: buffers and allocator arenas reach their working size.
    await _send(session, coordinator.api, 0, 60)
    before = rss_mb(pid)
    await _send(session, coordinator.api, 60, REQUESTS)
    after = rss_mb(pid)
    print(f"\nRSS of the coordinator: {before:.1f} MB before, {after:.1f} MB after "
          f"{REQUESTS} requests with {FIELD // 1024} KB fields")
    # 1,000 fields of 900 KB are 880 MB: a cache keeping even 5 % of them fails this.
    assert after - before < 40, (before, after)
