"""The two-phase message state machine (pure).

Prepared: nothing happens until the message times out; then the coordinator asks the
application through ``query_prepared`` (branch ``00``, op ``msg``) whether its local
transaction committed: success → submitted, FAILURE → failed, ONGOING → ask later.
Submitted: call every action, in order or all at once when concurrent, until each one
succeeds; a message action cannot fail, so FAILURE is retried like an error.
``custom_data`` ``{"delay": N}`` holds the first call back N seconds after creation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from coordinator.machines.base import (
    Defaults,
    Outcome,
    OutcomeKind,
    Plan,
    Retry,
    Verdict,
    deadline_ms,
    is_timed_out,
)
from coordinator.model import Branch, BranchStatus, Op, Status, Trans, new_branch

BACK_CHECK_KEY = "00:msg"


def back_check(trans: Trans) -> Branch:
    return Branch("00", Op.MSG, trans.query_prepared)


TOPIC_PREFIX = "topic://"


def branches_for(
    steps: Sequence[Mapping[str, str]], topics: Mapping[str, Sequence[str]]
) -> tuple[Branch, ...]:
    """One action per step; a ``topic://name`` action fans out to each subscriber.

    Raises KeyError naming a topic without subscribers.
    """
    out: list[Branch] = []
    for i, step in enumerate(steps):
        action = step.get("action") or ""
        if action.startswith(TOPIC_PREFIX):
            urls = list(topics.get(action[len(TOPIC_PREFIX):]) or [])
            if not urls:
                raise KeyError(action[len(TOPIC_PREFIX):])
        else:
            urls = [action]
        for j, url in enumerate(urls):
            suffix = "" if len(urls) == 1 else f"-{j + 1:02d}"
            out.append(new_branch(f"{i + 1:02d}{suffix}", Op.ACTION, url))
    return tuple(out)


def delay_of(custom_data: str) -> int:
    """Seconds to hold the first call back; raises ValueError for a malformed value."""
    if not custom_data:
        return 0
    try:
        data = orjson.loads(custom_data)
    except orjson.JSONDecodeError as exc:
        raise ValueError("custom_data is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ValueError("custom_data must be a JSON object")
    delay = data.get("delay", 0)
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError("custom_data.delay must be a whole number of seconds")
    return delay


def _retry_for(outcome: Outcome) -> Retry:
    return Retry.KEEP if outcome.kind is OutcomeKind.ONGOING else Retry.BACKOFF


class MsgMachine:
    def plan(self, trans: Trans, now_ms: int, defaults: Defaults) -> Plan:
        if trans.status is Status.PREPARED:
            if not is_timed_out(trans, now_ms, defaults):
                return Plan(wake_at_ms=deadline_ms(trans, defaults))
            if not trans.query_prepared:
                return Plan(Status.FAILED, "prepared message timed out without query_prepared")
            return Plan(calls=(back_check(trans),))
        if trans.status is not Status.SUBMITTED:
            return Plan()
        try:
            delay = delay_of(trans.custom_data)
        except ValueError:
            delay = 0
        if delay and now_ms < trans.create_time + delay * 1000:
            return Plan(wake_at_ms=trans.create_time + delay * 1000)
        pending = [b for b in trans.branches
                   if b.op is Op.ACTION and b.status is not BranchStatus.SUCCEED]
        if not pending:
            return Plan(Status.SUCCEED)
        concurrent = trans.options.concurrent
        return Plan(calls=tuple(pending) if concurrent else (pending[0],))

    def absorb(
        self, trans: Trans, outcomes: Mapping[str, Outcome], now_ms: int, defaults: Defaults
    ) -> Verdict:
        check = outcomes.get(BACK_CHECK_KEY)
        if check is not None:
            if check.kind is OutcomeKind.SUCCESS:
                return Verdict(new_status=Status.SUBMITTED)
            if check.kind is OutcomeKind.FAILURE:
                return Verdict(new_status=Status.FAILED,
                               reason=f"query_prepared answered FAILURE: {check.message}")
            return Verdict(retry=_retry_for(check))
        updates: dict[str, BranchStatus] = {}
        retry = Retry.NONE
        for key, outcome in outcomes.items():
            if outcome.kind is OutcomeKind.SUCCESS:
                updates[key] = BranchStatus.SUCCEED
            else:
                retry = max(retry, _retry_for(outcome))
        return Verdict(updates, retry=retry)
