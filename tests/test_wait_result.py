"""Service._run_or_stop: a wait_result request waits for its run, the engine's stop or
its timeout, whichever comes first, and leaves no callback behind."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from coordinator.engine.engine import Engine
from coordinator.service import Service
from coordinator.settings import Settings


class StubEngine:
    store = None

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None

    def stopping(self) -> asyncio.Future[None]:
        if self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        return self.future


def service() -> tuple[Service, StubEngine]:
    engine = StubEngine()
    return Service(cast(Engine, engine), Settings.load(env={})), engine


async def test_returns_when_the_run_is_done() -> None:
    svc, _ = service()
    run: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(run)
    waiting = asyncio.ensure_future(svc._run_or_stop(task, 30))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not waiting.done()
    run.set_result("done")
    await asyncio.wait_for(waiting, 1)
    assert not svc._waiters


async def test_stop_wakes_every_waiter_at_once() -> None:
    svc, engine = service()
    tasks = [asyncio.ensure_future(asyncio.sleep(30)) for _ in range(3)]
    waiting = [asyncio.ensure_future(svc._run_or_stop(t, 30)) for t in tasks]  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert len(svc._waiters) == 3
    assert engine.future is not None
    engine.future.set_result(None)
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert not svc._waiters
    assert not any(t.done() for t in tasks)  # the runs go on
    # Once stopping, a new wait returns at once.
    await asyncio.wait_for(svc._run_or_stop(tasks[0], 30), 1)  # type: ignore[arg-type]
    for t in tasks:
        t.cancel()


async def test_timeout_and_cancel_leave_nothing_behind() -> None:
    svc, _ = service()
    task = asyncio.ensure_future(asyncio.sleep(30))
    await asyncio.wait_for(svc._run_or_stop(task, 0.05), 1)  # type: ignore[arg-type]
    waiting = asyncio.ensure_future(svc._run_or_stop(task, 30))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not svc._waiters
    assert not task.done()  # a client going away never cancels the run
    task.cancel()


async def test_waits_whose_timeouts_end_together_share_one_timer() -> None:
    svc, _ = service()
    tasks = [asyncio.ensure_future(asyncio.sleep(30)) for _ in range(3)]
    waiting = [asyncio.ensure_future(svc._run_or_stop(t, 0.05)) for t in tasks]  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert sum(len(grain) for grain in svc._expiring.values()) == 3
    assert len(svc._expiring) <= 2  # two only if a grain ends between them
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert not svc._expiring  # each grain's timer took its waiters away
    assert not svc._waiters
    assert not any(t.done() for t in tasks)
    for t in tasks:
        t.cancel()
