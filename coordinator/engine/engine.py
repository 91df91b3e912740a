"""The engine: the only component that talks to both the store and the state machines.

It claims due transactions (leases with fencing tokens), asks the transaction's state
machine what to do, calls branches through `BranchCaller`, and writes the results back
with compare-and-set transitions. Any number of engines may share one store.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping
from typing import Any

from coordinator.engine.branch_log import BranchLog
from coordinator.engine.caller import BranchCaller
from coordinator.errors import LeaseLost, NotFound, StatusConflict, StoreUnavailable
from coordinator.machines.base import (
    SUCCESS,
    Defaults,
    Machine,
    Outcome,
    OutcomeKind,
    Plan,
    Retry,
    Verdict,
    deadline_ms,
    next_interval,
)
from coordinator.model import FINISHED, Branch, BranchStatus, Status, Trans, evolve, stamped
from coordinator.observer import NULL_OBSERVER, Observer
from coordinator.settings import EngineSettings
from coordinator.store.base import Store, Transition

CLAIM_BATCH = 64
# A partition whose claim just filled the batch is claimed from again by the next poll
# without first looking at every partition (one round trip of three saved while a
# backlog drains, as a flash sale's orders do), at most this many polls in a row: then
# a full look again, so that the other partitions get their turn.
HOT_CLAIMS = 3
# A look that found due work whose claim then got none (another engine claimed it in
# between: all engines look at the same front of a due index) is followed by another
# poll at once rather than after the poll interval, at most this many times in a row
# (a clock ahead of Redis's can make work look due that the claim finds is not yet).
RACE_RETRIES = 3

log = logging.getLogger("coordinator.engine")

# Each status as the one a write under the lease expects, built once rather than per
# write (frozensets are immutable, so sharing them is safe).
_ONLY = {status: frozenset({status}) for status in Status}


class Engine:
    def __init__(
        self,
        store: Store,
        caller: BranchCaller,
        machines: Mapping[str, Machine],
        settings: EngineSettings,
    ) -> None:
        self.store = store
        self.caller = caller
        self.machines = machines
        self.settings = settings
        self.defaults: Defaults = settings.defaults()
        self.instance = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stopped_future: asyncio.Future[None] | None = None
        self._next_partition = 0
        self._hot: int | None = None  # see HOT_CLAIMS
        self._hot_polls = 0
        self._missed = False  # the last poll found due work but claimed none
        self._room: asyncio.Event | None = None  # set when workers free up (at capacity)
        self.stats = {"claimed": 0, "finished": 0, "branch_calls": 0, "conflicts": 0}
        self.branch_log = BranchLog()
        self.observer: Observer = NULL_OBSERVER  # metrics hooks (coordinator/observer.py)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._poll_loop(), name="coordinator-poll"),
            asyncio.create_task(self._sweep_loop(), name="coordinator-sweep"),
        ]

    async def stop(self) -> None:
        """Stop claiming, give in-flight work the grace period, then cancel the rest.

        Cancelled work is not lost: its lease runs out and another engine (or this
        one, restarted) claims it again.
        """
        self._signal_stopping()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def begin_stop(self) -> None:
        """Stop claiming new work; in-flight work goes on until `stop`.

        Called as the HTTP server starts to shut down (SIGTERM), before it waits for open
        requests, so that wait_result requests can answer at once (see Service._wait)
        instead of holding the exit past the grace period.
        """
        self._signal_stopping()

    def stopping(self) -> asyncio.Future[None]:
        """A future that completes once the engine has begun to stop.

        One shared future rather than a task per waiter: every wait_result request
        waits on it, so it has to cost nothing per request.
        """
        if self._stopped_future is None:
            self._stopped_future = asyncio.get_running_loop().create_future()
            if self._stopping.is_set():
                self._stopped_future.set_result(None)
        return self._stopped_future

    def _signal_stopping(self) -> None:
        self._stopping.set()
        if self._stopped_future is not None and not self._stopped_future.done():
            self._stopped_future.set_result(None)

    @property
    def active(self) -> int:
        return len(self._tasks)

    def has_capacity(self) -> bool:
        return not self._stopping.is_set() and self.active < self.settings.concurrency

    def new_token(self) -> str:
        return f"{self.instance}:{next(self._counter)}"

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        room = self._room
        if room is not None and (self.settings.concurrency - len(self._tasks)
                                 >= max(1, min(CLAIM_BATCH, self.settings.concurrency) // 2)):
            room.set()

    # -- claiming -------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        outage = False
        retries = 0
        while not self._stopping.is_set():
            claimed = 0
            try:
                claimed = await self.poll_once()
            except StoreUnavailable as exc:  # keep trying: the work is safe in Redis
                if not outage:
                    log.warning("claiming paused: %s", exc)
                outage = True
            except Exception:
                log.exception("claiming due transactions failed")
            else:
                if outage:
                    log.warning("claiming resumed: Redis answers again")
                outage = False
            if claimed == 0 and self._missed and retries < RACE_RETRIES:
                retries += 1
                continue
            retries = 0
            if claimed == 0:
                # At capacity, look again once half a batch of workers is free rather than
                # a poll interval later: with a backlog due, that is at once.
                wake = self._stopping
                if self.active >= self.settings.concurrency and not wake.is_set():
                    wake = self._room = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.settings.poll_interval)
                self._room = None

    async def poll_once(self) -> int:
        """Claim due work from every partition, as much as there are free workers."""
        total = 0
        tried = False
        hot, self._hot = self._hot, None
        self._missed = False
        if hot is not None:
            due = [hot]  # see HOT_CLAIMS
            self._hot_polls += 1
        else:
            self._hot_polls = 0
            count = self.store.partitions
            start = self._next_partition
            self._next_partition = (start + 1) % count
            # One look at every partition first (one pipeline per Redis node), then claims
            # only where something is due, starting at a different partition each round.
            due = await self.store.due_partitions()
            due.sort(key=lambda p: (p - start) % count)
        for partition in due:
            # At most CLAIM_BATCH at a time: decoding and starting hundreds of claimed
            # transactions in one go stalled the event loop for hundreds of ms (flash
            # sale); the loop claims again at once while it finds work.
            free = min(self.settings.concurrency - self.active, CLAIM_BATCH)
            if free <= 0 or self._stopping.is_set():
                break
            sent = time.monotonic()  # the lease runs from (at latest) the claim's send
            claimed = await self.store.claim(partition, free, self.new_token())
            tried = True
            for item in claimed:
                total += 1
                if item.taken_over:
                    self.observer.lease_takeover()
                self.spawn(self._run(item.trans, item.token, item.now, sent))
            if len(claimed) == free and self._hot_polls < HOT_CLAIMS and self._hot is None:
                self._hot = partition
        self._missed = tried and total == 0
        self.stats["claimed"] += total
        return total

    async def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.sweep_interval)
            try:
                for partition in range(self.store.partitions):
                    await self.store.sweep(partition)
            except StoreUnavailable:
                pass  # the claim loop reports the outage
            except Exception:
                log.exception("sweeping expired index entries failed")

    # -- driving one transaction ----------------------------------------------------------

    async def _run(self, trans: Trans, token: str, now_ms: int, leased_at: float) -> Trans:
        try:
            return await Run(self, trans, token, now_ms, leased_at).drive()
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:  # no traceback per transaction during an outage
            log.warning("processing %s paused: %s; it is retried when its lease ends",
                        trans.gid, exc, extra={"gid": trans.gid, "trans_type": trans.trans_type})
            return trans
        except Exception:
            log.exception("processing %s failed; it is retried when its lease ends", trans.gid)
            return trans

    async def create_and_run(self, trans: Trans, *, due_in_ms: int) -> asyncio.Task[Trans] | None:
        """Store a new transaction and, if this engine has room, start driving it now.

        Without room it is stored unowned and due at once, so any engine claims it.
        """
        if self.has_capacity():
            token = self.new_token()
            sent = time.monotonic()
            now = await self.store.create(
                trans, due_in_ms=due_in_ms, owner=token, lease_ms=self.lease_ms
            )
            # As create stored it, branch records included: the writes under the lease
            # send the records whole (see Transition.records).
            stored = evolve(
                trans, create_time=now, update_time=now, owner=token,
                branches=stamped(trans.branches, now),
            )
            return self.spawn(self._run(stored, token, now, sent))
        await self.store.create(trans, due_in_ms=due_in_ms)
        return None

    async def take_over(self, gid: str, expected: frozenset[Status], new_status: Status,
                        fields: Mapping[str, str] | None = None) -> asyncio.Task[Trans] | None:
        """Change an existing transaction's status by API and drive it if the lease is free."""
        token = self.new_token()
        lease = f"acquire:{token}" if self.has_capacity() else ""
        sent = time.monotonic()
        result = await self.store.transition(
            gid,
            Transition(
                expected=expected, new_status=new_status, fields=fields or {},
                next_due_ms=0, lease=lease, lease_ms=self.lease_ms,
            ),
        )
        if result.status in FINISHED or not result.acquired:
            return None
        trans = await self.store.load(gid)
        if trans is None:
            return None
        return self.spawn(self._run(trans, token, result.now, sent))


