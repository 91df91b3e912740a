"""A bounded chaos run: sagas under load while coordinators and Redis are killed.

Starts a private `redis-server` (AOF, fsync on every write) on a free loopback port, two
`coordinator serve` processes on it, and a participant (an aiohttp app on loopback whose
actions answer SUCCESS, FAILURE for a fixed share of gids, and sometimes HTTP 500). A load
loop submits two-step sagas with `wait_result` at about `--rate` per second to the two
coordinators in turn, while a coordinator is SIGKILLed every few seconds and restarted,
and Redis is SIGKILLed and restarted once half-way.

Afterwards it waits up to `--settle` seconds for every accepted saga to finish and counts:
acknowledged (200/409 answers), lost (acknowledged gid absent afterwards), stuck (not
final after the settle time), compensations run for a saga that answered 200, wrong
outcomes (200 but failed, 409 but succeeded), and any 5xx other than 503. Exit status 1 when
any of those defect counts is non-zero.

Run: python -m bench.chaos --duration 60

Traffic goes to 127.0.0.1 only; the run is bounded by `--duration` and by
`--rate * --duration` submits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.env import ROOT, free_port
from bench.redis_server import RedisServer

FINAL = {"succeed", "failed"}


def fails(gid: str) -> bool:
    """The business answer is fixed per gid (as a real one would be on a re-call)."""
    return gid.endswith(("0", "5"))


class Participant:
    """Actions: FAILURE for gids `fails` picks, else SUCCESS; any call may answer 500."""

    def __init__(self, error_rate: float) -> None:
        self.error_rate = error_rate
        self.compensations: collections.Counter[str] = collections.Counter()
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.read()
        gid = request.query.get("gid", "")
        if random.random() < self.error_rate:
            return web.Response(status=500, text="chaos")
        if request.match_info["op"] == "compensate":
            self.compensations[gid] += 1
            return web.json_response({"dtm_result": "SUCCESS"})
        if fails(gid) and request.query.get("branch_id") == "02":
            return web.json_response({"dtm_result": "FAILURE"}, status=409)
        return web.json_response({"dtm_result": "SUCCESS"})

    async def start(self, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{op}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Coordinator:
    def __init__(self, redis_url: str, participant: int, log: Path, prefix: str) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.log = log
        self.env = dict(os.environ)
        self.env.update({
            "COORDINATOR_REDIS_KEY_PREFIX": prefix,
            "COORDINATOR_ENGINE_ALLOWED_BRANCH_HOSTS": f"127.0.0.1:{participant}",
            "COORDINATOR_ENGINE_RETRY_INTERVAL": "1",
            "COORDINATOR_ENGINE_MAX_RETRY_INTERVAL": "2",
            "COORDINATOR_ENGINE_LEASE_SECONDS": "5",
            "COORDINATOR_ENGINE_REQUEST_TIMEOUT": "2",
            "COORDINATOR_SERVER_WAIT_RESULT_TIMEOUT": "5",
            "PYTHONPATH": str(ROOT),
        })
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/dtmsvr"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--grpc-port", "0", "--redis-url", self.redis_url,
                 "--log-level", "WARNING"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Tally:
    def __init__(self) -> None:
        self.status: collections.Counter[str] = collections.Counter()
        self.answer: dict[str, int] = {}  # gid -> 200/409/425 answered
        self.server_errors: list[tuple[str, int, str]] = []

    def record(self, gid: str, status: int, text: str) -> None:
        self.status[str(status)] += 1
        if status in (200, 409, 425):
            self.answer[gid] = status
        if status >= 500 and status != 503:
            self.server_errors.append((gid, status, text[:200]))


async def submit(http: aiohttp.ClientSession, base: str, participant: str, tally: Tally) -> None:
    gid = uuid.uuid4().hex
    body = {
        "gid": gid, "trans_type": "saga", "wait_result": True,
        "steps": [{"action": f"{participant}/action", "compensate": f"{participant}/compensate"}
                  for _ in range(2)],
        "payloads": ['{"amount":1}', '{"amount":1}'],
    }
    try:
        async with http.post(f"{base}/submit", json=body,
                             timeout=aiohttp.ClientTimeout(total=15)) as r:
            tally.record(gid, r.status, await r.text())
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.status[f"error {type(exc).__name__}"] += 1


async def load(coords: list[Coordinator], participant: str, rate: float, duration: float,
               tally: Tally) -> None:
    limit = int(rate * duration)
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.monotonic()
        for n in range(limit):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - start > duration:
                break
            task = asyncio.create_task(submit(http, coords[n % len(coords)].base,
                                              participant, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30)


async def chaos(coords: list[Coordinator], redis: RedisServer, duration: float, every: float,
                redis_down: float, events: list[str]) -> None:
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    redis_done = False
    n = 0
    while time.monotonic() - start + every < duration:
        await asyncio.sleep(every)
        victim = coords[n % len(coords)]
        n += 1
        await loop.run_in_executor(None, victim.kill)
        events.append(f"{time.monotonic() - start:5.1f}s kill coordinator :{victim.port}")
        if not redis_done and time.monotonic() - start > duration / 2:
            redis_done = True
            await loop.run_in_executor(None, redis.kill)
            events.append(f"{time.monotonic() - start:5.1f}s kill redis")
            await asyncio.sleep(redis_down)
            await loop.run_in_executor(None, redis.start)
            events.append(f"{time.monotonic() - start:5.1f}s redis back")
        await asyncio.sleep(0.5)
        await loop.run_in_executor(None, victim.start)
        victim.restarts += 1


async def final_states(coords: list[Coordinator], gids: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    sem = asyncio.Semaphore(64)
    async with aiohttp.ClientSession() as http:
        async def one(i: int, gid: str) -> None:
            async with sem:
                base = coords[i % len(coords)].base
                for _ in range(5):
                    try:
                        async with http.get(f"{base}/query", params={"gid": gid}) as r:
                            if r.status == 200:
                                txn = (await r.json())["transaction"]
                                out[gid] = txn["status"] if txn else None
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
                out[gid] = "?"
        await asyncio.gather(*(one(i, g) for i, g in enumerate(gids)))
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    redis = RedisServer(free_port(), work, fsync_always=True)
    redis.start()
    participant = Participant(args.error_rate)
    pport = free_port()
    runner = await participant.start(pport)
    prefix = "chaos" + uuid.uuid4().hex[:8]
    coords = [Coordinator(redis.url, pport, work / f"coordinator-{i}.log", prefix)
              for i in range(2)]
    for c in coords:
        c.start()
    tally = Tally()
    events: list[str] = []
    try:
        await asyncio.gather(
            load(coords, f"http://127.0.0.1:{pport}", args.rate, args.duration, tally),
            chaos(coords, redis, args.duration, args.kill_every, args.redis_down, events))
        for c in coords:  # every coordinator up for the settle phase
            if c.proc is None or c.proc.poll() is not None:
                c.start()
        accepted = list(tally.answer)
        deadline = time.monotonic() + args.settle
        states: dict[str, str | None] = {}
        pending = accepted
        while True:
            states.update(await final_states(coords, pending))
            pending = [g for g in pending if states[g] not in FINAL]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
    finally:
        for c in coords:
            c.stop()
        await runner.cleanup()
        redis.kill()
    acked = [g for g, s in tally.answer.items() if s in (200, 409)]
    lost = [g for g in accepted if states.get(g) is None]
    stuck = [g for g in accepted if states.get(g) not in FINAL and states.get(g) is not None]
    wrong = [g for g in acked if states.get(g) in FINAL and
             states[g] != ("succeed" if tally.answer[g] == 200 else "failed")]
    compensated_ok = [g for g, s in tally.answer.items()
                      if s == 200 and participant.compensations[g]]
    result = {
        "duration": args.duration, "submits": sum(tally.status.values()),
        "answers": dict(sorted(tally.status.items())),
        "acknowledged": len(acked), "accepted_with_425": len(accepted) - len(acked),
        "lost": len(lost), "stuck": len(stuck), "wrong_outcome": len(wrong),
        "compensated_after_200": len(compensated_ok),
        "server_errors_not_503": len(tally.server_errors),
        "coordinator_restarts": sum(c.restarts for c in coords),
        "participant_calls": participant.calls,
        "events": events,
        "samples": {"lost": lost[:5], "stuck": [(g, states.get(g)) for g in stuck[:5]],
                    "wrong": wrong[:5], "compensated_after_200": compensated_ok[:5],
                    "server_errors": tally.server_errors[:5]},
        "logs": str(work),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        result["logs"] = None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load and kills")
    p.add_argument("--rate", type=float, default=100.0, help="saga submits per second")
    p.add_argument("--kill-every", type=float, default=5.0,
                   help="seconds between coordinator kills")
    p.add_argument("--settle", type=float, default=60.0,
                   help="seconds accepted sagas get to finish after the load")
    p.add_argument("--error-rate", type=float, default=0.05,
                   help="share of participant calls answering HTTP 500")
    p.add_argument("--redis-down", type=float, default=1.0,
                   help="seconds Redis stays down after its kill")
    p.add_argument("--keep", action="store_true", help="keep the Redis data and logs")
    args = p.parse_args(argv)
    if args.duration > 600 or args.rate > 500:
        p.error("bounded: --duration at most 600, --rate at most 500")
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    bad = ("lost", "stuck", "wrong_outcome", "compensated_after_200", "server_errors_not_503")
    return 1 if any(result[k] for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
