"""The saga state machine (pure).

Layout: step i (0-based) is branch id ``%02d % (i+1)`` with two records, compensate then
action, as dtm reports them. Actions run in order, or, when concurrent, as soon as the
steps listed in ``orders`` succeeded. A FAILURE from an action, a timeout or an exhausted
retry limit (retries of an unanswered action run at once while the limit lasts, as in
dtm) moves the saga to aborting; then every action that may have started gets
its compensation, in reverse order of the prerequisites, and the saga ends failed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from coordinator.machines.base import (
    Defaults,
    Outcome,
    OutcomeKind,
    Plan,
    Retry,
    Verdict,
    is_timed_out,
    timeout_of,
)
from coordinator.model import Branch, BranchStatus, Op, Status, Trans, new_branch


@dataclass(frozen=True)
class Ordering:
    """Which steps must succeed before each step's action may run."""

    concurrent: bool
    prerequisites: Mapping[int, tuple[int, ...]]

    def before(self, step: int) -> tuple[int, ...]:
        if not self.concurrent:
            return (step - 1,) if step > 0 else ()
        return self.prerequisites.get(step, ())

    def after(self, step: int, count: int) -> tuple[int, ...]:
        """Steps whose action depends on this one (they roll back first)."""
        return tuple(s for s in range(count) if step in self.before(s))


# The machine re-reads the ordering on every plan, so small custom_data strings are
# cached; long ones are not, which bounds the cache by bytes (4096 × 1 KB), not count:
# a count-bounded cache kept up to 4096 client strings of up to 1 MB each.
_CACHED_ORDERING_CHARS = 1024


def parse_ordering(custom_data: str, concurrent_option: bool, steps: int) -> Ordering:
    """Read ``{"concurrent": bool, "orders": {"1": [0]}}``; raises ValueError if invalid."""
    if len(custom_data) <= _CACHED_ORDERING_CHARS:
        return _cached_ordering(custom_data, concurrent_option, steps)
    return _parse_ordering(custom_data, concurrent_option, steps)


def _parse_ordering(custom_data: str, concurrent_option: bool, steps: int) -> Ordering:
    concurrent = concurrent_option
    prerequisites: dict[int, tuple[int, ...]] = {}
    if custom_data:
        try:
            data = orjson.loads(custom_data)
        except orjson.JSONDecodeError as exc:
            raise ValueError("custom_data is not valid JSON") from exc
        if not isinstance(data, dict):
            raise ValueError("custom_data must be a JSON object")
        concurrent = concurrent or bool(data.get("concurrent", False))
        orders = data.get("orders") or {}
        if not isinstance(orders, dict):
            raise ValueError("custom_data.orders must be an object")
        for key, pres in orders.items():
            step = int(key)
            if not isinstance(pres, list) or not all(isinstance(p, int) for p in pres):
                raise ValueError(f"custom_data.orders[{key}] must be a list of step indexes")
            if not (0 <= step < steps) or any(not (0 <= p < steps) or p == step for p in pres):
                raise ValueError(f"custom_data.orders[{key}] names a step out of range")
            prerequisites[step] = tuple(pres)
    if concurrent and prerequisites:
        # Refuse cycles ({"0":[1],"1":[0]}): no step in one could ever start, so the
        # saga was accepted and then polled forever without finishing. Kahn's algorithm.
        missing = {s: len(set(pres)) for s, pres in prerequisites.items()}
        dependents: dict[int, list[int]] = {}
        for s, pres in prerequisites.items():
            for p in set(pres):
                dependents.setdefault(p, []).append(s)
        ready = [s for s in range(steps) if not missing.get(s)]
        startable = 0
        while ready:
            startable += 1
            for d in dependents.get(ready.pop(), ()):
                missing[d] -= 1
                if missing[d] == 0:
                    ready.append(d)
        if startable < steps:
            raise ValueError("custom_data.orders has a cycle: its steps could never start")
    return Ordering(concurrent, prerequisites)


_cached_ordering = functools.lru_cache(maxsize=4096)(_parse_ordering)


def branches_for(steps: Sequence[Mapping[str, str]]) -> tuple[Branch, ...]:
    out: list[Branch] = []
    for i, step in enumerate(steps):
        bid = f"{i + 1:02d}"
        out.append(new_branch(bid, Op.COMPENSATE, step.get("compensate") or ""))
        out.append(new_branch(bid, Op.ACTION, step.get("action") or ""))
    return tuple(out)


def _actions(trans: Trans) -> list[Branch]:
    """The actions in step order.

    The branches are stored in step order: branches_for lays a saga out so and the store
    keeps the creation order (seq). Sorting them by branch_id instead put step "100"
    before step "11".
    """
    return [b for b in trans.branches if b.op is Op.ACTION]


def _ordering(trans: Trans, steps: int) -> Ordering:
    return parse_ordering(trans.custom_data, trans.options.concurrent, steps)


def _runnable(actions: Sequence[Branch], order: Ordering, step: int) -> bool:
    if not order.concurrent:  # the common case, without a tuple per step
        return step == 0 or actions[step - 1].status is BranchStatus.SUCCEED
    return all(actions[p].status is BranchStatus.SUCCEED for p in order.before(step))


