"""`coordinator demo`: the coordinator, two bank services and two sagas, end to end.

It starts the coordinator (on a private redis-server unless a Redis URL is configured),
a participant service holding two accounts, submits one transfer that succeeds and one
that the receiving bank refuses, and prints what each service saw and the final state.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from coordinator.api.app import create_app
from coordinator.embedded_redis import EmbeddedRedisError
from coordinator.settings import Settings
from coordinator.startup import (
    StartupError,
    bind_listeners,
    describe_listeners,
    describe_redis,
    prepare,
)


class Bank:
    """Two accounts; TransOut/TransIn and their compensations, as a participant sees them."""

    def __init__(self) -> None:
        self.balances = {"alice": 100, "bob": 0}
        self.log: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        op = request.match_info["op"]
        body = await request.json() if request.can_read_body else {}
        amount = int(body.get("amount", 0))
        branch = f"{request.query.get('branch_id')}/{request.query.get('op')}"
        if op == "TransOut":
            self.balances["alice"] -= amount
        elif op == "TransOutCompensate":
            self.balances["alice"] += amount
        elif op == "TransIn":
            if amount > 50:
                self.log.append(f"  {branch:15} {op:20} refused: over the limit")
                return web.json_response({"dtm_result": "FAILURE"}, status=409)
            self.balances["bob"] += amount
        elif op == "TransInCompensate":
            pass  # TransIn refused, so there is nothing to undo (a null compensation)
        self.log.append(f"  {branch:15} {op:20} ok  balances {self.balances}")
        return web.json_response({"dtm_result": "SUCCESS"})


def main(settings: Settings) -> int:
    """Run the demo; SIGTERM and Ctrl-C stop it cleanly, private redis-server included."""
    try:
        return asyncio.run(run_demo(settings))
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    except (EmbeddedRedisError, RedisError) as exc:
        raise StartupError(str(exc)) from None


async def run_demo(settings: Settings) -> int:
    # Bound first: a busy port fails here, before the private redis-server is started.
    sockets = await prepare(settings)
    stopped_by = _cancel_on_signals()
    coordinator = web.AppRunner(create_app(settings), access_log=None)
    bank_runner: web.AppRunner | None = None
    bank = Bank()
    ok = True
    try:
        await coordinator.setup()
        for sock in sockets:
            await web.SockSite(coordinator, sock).start()
        bank_app = web.Application()
        bank_app.router.add_post("/api/{op}", bank.handle)
        bank_runner = web.AppRunner(bank_app, access_log=None)
        await bank_runner.setup()
        bank_sock = bind_listeners("127.0.0.1", 0)[0]
        await web.SockSite(bank_runner, bank_sock).start()
        api = f"{describe_listeners(sockets[:1])}/api/dtmsvr"
        bank_url = f"http://127.0.0.1:{bank_sock.getsockname()[1]}/api"
        print(f"coordinator listening on {api}, state in {describe_redis(settings)}")
        async with aiohttp.ClientSession() as http:
            # A cancel that arrived while a library was swallowing cancellation (start-up
            # is full of connects and retries) still ends the demo at the next step.
            for amount, expect in ((30, "succeed"), (60, "failed")):
                if stopped_by:
                    break
                ok &= await _transfer(http, api, bank_url, bank, amount, expect)
    except asyncio.CancelledError:
        if not stopped_by:
            raise
    finally:
        # Also after a signal: stopping the app stops the private redis-server.
        if bank_runner is not None:
            await bank_runner.cleanup()
        await coordinator.cleanup()
        for sock in sockets:
            sock.close()
    if stopped_by:
        stopped_on_sigint = stopped_by[0] == signal.SIGINT
        print("demo interrupted" if stopped_on_sigint else "demo terminated", file=sys.stderr)
        return 130 if stopped_on_sigint else 143
    total = sum(bank.balances.values())
    print(f"final balances {bank.balances}, total {total} (started with 100)")
    ok &= total == 100 and bank.balances == {"alice": 70, "bob": 30}
    print("demo verified: every transfer all-or-nothing" if ok else "demo FAILED")
    return 0 if ok else 1


def _cancel_on_signals() -> list[int]:
    """Make SIGTERM and Ctrl-C cancel the demo, so its cleanup runs in order.

    Ctrl-C as a signal handler rather than KeyboardInterrupt: an interrupt raised at an
    arbitrary point of start-up (inside the gRPC server's start, say) left that server
    half-started and its shutdown failing with a traceback.
    """
    stopped_by: list[int] = []
    task = asyncio.current_task()
    assert task is not None

    def on_signal(sig: int) -> None:
        if not stopped_by:  # a second signal must not cut the cleanup short
            stopped_by.append(sig)
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stopped_by


async def _transfer(
    http: aiohttp.ClientSession, api: str, bank: str, b: Bank, amount: int, expect: str
) -> bool:
    async with http.get(f"{api}/newGid") as r:
        gid = (await r.json())["gid"]
    payload = f'{{"amount": {amount}}}'
    saga: dict[str, Any] = {
        "gid": gid,
        "trans_type": "saga",
        "steps": [
            {"action": f"{bank}/TransOut", "compensate": f"{bank}/TransOutCompensate"},
            {"action": f"{bank}/TransIn", "compensate": f"{bank}/TransInCompensate"},
        ],
        "payloads": [payload, payload],
        "wait_result": True,
    }
    print(f"\nsaga {gid}: transfer {amount} from alice to bob")
    b.log.clear()
    async with http.post(f"{api}/submit", json=saga) as r:
        answer = await r.json()
        print(f"  submit answered HTTP {r.status} {answer}")
    print("\n".join(b.log))
    async with http.get(f"{api}/query", params={"gid": gid}) as r:
        info = await r.json()
    trans = info["transaction"]
    print(f"  status {trans['status']}" + (
        f", reason: {trans['rollback_reason']}" if trans.get("rollback_reason") else ""))
    for branch in info["branches"]:
        print(f"    branch {branch['branch_id']} {branch['op']:10} {branch['status']}")
    return bool(trans["status"] == expect)
