"""A closed-loop HTTP/1.1 load generator on raw asyncio streams.

aiohttp's client costs several times more CPU per request than the server under test
spends, and on a 2-core machine the generator shares the cores with everything else.
So each connection writes pre-rendered request bytes and parses only the status line
and Content-Length of the answer. `coordinator bench loadgen-ceiling` measures what it
can drive against a trivial endpoint, to show it is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.stats import Recorder

# A request factory returns (method, path, body) for the n-th request of a connection.
RequestFactory = Callable[[int], tuple[str, str, bytes]]
# A checker decides from (status, body) whether the request did what it should.
Checker = Callable[[int, bytes], bool]


def render(host: str, port: int, method: str, path: str, body: bytes) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at)
        length = int(lower[at + 15 : end])
    body = await reader.readexactly(length) if length else b""
    return status, body


@dataclass
class LoadResult:
    recorder: Recorder
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


async def run_load(
    host: str,
    port: int,
    factory: RequestFactory,
    check: Checker,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    recorder: Recorder,
    max_requests: int = 50_000_000,
) -> LoadResult:
    """Run `concurrency` connections until `warmup + duration` seconds have passed.

    Only requests that start after the warm-up are recorded. Bounded in time and count.
    """
    result = LoadResult(recorder)
    start = time.perf_counter()
    record_from = start + warmup
    deadline = record_from + duration
    budget = [max_requests]

    async def connection(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        n = 0
        try:
            while budget[0] > 0:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    break
                budget[0] -= 1
                method, path, body = factory(index * 1_000_000_000 + n)
                n += 1
                writer.write(render(host, port, method, path, body))
                status, reply = await read_response(reader)
                t1 = time.perf_counter()
                ok = check(status, reply)
                if t0 >= record_from:
                    recorder.add(t1, t1 - t0, ok)
                if not ok:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"{status} {reply[:200]!r}")
        except (OSError, asyncio.IncompleteReadError) as exc:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"connection {index}: {exc!r}")
        finally:
            writer.close()

    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    return result
