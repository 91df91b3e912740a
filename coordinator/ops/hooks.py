"""The engine, caller and service as the operations features need them.

Subclasses rather than edits: metrics, log context and tracing wrap the three calls
that matter (a round of the engine, a branch call, a wait_result wait), so the engine
and the service stay free of them. Each wrapper does nothing extra when its feature is
off beyond a ContextVar set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from coordinator.engine.caller import BranchCaller
from coordinator.engine.engine import Engine
from coordinator.machines.base import Outcome
from coordinator.model import Branch, Trans, evolve
from coordinator.ops.logs import bind, log_context
from coordinator.ops.metrics import Metrics
from coordinator.ops.tracing import TRACEPARENT, Tracing
from coordinator.service import Service

log = logging.getLogger("coordinator.calls")


class ObservedEngine(Engine):
    metrics: Metrics | None = None
    tracing: Tracing | None = None

    async def _run(self, trans: Trans, token: str, now_ms: int, leased_at: float) -> Trans:
        bind(gid=trans.gid, trans_type=trans.trans_type)
        if self.tracing is None:
            return await super()._run(trans, token, now_ms, leased_at)
        with self.tracing.span(
            "engine round", headers=trans.ext_headers,
            attributes={"dtm.gid": trans.gid, "dtm.trans_type": trans.trans_type},
        ):
            return await super()._run(trans, token, now_ms, leased_at)

    def create_and_run(
        self, trans: Trans, *, due_in_ms: int
    ) -> Coroutine[Any, Any, asyncio.Task[Trans] | None]:
        # Not a coroutine itself: the engine's one is handed back as it is, rather than
        # awaited through one more frame on every submit (its resumptions included).
        if self.tracing is not None:
            # Stored with the transaction so a later round in any process joins the trace.
            parent = self.tracing.current_traceparent()
            if parent:
                trans = evolve(trans, ext_headers={**trans.ext_headers, TRACEPARENT: parent})
        return super().create_and_run(trans, due_in_ms=due_in_ms)


class ObservedCaller(BranchCaller):
    """Times each branch call by outcome, names it in the log context, traces it."""

    def __init__(
        self, inner: BranchCaller, metrics: Metrics | None, tracing: Tracing | None
    ) -> None:  # no super().__init__: every call goes to `inner`
        self.inner = inner
        self.metrics = metrics
        self.tracing = tracing

    def __getattr__(self, name: str) -> Any:
        # Anything else the engine or the app asks of the caller is the inner one's.
        return getattr(self.inner, name)

    async def call(self, trans: Trans, branch: Branch) -> Outcome:
        # A lone call runs in the engine's own task (several go through gather, a task
        # each), so the binding is undone after the call: it stays per branch.
        context = log_context.get() or {}
        token = log_context.set(
            {**context, "branch_id": branch.branch_id, "op": branch.op_name}
        )
        # One coroutine, not two: each frame of the await chain is passed through again
        # on every resumption of the call.
        try:
            started = time.perf_counter()
            if self.tracing is None or not branch.url:
                outcome = await self.inner.call(trans, branch)
            else:
                with self.tracing.client_span(
                    f"branch {branch.op_name}",
                    {"dtm.gid": trans.gid, "dtm.branch_id": branch.branch_id,
                     "dtm.op": branch.op_name, "http.url": branch.url},
                ) as traceparent:
                    sent = evolve(trans, ext_headers={**trans.ext_headers,
                                                      TRACEPARENT: traceparent})
                    outcome = await self.inner.call(sent, branch)
            seconds = time.perf_counter() - started
            if self.metrics is not None and branch.url:
                self.metrics.branch_call(outcome.kind, seconds)
            if log.isEnabledFor(logging.DEBUG):  # the answer's text may hold business data
                log.debug("branch call %s in %.1f ms: %s", outcome.kind.value,
                          seconds * 1000, outcome.message[:200])
            return outcome
        finally:
            log_context.reset(token)


class ObservedService(Service):
    """Counts the wait_result requests waiting right now (a metrics gauge)."""

    waiters = 0

    async def _wait(self, gid: str, task: Any) -> None:
        self.waiters += 1
        try:
            await super()._wait(gid, task)
        finally:
            self.waiters -= 1
