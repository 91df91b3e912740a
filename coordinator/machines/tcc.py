"""TCC and XA state machines (pure): phase two over the registered branches.

The client runs phase one itself (try, or the XA local prepare) after registering each
branch. Submit moves the transaction to submitted: every confirm (commit) is called.
Abort, or the prepared transaction timing out, moves it to aborting: every cancel
(rollback) is called. Branches are called one at a time. TCC cancels newest first so that
nested branches are undone before their parents; XA rolls back in registration order,
as it commits (dtm does the same). Phase two cannot fail: FAILURE is
retried until the branch succeeds.
"""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.machines.base import (
    Defaults,
    Outcome,
    OutcomeKind,
    Plan,
    Retry,
    Verdict,
    deadline_ms,
    is_timed_out,
    timeout_of,
)
from coordinator.model import BranchStatus, Op, Status, Trans


class PhaseTwoMachine:
    def __init__(
        self, forward: Op, backward: Op, reverse_forward: bool, reverse_backward: bool
    ) -> None:
        self.forward = forward
        self.backward = backward
        self.reverse_forward = reverse_forward
        self.reverse_backward = reverse_backward

    def plan(self, trans: Trans, now_ms: int, defaults: Defaults) -> Plan:
        if trans.status is Status.PREPARED:
            if is_timed_out(trans, now_ms, defaults):
                return Plan(Status.ABORTING,
                            f"Timeout after {timeout_of(trans, defaults)} seconds")
            return Plan(wake_at_ms=deadline_ms(trans, defaults))
        if trans.status is Status.SUBMITTED:
            op, done, reverse = self.forward, Status.SUCCEED, self.reverse_forward
        elif trans.status is Status.ABORTING:
            op, done, reverse = self.backward, Status.FAILED, self.reverse_backward
        else:
            return Plan()
        pending = [b for b in trans.branches
                   if b.op is op and b.status is not BranchStatus.SUCCEED]
        if not pending:
            return Plan(done)
        pending.sort(key=lambda b: b.seq, reverse=reverse)
        return Plan(calls=(pending[0],))

    def absorb(
        self, trans: Trans, outcomes: Mapping[str, Outcome], now_ms: int, defaults: Defaults
    ) -> Verdict:
        updates: dict[str, BranchStatus] = {}
        retry = Retry.NONE
        for key, outcome in outcomes.items():
            if outcome.kind is OutcomeKind.SUCCESS:
                updates[key] = BranchStatus.SUCCEED
            elif outcome.kind is OutcomeKind.ONGOING:
                retry = max(retry, Retry.KEEP)
            else:
                retry = max(retry, Retry.BACKOFF)
        return Verdict(updates, retry=retry)


class TccMachine(PhaseTwoMachine):
    def __init__(self) -> None:
        super().__init__(Op.CONFIRM, Op.CANCEL, reverse_forward=True, reverse_backward=True)


class XaMachine(PhaseTwoMachine):
    def __init__(self) -> None:
        super().__init__(Op.COMMIT, Op.ROLLBACK, reverse_forward=False, reverse_backward=False)
