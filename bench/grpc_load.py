"""Closed-loop load over dtm's gRPC API: `concurrency` callers submitting sagas with
wait_result, spread over a few channels (each channel is one HTTP/2 connection).

grpc's Python client costs more CPU per call than the raw-socket HTTP generator, so on a
small machine it limits sooner: compare protocols at equal concurrency and look at the
latency as well as the rate.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import orjson

from bench.loadgen import LoadResult
from bench.stats import Recorder
from coordinator.dtmgpb import dtmgimp_pb2 as pb
from coordinator.dtmgpb import dtmgimp_pb2_grpc as pb_grpc

CHANNELS = 4


async def run_grpc_saga_load(
    port: int, run: str, steps: list[dict[str, str]], *, concurrency: int, duration: float,
    warmup: float, recorder: Recorder, max_requests: int = 50_000_000,
) -> LoadResult:
    """Submit two-step sagas until `warmup + duration` seconds have passed; bounded in
    time and count. Only calls that start after the warm-up are recorded."""
    result = LoadResult(recorder)
    start = time.perf_counter()
    record_from = start + warmup
    deadline = record_from + duration
    budget = [max_requests]
    steps_json = orjson.dumps(steps).decode()
    options = pb.DtmTransOptions(WaitResult=True)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(CHANNELS, concurrency))]
    stubs = [pb_grpc.DtmStub(ch) for ch in channels]

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        n = 0
        while budget[0] > 0:
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            budget[0] -= 1
            request = pb.DtmRequest(Gid=f"{run}-{index}-{n}", TransType="saga",
                                    Steps=steps_json, BinPayloads=[b"{}"] * len(steps),
                                    TransOptions=options)
            n += 1
            try:
                await stub.Submit(request, timeout=60)
                ok, sample = True, ""
            except grpc.aio.AioRpcError as exc:
                ok, sample = False, f"{exc.code().name} {exc.details()}"
            t1 = time.perf_counter()
            if t0 >= record_from:
                recorder.add(t1, t1 - t0, ok)
            if not ok:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(sample[:200])

    try:
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    finally:
        for ch in channels:
            await ch.close(None)
    return result