class Written(enum.Enum):
    APPLIED = "applied"
    RELOADED = "reloaded"
    LOST = "lost"


class Run:
    """One worker's hold on one transaction, from claim to release or finish."""

    def __init__(
        self, engine: Engine, trans: Trans, token: str, now_ms: int, leased_at: float
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.trans = trans
        self.token = token
        self.machine = engine.machines[trans.trans_type]
        self.defaults = engine.defaults
        self._clock_base = (now_ms, time.monotonic())
        # Counted from before the request that took the lease, so never too generous even
        # when the event loop was slow to start this run.
        self._lease_until = leased_at + engine.lease_ms / 1000
        self.pending: dict[str, BranchStatus] = {}
        self.pending_fields: dict[str, str] = {}
        self._burst_started: float | None = None  # of the current at-once retries
        self._task: asyncio.Task[Any] | None = None  # the one running drive()

    def now(self) -> int:
        base_ms, base_mono = self._clock_base
        return base_ms + int((time.monotonic() - base_mono) * 1000)

    def _stop_if_cancelled(self) -> None:
        """On Python 3.11 a cancel can be swallowed inside a client's wait_for (a Redis
        reply, a branch call); a cancelled run must not go on calling or writing."""
        if self._task is not None and self._task.cancelling():
            raise asyncio.CancelledError

    async def drive(self) -> Trans:
        self._task = asyncio.current_task()
        while True:
            self._stop_if_cancelled()
            if self.trans.status in FINISHED:
                return self.trans
            plan = self.machine.plan(self.trans, self.now(), self.defaults)
            if plan.new_status is not None:
                if not await self._move(plan.new_status, plan.reason):
                    return self.trans
                continue
            if not plan.calls:
                if await self._release(plan.wake_at_ms) is Written.RELOADED:
                    continue
                return self.trans
            if not await self._call(plan):
                return self.trans

    async def _call(self, plan: Plan) -> bool:
        """Run one round of branch calls; False when this run is over."""
        local = [b for b in plan.calls if not b.url]
        durations: dict[str, float] = {}
        started = time.monotonic()
        if local:
            # Empty URLs succeed without a call; record them with the next write.
            outcomes: dict[str, Outcome] = {b.key: SUCCESS for b in local}
        else:
            # Results are written before the next round of calls starts (so a crash
            # repeats at most one round), and the lease must outlast the calls.
            needed = (self.trans.options.request_timeout or self.defaults.request_timeout) + 1
            must_write = bool(self.pending or self.pending_fields) or (
                self._lease_until - time.monotonic() < needed
            )
            if must_write:
                written = await self._write(lease="renew")
                if written is not Written.APPLIED:
                    # Reloaded: the status changed under us, so re-plan before calling.
                    return written is Written.RELOADED
            self.engine.stats["branch_calls"] += len(plan.calls)
            results: list[Outcome | BaseException]
            if len(plan.calls) == 1:
                # One call (msg, tcc, xa, a sequential saga) needs no task of its own.
                try:
                    results = [await self._timed_call(plan.calls[0], durations)]
                except Exception as exc:
                    results = [exc]
                # Before any write, as when gather's own future was cancelled.
                self._stop_if_cancelled()
            else:
                results = await asyncio.gather(
                    *(self._timed_call(b, durations) for b in plan.calls),
                    return_exceptions=True,
                )
            # The caller maps every expected failure to an outcome; anything it missed
            # is still only this branch's error, not a reason to drop the others' results.
            outcomes = {
                b.key: r if isinstance(r, Outcome)
                else Outcome(OutcomeKind.ERROR, f"{type(r).__name__}: {r}"[:300])
                for b, r in zip(plan.calls, results, strict=True)
            }
            for r in results:
                if isinstance(r, asyncio.CancelledError):
                    raise r
        self.engine.observer.branches_done(self.trans, outcomes)
        verdict = self.machine.absorb(self.trans, outcomes, self.now(), self.defaults)
        self.trans = self.trans.with_branches(verdict.branch_updates)
        self.pending.update(verdict.branch_updates)
        self.pending_fields.update(verdict.fields)
        if "retry_count" in verdict.fields:
            self.trans = evolve(self.trans, retry_count=int(verdict.fields["retry_count"]))
        if verdict.new_status is not None:
            self._report(plan, outcomes, durations, None)
            return await self._move(verdict.new_status, verdict.reason)
        retry = self._bound_burst(verdict, started)
        if retry is not Retry.NONE:
            self.engine.observer.retried(self.trans)
            interval = next_interval(self.trans, retry, self.defaults)
            self.pending_fields["next_cron_interval"] = str(interval)
            due = self.now() + interval * 1000
            deadline = deadline_ms(self.trans, self.defaults)
            # Only a submitted saga times out (msg/tcc/xa timeouts bound the prepared
            # phase, long past once submitted: clamping to it retried with no wait).
            if (self.trans.trans_type == "saga" and self.trans.status is Status.SUBMITTED
                    and deadline is not None):
                due = min(due, max(deadline, self.now()))
            self._report(plan, outcomes, durations, max(0, due - self.now()) / 1000)
            return await self._release(due) is Written.RELOADED
        self._report(plan, outcomes, durations, 0)
        # A success resets the back-off: with 0 the next error waits the base interval
        # again (see next_interval); resetting to the base made it wait twice that.
        if self.trans.next_cron_interval:
            self.pending_fields["next_cron_interval"] = "0"
            self.trans = evolve(self.trans, next_cron_interval=0)
        return True

    def _bound_burst(self, verdict: Verdict, round_started: float) -> Retry:
        """The retry to schedule; at-once retries end after one round's time budget.

        Like dtm, which retries at once only within request_timeout + 2 s of processing,
        so a huge retry_limit on a branch that fails fast cannot spin a worker: the
        rest of the retries wait the retry interval, a burst at a time.
        """
        if not verdict.retry_at_once:
            self._burst_started = None
            return verdict.retry
        if self._burst_started is None:
            self._burst_started = round_started
        budget = (self.trans.options.request_timeout or self.defaults.request_timeout) + 2
        if time.monotonic() - self._burst_started < budget:
            return Retry.NONE
        self._burst_started = None
        return Retry.KEEP

    async def _timed_call(self, branch: Branch, durations: dict[str, float]) -> Outcome:
        started = time.monotonic()
        try:
            return await self.engine.caller.call(self.trans, branch)
        finally:
            durations[branch.key] = time.monotonic() - started

    def _report(
        self, plan: Plan, outcomes: Mapping[str, Outcome], durations: Mapping[str, float],
        next_retry_s: float | None,
    ) -> None:
        """Log the round's outcomes that are not a success (see branch_log.py)."""
        for branch in plan.calls:
            outcome = outcomes.get(branch.key, SUCCESS)
            if outcome.kind is not OutcomeKind.SUCCESS:
                self.engine.branch_log.report(
                    self.trans, branch, outcome, durations.get(branch.key, 0.0), next_retry_s
                )

    async def _move(self, status: Status, reason: str) -> bool:
        """Change the global status; True when this run should plan again."""
        if reason:
            self.pending_fields["rollback_reason"] = reason
        previous = self.trans.status
        written = await self._write(new_status=status, lease="renew")
        if written is not Written.APPLIED:
            # Reloaded: the store's status (set by an API call) is what holds, not ours.
            return written is Written.RELOADED
        if reason:
            self.trans = evolve(self.trans, rollback_reason=reason)
        if status in FINISHED:
            self.engine.stats["finished"] += 1
            self.engine.observer.finished(self.trans, status, self.now())
            return False
        if previous is Status.PREPARED:
            # Branches can be registered until the status leaves prepared (the register
            # script checks it): reload so that every one of them is confirmed/cancelled.
            fresh = await self.store.load(self.trans.gid)
            if fresh is None or fresh.owner != self.token:
                return False
            self.trans = fresh
        return True

    async def _release(self, wake_at_ms: int | None) -> Written:
        if wake_at_ms is None:
            wake_at_ms = self.now() + next_interval(self.trans, Retry.KEEP, self.defaults) * 1000
        return await self._write(lease="release", next_due_ms=max(0, wake_at_ms - self.now()))

    async def _write(
        self, *, new_status: Status | None = None, lease: str, next_due_ms: int | None = None
    ) -> Written:
        """Write pending results under our lease.

        APPLIED: written. RELOADED: an API call changed the status first; we still hold
        the lease and now carry the stored state (pending results dropped: the branches
        they came from are planned again). LOST: the transaction is not ours any more.
        """
        timeout = self.trans.options.request_timeout or self.defaults.request_timeout
        lease_ms = max(self.engine.lease_ms, (timeout * 2 + 5) * 1000)
        sent = time.monotonic()
        try:
            result = await self.store.transition(
                self.trans.gid,
                Transition(
                    expected=_ONLY[self.trans.status],
                    new_status=new_status,
                    owner=self.token,
                    fields=self.pending_fields,
                    branch_updates=self.pending,
                    records={b.key: b for b in self.trans.branches if b.key in self.pending},
                    next_due_ms=next_due_ms,
                    lease=lease,
                    lease_ms=lease_ms,
                ),
            )
        except StatusConflict:
            # An API call (abort, forceStop, submit) changed the status under us. Our
            # lease still fences other workers, so reload and carry on from the new state.
            self.engine.stats["conflicts"] += 1
            fresh = await self.store.load(self.trans.gid)
            self.pending.clear()
            self.pending_fields.clear()
            if fresh is None or fresh.owner != self.token or fresh.status in FINISHED:
                return Written.LOST
            self.trans = fresh
            return Written.RELOADED
        except (LeaseLost, NotFound):
            self.engine.stats["conflicts"] += 1
            return Written.LOST
        self.pending = {}
        self.pending_fields = {}
        self._clock_base = (result.now, time.monotonic())
        if lease == "renew":
            self._lease_until = sent + lease_ms / 1000
        self.trans = evolve(self.trans, status=result.status, update_time=result.now)
        return Written.APPLIED
