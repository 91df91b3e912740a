"""Test support: real participant services on loopback and coordinator processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

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


# A reply is (status, body) or a callable (call) -> (status, body); "sleep:<s>" delays.
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
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def plan(self, path: str, *replies: Reply | Responder) -> None:
        self._plans[("", "/" + path.lstrip("/"))] = list(replies)

    def plan_for(self, gid: str, path: str, *replies: Reply | Responder) -> None:
        self._plans[(gid, "/" + path.lstrip("/"))] = list(replies)

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
            if self.delay:
                await asyncio.sleep(self.delay)
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


class CoordinatorProcess:
    """`coordinator serve` as a child process, on its own port and key prefix."""

    def __init__(self, redis_url: str, prefix: str, **env: Any) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.port = free_port()
        self.env = {k: str(v) for k, v in env.items()}
        self.proc: subprocess.Popen[bytes] | None = None
        logs = Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = logs / f"coordinator-{prefix}-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.base}/api/dtmsvr"

    async def start(self, timeout: float = 15.0) -> CoordinatorProcess:
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
             "--redis-url", self.redis_url, "--log-level", "WARNING"],
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

    def __init__(self, session: aiohttp.ClientSession, api: str) -> None:
        self.session = session
        self.api = api

    async def post(self, op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.api}/{op}", json=body) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, op: str, **params: Any) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{self.api}/{op}", params=params) as r:
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