def _in_order(actions: Sequence[Branch]) -> tuple[Branch, ...]:
    """The actions a sequential saga calls now: those whose predecessor succeeded.

    An action with an empty URL succeeds without a call (the engine records it with its
    next write), so a run of them goes in one round, not a round each. Only empty ones
    join such a round: a real call still waits until the success before it is written.
    """
    calls: list[Branch] = []
    for i, a in enumerate(actions):
        if a.status is not BranchStatus.PREPARED:
            continue
        before = actions[i - 1] if i else None
        if (before is None or before.status is BranchStatus.SUCCEED
                or (not a.url and not before.url and calls and calls[-1] is before)):
            calls.append(a)
    return tuple(calls)


class _Steps:
    """Index of a saga's branches by step."""

    def __init__(self, trans: Trans) -> None:
        self.actions = _actions(trans)
        self.compensations = [b for b in trans.branches if b.op is not Op.ACTION]
        self.order = _ordering(trans, len(self.actions))

    def may_have_started(self, step: int) -> bool:
        # An action counts as started once it has an answer, or once it was allowed to
        # run: a crash may have lost the record of a call that did reach the service.
        return self.actions[step].status is not BranchStatus.PREPARED or _runnable(
            self.actions, self.order, step
        )

    def rolled_back(self, step: int) -> bool:
        return (
            self.compensations[step].status is BranchStatus.SUCCEED
            or not self.may_have_started(step)
        )


# The plans without calls, made once (a Plan is immutable).
_NOTHING = Plan()
_SUCCEED = Plan(Status.SUCCEED)
_FAILED = Plan(Status.FAILED)


class SagaMachine:
    def plan(self, trans: Trans, now_ms: int, defaults: Defaults) -> Plan:
        if trans.status is Status.SUBMITTED:
            return self._plan_forward(trans, now_ms, defaults)
        if trans.status is Status.ABORTING:
            return self._plan_backward(trans)
        return _NOTHING

    def _plan_forward(self, trans: Trans, now_ms: int, defaults: Defaults) -> Plan:
        actions = _actions(trans)
        statuses = [a.status for a in actions]
        if BranchStatus.FAILED in statuses:
            return Plan(Status.ABORTING, trans.rollback_reason or "a saga action failed")
        if statuses.count(BranchStatus.SUCCEED) == len(statuses):
            return _SUCCEED
        if is_timed_out(trans, now_ms, defaults):
            return Plan(
                Status.ABORTING, f"Timeout after {timeout_of(trans, defaults)} seconds"
            )
        order = _ordering(trans, len(actions))
        if not order.concurrent:
            return Plan(calls=_in_order(actions))
        calls = tuple(
            a
            for i, a in enumerate(actions)
            if a.status is BranchStatus.PREPARED and _runnable(actions, order, i)
        )
        return Plan(calls=calls)

    def _plan_backward(self, trans: Trans) -> Plan:
        steps = _Steps(trans)
        count = len(steps.actions)
        pending = [i for i in range(count) if not steps.rolled_back(i)]
        if not pending:
            return _FAILED
        calls = tuple(
            steps.compensations[i]
            for i in reversed(pending)
            if all(steps.rolled_back(later) for later in steps.order.after(i, count))
        )
        return Plan(calls=calls)

    def absorb(
        self, trans: Trans, outcomes: Mapping[str, Outcome], now_ms: int, defaults: Defaults
    ) -> Verdict:
        updates: dict[str, BranchStatus] = {}
        failures: list[str] = []
        retry = Retry.NONE
        actions_pending = 0
        by_key: dict[str, Branch] = {}  # built only when an outcome is not a success
        for key, outcome in outcomes.items():
            if outcome.kind is OutcomeKind.SUCCESS:
                updates[key] = BranchStatus.SUCCEED
                continue
            if not by_key:
                by_key = {b.key: b for b in trans.branches}
            branch = by_key[key]
            if outcome.kind is OutcomeKind.FAILURE and branch.op is Op.ACTION:
                # Only an action may fail; a failing compensation is retried until it
                # succeeds, since the saga cannot be undone otherwise.
                updates[key] = BranchStatus.FAILED
                failures.append(
                    f"branch {branch.branch_id} action {branch.url} failed: {outcome.message}"
                )
            else:
                kind = Retry.KEEP if outcome.kind is OutcomeKind.ONGOING else Retry.BACKOFF
                retry = max(retry, kind)
                actions_pending += branch.op is Op.ACTION
        if failures and trans.status is Status.SUBMITTED:
            return Verdict(updates, Status.ABORTING, "; ".join(failures))
        limit = trans.options.retry_limit
        if actions_pending and limit > 0 and trans.status is Status.SUBMITTED:
            # dtm's rule: each unfinished action answer is retried at once, in the same
            # round, while retry_count < retry_limit; the first one past it aborts. So a
            # wait_result submit whose retry succeeds still answers SUCCESS.
            if trans.retry_count + actions_pending > limit:
                reason = f"RetryCount is greater than RetryLimit, RetryLimit: {limit}"
                return Verdict(updates, Status.ABORTING, reason, Retry.NONE,
                               {"retry_count": str(limit)})
            count = str(trans.retry_count + actions_pending)
            return Verdict(updates, None, "", Retry.NONE, {"retry_count": count},
                           retry_at_once=True)
        return Verdict(updates, None, "", retry)
