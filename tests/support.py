"""Test support: real participant services on loopback and coordinator processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster

from coordinator.keys import KeySpace
from coordinator.settings import RedisSettings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Call:
    path: str
    method: str
    query: dict[str, str]
    headers: dict[str, str]
    body: str
    started: float
    ended: float = 0.0
    status: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        q = self.query
        return (q.get("gid", ""), q.get("branch_id", ""), q.get("op", ""))


# A reply is (status, body) or a callable (call) -> (status, body).
Reply = tuple[int, str]
Responder = Callable[[Call], Reply]

OK: Reply = (200, '{"dtm_result":"SUCCESS"}')
FAIL: Reply = (409, '{"dtm_result":"FAILURE","message":"business refused"}')
FAIL_200: Reply = (200, '{"dtm_result":"FAILURE"}')
ONGOING: Reply = (425, '{"dtm_result":"ONGOING"}')
ERROR: Reply = (500, "internal error")


@dataclass
class Participant:
    """A programmable participant service: every path answers from a script of replies.

    `plan(path, *replies)` queues replies for a path (the last one repeats), optionally
    per gid with `plan_for(gid, path, ...)`. Every call is recorded, and overlapping
    calls of the same (gid, branch_id, op) are counted as `overlaps`.
    """

    host: str = "127.0.0.1"
    port: int = 0
    delay: float = 0.0
    calls: list[Call] = field(default_factory=list)
    overlaps: int = 0
    _plans: dict[tuple[str, str], list[Reply | Responder]] = field(default_factory=dict)
    _inflight: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    _delays: dict[tuple[str, str], float] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def plan(self, path: str, *replies: Reply | Responder) -> None:
        self._plans[("", "/" + path.lstrip("/"))] = list(replies)

    def plan_for(self, gid: str, path: str, *replies: Reply | Responder) -> None:
        self._plans[(gid, "/" + path.lstrip("/"))] = list(replies)

    def delay_for(self, gid: str, path: str, seconds: float) -> None:
        """Answer one gid's calls of a path after `seconds` (instead of `delay`)."""
        self._delays[(gid, "/" + path.lstrip("/"))] = seconds

    def calls_to(self, path: str, gid: str | None = None) -> list[Call]:
        p = "/" + path.lstrip("/")
        return [c for c in self.calls if c.path == p and (gid is None or c.query.get("gid") == gid)]

    def _next(self, call: Call) -> Reply:
        for key in ((call.query.get("gid", ""), call.path), ("", call.path)):
            queue = self._plans.get(key)
            if queue:
                item = queue.pop(0) if len(queue) > 1 else queue[0]
                return item(call) if callable(item) else item
        return OK

    async def _handle(self, request: web.Request) -> web.Response:
        call = Call(
            path=request.path,
            method=request.method,
            query=dict(request.query),
            headers=dict(request.headers),
            body=(await request.read()).decode(),
            started=time.monotonic(),
        )
        self.calls.append(call)
        self._inflight[call.key] += 1
        if self._inflight[call.key] > 1:
            self.overlaps += 1
        try:
            delay = self._delays.get((call.query.get("gid", ""), call.path), self.delay)
            if delay:
                await asyncio.sleep(delay)
            status, body = self._next(call)
            call.status = status
            return web.Response(status=status, text=body, content_type="application/json")
        finally:
            self._inflight[call.key] -= 1
            call.ended = time.monotonic()

    async def start(self) -> Participant:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


PORT_RACE_ATTEMPTS = 3


