"""A one-line progress bar on stderr, updated once a second while a load runs."""

from __future__ import annotations

import asyncio
import sys
import time

from bench.stats import Recorder


async def show_progress(
    label: str, recorder: Recorder, warmup: float, duration: float, width: int = 30
) -> None:
    start = time.perf_counter()
    total = warmup + duration
    last_count, last_time = 0, start
    try:
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            elapsed = min(now - start, total)
            count = len(recorder)
            rate = (count - last_count) / (now - last_time)
            last_count, last_time = count, now
            filled = int(width * elapsed / total)
            phase = "warm-up" if elapsed < warmup else "measuring"
            sys.stderr.write(
                f"\r{label:12} [{'#' * filled}{'.' * (width - filled)}] "
                f"{elapsed:5.1f}/{total:.0f}s {phase:9} {rate:9,.0f}/s  errors {recorder.failed}"
            )
            sys.stderr.flush()
    except asyncio.CancelledError:
        sys.stderr.write("\n")
        sys.stderr.flush()
        raise