class CoordinatorProcess:
    """`coordinator serve` as a child process, on its own port and key prefix."""

    def __init__(
        self, redis_url: str, prefix: str, *, log_level: str = "WARNING", **env: Any
    ) -> None:
        self.redis_url = redis_url
        self.log_level = log_level
        self.prefix = prefix
        self.port = free_port()
        # Every test coordinator serves gRPC on a port of its own: the default 36790
        # would clash between coordinators running side by side.
        self.grpc_port = free_port()
        self.env = {k: str(v) for k, v in env.items()}
        # More flags for `coordinator serve` (a later flag wins over an earlier one).
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        logs = Path(tempfile.gettempdir())
        self.log_path = logs / f"coordinator-{prefix}-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.base}/api/dtmsvr"

    async def start(self, timeout: float = 15.0) -> CoordinatorProcess:
        # free_port() only finds a port that was free a moment ago: another test process
        # may take it before the coordinator binds it. A first start that lost that race
        # tries fresh ports; a restart keeps its ports (tests reconnect to them).
        for _ in range(PORT_RACE_ATTEMPTS if self.proc is None else 1):
            try:
                return await self._start(timeout)
            except RuntimeError as exc:
                if "Address already in use" not in str(exc):
                    raise
                last = exc
                self.port, self.grpc_port = free_port(), free_port()
        raise last

    async def _start(self, timeout: float) -> CoordinatorProcess:
        env = dict(os.environ)
        env.update(
            {
                "COORDINATOR_REDIS_KEY_PREFIX": self.prefix,
                "COORDINATOR_ENGINE_POLL_INTERVAL": "0.1",
                "COORDINATOR_ENGINE_RETRY_INTERVAL": "1",
            }
        )
        env.update(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--port", str(self.port),
             "--grpc-port", str(self.grpc_port), "--redis-url", self.redis_url,
             "--log-level", self.log_level, *self.extra_args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"coordinator exited early:\n{self.log_tail()}")
                try:
                    async with s.get(f"{self.base}/api/ping") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"coordinator did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    async def signal_and_wait(self, sig: int, timeout: float) -> int | None:
        """Send `sig` and wait for the exit without blocking the event loop (participants
        in this loop must keep answering); the exit code, or None if still running."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        proc = self.proc
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: proc.poll() is not None, timeout, 0.02, "the exit")
        return proc.poll()

    async def aclose(self, grace: float = 15.0) -> None:
        """Stop it like `stop`, but without blocking the event loop; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if await self.signal_and_wait(signal.SIGTERM, grace) is None:
            self.kill(signal.SIGKILL)


@contextlib.contextmanager
def running_coordinator(redis_url: str, **env: Any) -> Iterator[CoordinatorProcess]:
    """A coordinator on a fresh key prefix for a block (a module fixture, say); its keys
    are deleted afterwards."""
    prefix = "t" + uuid.uuid4().hex[:10]
    proc = asyncio.run(CoordinatorProcess(redis_url, prefix, **env).start())
    try:
        yield proc
    finally:
        proc.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class Api:
    """A thin client of the coordinator's HTTP API for tests."""

    def __init__(self, session: aiohttp.ClientSession, api: str, token: str = "") -> None:
        self.session = session
        self.api = api
        # The operator token, for a coordinator that has server.api_token set.
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def post(self, op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.api}/{op}", json=body, headers=self.headers) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, op: str, **params: Any) -> tuple[int, dict[str, Any]]:
        async with self.session.get(
            f"{self.api}/{op}", params=params, headers=self.headers
        ) as r:
            return r.status, await r.json(content_type=None)

    async def query(self, gid: str) -> dict[str, Any]:
        status, body = await self.get("query", gid=gid)
        assert status == 200, body
        return body

    async def status(self, gid: str) -> str:
        trans = (await self.query(gid))["transaction"]
        return trans["status"] if trans else ""

    async def wait_status(self, gid: str, *statuses: str, timeout: float = 15.0) -> str:
        seen = ""

        async def done() -> bool:
            nonlocal seen
            seen = await self.status(gid)
            return seen in statuses

        await wait_for(done, timeout, 0.05, f"{gid} to reach {statuses} (last {seen!r})")
        return seen


def saga_body(gid: str, participant: Participant, steps: int, **options: Any) -> dict[str, Any]:
    """A sequential saga whose step i (1-based) calls a<i> and compensates with c<i>."""
    return {
        "gid": gid,
        "trans_type": "saga",
        "steps": [
            {"action": participant.url(f"a{i}"), "compensate": participant.url(f"c{i}")}
            for i in range(1, steps + 1)
        ],
        "payloads": [f'{{"step":{i}}}' for i in range(1, steps + 1)],
        **options,
    }


async def submit_all(
    session: aiohttp.ClientSession, api: str, bodies: list[dict[str, Any]], parallel: int = 32
) -> None:
    """Submit every body (at most `parallel` at once); each must be accepted."""
    gate = asyncio.Semaphore(parallel)

    async def one(body: dict[str, Any]) -> None:
        async with gate, session.post(f"{api}/submit", json=body) as r:
            text = await r.text()
            assert r.status == 200, f"submit {body['gid']}: {r.status} {text}"

    await asyncio.gather(*(one(b) for b in bodies))


class StoreProbe:
    """Reads transaction hashes straight from Redis, as redis-cli would: no coordinator."""

    def __init__(
        self, redis_url: str, prefix: str, partitions: int = RedisSettings().partitions,
        *, cluster: bool = False,
    ) -> None:
        self.client: Any = (
            RedisCluster.from_url(redis_url, decode_responses=True) if cluster
            else aioredis.Redis.from_url(redis_url, decode_responses=True)
        )
        self.keys = KeySpace(prefix, partitions)

    async def fields(self, gids: list[str], *names: str) -> dict[str, list[str | None]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.hmget(self.keys.for_gid(gid).trans, list(names))
            rows = await pipe.execute()
        return dict(zip(gids, rows, strict=True))

    async def statuses(self, gids: list[str]) -> dict[str, str]:
        return {gid: row[0] or "" for gid, row in (await self.fields(gids, "status")).items()}

    async def wait_final(self, gids: list[str], timeout: float) -> dict[str, str]:
        """Wait until every transaction succeeded or failed; their final statuses."""
        last: dict[str, str] = {}

        async def done() -> bool:
            nonlocal last
            last = await self.statuses(gids)
            return all(s in ("succeed", "failed") for s in last.values())

        try:
            await wait_for(done, timeout, 0.2, "every transaction to finish")
        except AssertionError:
            open_ = [g for g, s in last.items() if s not in ("succeed", "failed")]
            detail = await self.fields(
                open_[:5], "status", "owner", "lease_until", "next_cron_time", "update_time"
            )
            raise AssertionError(
                f"{len(open_)} of {len(gids)} unfinished after {timeout}s "
                f"(status, owner, lease_until, next_cron_time, update_time): {detail}"
            ) from None
        return last

    async def close(self) -> None:
        await self.client.aclose()


def calls_by_gid(participant: Participant, gids: list[str]) -> dict[str, list[Call]]:
    out: dict[str, list[Call]] = {gid: [] for gid in gids}
    for call in participant.calls:
        out.setdefault(call.query.get("gid", ""), []).append(call)
    return out


def check_saga_calls(
    gid: str, calls: list[Call], steps: int, fail_step: int | None, most: int
) -> int:
    """Check what a participant saw of one finished `saga_body` saga; return the repeats.

    Succeeded (fail_step None): every action a<i> ran, in order, its last answer 200, and
    nothing was compensated. Failed at `fail_step`: the actions up to it ran in order, none
    after it, and each of those steps was compensated, last step first, only once the
    refusal was answered, each compensation's last call succeeding. Every branch was
    called at least once and at most `most` times.
    """

    def of(path: str) -> list[Call]:
        return [c for c in calls if c.path == f"/{path}"]

    repeats = 0
    ran = range(1, (fail_step or steps) + 1)
    for i in range((fail_step or steps) + 1, steps + 1):
        assert not of(f"a{i}"), f"{gid}: a{i} ran after step {fail_step} failed"
        assert not of(f"c{i}"), f"{gid}: c{i} ran but a{i} never did"
    previous_ok = 0.0
    for i in ran:
        acts = of(f"a{i}")
        assert acts, f"{gid}: a{i} never called"
        assert len(acts) <= most, f"{gid}: a{i} called {len(acts)} times"
        assert min(c.started for c in acts) >= previous_ok, f"{gid}: a{i} ran too early"
        repeats += len(acts) - 1
        if i == fail_step:
            assert all(c.status == FAIL[0] for c in acts), f"{gid}: a{i} was not refused"
        else:
            assert acts[-1].status == 200, f"{gid}: a{i}'s last call did not succeed"
            previous_ok = min(c.ended for c in acts if c.status == 200)
    if fail_step is None:
        assert not any(c.path.startswith("/c") for c in calls), f"{gid}: compensated"
        return repeats
    # Compensation starts once the refusal was answered, then goes backwards: step i is
    # undone only after step i+1's compensation succeeded.
    not_before = min(c.ended for c in of(f"a{fail_step}"))
    for i in reversed(ran):
        comp = of(f"c{i}")
        assert comp, f"{gid}: c{i} never called although a{i} ran"
        assert len(comp) <= most, f"{gid}: c{i} called {len(comp)} times"
        assert comp[-1].status == 200, f"{gid}: c{i}'s last call did not succeed"
        assert min(c.started for c in comp) >= not_before, f"{gid}: c{i} ran too early"
        not_before = min(c.ended for c in comp if c.status == 200)
        repeats += len(comp) - 1
    return repeats


class AppServer:
    """An aiohttp application served on a loopback port (SDK-built participants).

    `stop()` and `start()` again keep the port, like a service restarted in place; give a
    factory to get a fresh application (fresh state) on each start.
    """

    def __init__(
        self, app: web.Application | Callable[[], web.Application], port: int = 0,
        shutdown_timeout: float = 0.5,
    ) -> None:
        self.app = app
        self.port = port or free_port()
        self.shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    async def start(self) -> AppServer:
        app = self.app if isinstance(self.app, web.Application) else self.app()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


def drop_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix` (what a module-scoped coordinator left)."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
