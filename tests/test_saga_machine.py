"""Unit tests of the pure saga state machine and the shared retry/timeout helpers.

Everything here works on plain values: no Redis, no HTTP, no clock. The helpers build a
saga the way the API would (`branches_for`) and then play the engine's part by hand,
feeding outcomes to `absorb` and planning again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import orjson
import pytest

from coordinator.machines.base import (
    SUCCESS,
    Defaults,
    Outcome,
    OutcomeKind,
    Plan,
    Retry,
    is_timed_out,
    next_interval,
)
from coordinator.machines.saga import SagaMachine, branches_for, parse_ordering
from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans

MACHINE = SagaMachine()
DEFAULTS = Defaults(retry_interval=10, max_retry_interval=300, timeout_to_fail=35)
T0 = 1_700_000_000_000  # a creation time in ms; the machine never reads a clock

ONGOING = Outcome(OutcomeKind.ONGOING, "not yet")
ERROR = Outcome(OutcomeKind.ERROR, "HTTP 500")
FAILURE = Outcome(OutcomeKind.FAILURE, "business refused")


def saga(
    n: int,
    *,
    status: Status = Status.SUBMITTED,
    orders: Mapping[str, list[int]] | None = None,
    concurrent: bool = False,
    actions: Mapping[int, BranchStatus] | None = None,
    compensations: Mapping[int, BranchStatus] | None = None,
    options: Options | None = None,
    retry_count: int = 0,
    next_cron_interval: int = 0,
) -> Trans:
    """A saga of `n` steps; `actions`/`compensations` map 0-based steps to statuses."""
    steps = [{"action": f"http://svc/a{i}", "compensate": f"http://svc/c{i}"} for i in range(n)]
    custom = ""
    if orders is not None:
        custom = orjson.dumps({"concurrent": True, "orders": dict(orders)}).decode()
    updates: dict[str, BranchStatus] = {}
    for i, st in (actions or {}).items():
        updates[f"{i + 1:02d}:action"] = st
    for i, st in (compensations or {}).items():
        updates[f"{i + 1:02d}:compensate"] = st
    opts = options or Options()
    if concurrent:
        opts = replace(opts, concurrent=True)
    trans = Trans(
        gid="g",
        trans_type="saga",
        status=status,
        steps=tuple(steps),
        branches=branches_for(steps),
        custom_data=custom,
        options=opts,
        create_time=T0,
        retry_count=retry_count,
        next_cron_interval=next_cron_interval,
    )
    return trans.with_branches(updates)


def keys(calls: tuple[Branch, ...]) -> list[str]:
    return [b.key for b in calls]


def plan(trans: Trans, now_ms: int = T0) -> Plan:
    return MACHINE.plan(trans, now_ms, DEFAULTS)


def roll_back(trans: Trans) -> tuple[list[list[str]], Trans]:
    """Drive an aborting saga to its end with every compensation succeeding.

    Returns the rounds of calls the machine asked for and the final transaction.
    """
    rounds: list[list[str]] = []
    for _ in range(20):
        p = plan(trans)
        if p.new_status is not None:
            return rounds, replace(trans, status=p.new_status)
        assert p.calls, f"an aborting saga must either call or finish: {p}"
        rounds.append(keys(p.calls))
        verdict = MACHINE.absorb(trans, {b.key: SUCCESS for b in p.calls}, T0, DEFAULTS)
        assert verdict.new_status is None
        trans = trans.with_branches(dict(verdict.branch_updates))
    raise AssertionError(f"rollback did not finish: {rounds}")


# -- layout and ordering ------------------------------------------------------------


def test_branches_for_lays_out_compensate_then_action_per_step() -> None:
    steps = [{"action": f"a{i}", "compensate": f"c{i}"} for i in range(11)]
    steps[1] = {"action": "a1"}  # no compensation: an empty URL
    layout = branches_for(steps)
    assert [(b.branch_id, b.op) for b in layout[:4]] == [
        ("01", Op.COMPENSATE), ("01", Op.ACTION), ("02", Op.COMPENSATE), ("02", Op.ACTION),
    ]
    assert [b.url for b in layout[:4]] == ["c0", "a0", "", "a1"]
    assert layout[-1].branch_id == "11"
    assert len(layout) == 22
    assert all(b.status is BranchStatus.PREPARED for b in layout)


def test_parse_ordering_reads_concurrency_and_prerequisites() -> None:
    order = parse_ordering('{"concurrent": true, "orders": {"2": [0, 1]}}', False, 3)
    assert order.concurrent
    assert order.before(2) == (0, 1)
    assert order.before(0) == ()
    assert order.after(0, 3) == (2,)
    # The option alone turns concurrency on; without orders nothing waits.
    free = parse_ordering("", True, 3)
    assert free.concurrent
    assert [free.before(i) for i in range(3)] == [(), (), ()]
    # Sequential: each step waits for the one before.
    seq = parse_ordering("", False, 3)
    assert [seq.before(i) for i in range(3)] == [(), (0,), (1,)]
    assert seq.after(1, 3) == (2,)


@pytest.mark.parametrize(
    "custom_data",
    [
        "{not json",
        "[1, 2]",
        '{"orders": [1]}',
        '{"orders": {"1": 0}}',
        '{"orders": {"1": ["0"]}}',
        '{"orders": {"3": [0]}}',  # step out of range
        '{"orders": {"1": [3]}}',  # prerequisite out of range
        '{"orders": {"1": [-1]}}',
        '{"orders": {"1": [1]}}',  # a step cannot wait for itself
    ],
)
def test_parse_ordering_rejects_invalid_custom_data(custom_data: str) -> None:
    with pytest.raises(ValueError, match="custom_data"):
        parse_ordering(custom_data, False, 3)


# -- forward ------------------------------------------------------------------------


def go_forward(trans: Trans) -> tuple[list[list[str]], Plan]:
    """Drive a submitted saga with every action succeeding until it plans a new status.

    Returns the rounds of calls the machine asked for and the final plan.
    """
    seen: list[list[str]] = []
    for _ in range(5):
        p = plan(trans)
        if p.new_status is not None:
            return seen, p
        seen.append(keys(p.calls))
        verdict = MACHINE.absorb(trans, {b.key: SUCCESS for b in p.calls}, T0, DEFAULTS)
        assert dict(verdict.branch_updates) == {b.key: BranchStatus.SUCCEED for b in p.calls}
        assert verdict.new_status is None
        assert verdict.retry is Retry.NONE
        trans = trans.with_branches(dict(verdict.branch_updates))
    return seen, p


def test_sequential_saga_calls_actions_one_at_a_time_in_order() -> None:
    seen, p = go_forward(saga(3))
    assert seen == [["01:action"], ["02:action"], ["03:action"]]
    assert p.new_status is Status.SUCCEED


def test_steps_past_99_keep_their_order() -> None:
    # Branch ids of step 100 on have three digits: ordered as text, "100" came before
    # "11", so step 100 ran after step 10 and its compensation ran in the wrong place.
    done = {i: BranchStatus.SUCCEED for i in range(10)}
    assert keys(plan(saga(120, actions=done)).calls) == ["11:action"]
    done = {i: BranchStatus.SUCCEED for i in range(100)}
    assert keys(plan(saga(120, actions=done)).calls) == ["101:action"]
    aborting = saga(101, status=Status.ABORTING,
                    actions={**{i: BranchStatus.SUCCEED for i in range(100)},
                             100: BranchStatus.FAILED})
    assert keys(plan(aborting).calls) == ["101:compensate"]


def test_steps_with_empty_urls_share_a_round_until_a_real_call() -> None:
    # Empty URLs succeed without a call, so a run of them takes one round; a step with a
    # URL still waits until the step before it has succeeded.
    urls = ["", "", "http://svc/a2", "", ""]
    steps = [{"action": url, "compensate": ""} for url in urls]
    trans = Trans(gid="g", trans_type="saga", status=Status.SUBMITTED, steps=tuple(steps),
                  branches=branches_for(steps), create_time=T0)
    seen, p = go_forward(trans)
    assert seen == [["01:action", "02:action"], ["03:action"], ["04:action", "05:action"]]
    assert p.new_status is Status.SUCCEED


def test_concurrent_saga_runs_steps_whose_prerequisites_succeeded() -> None:
    # Steps 0 and 1 are free, 2 waits for both, 3 waits for 2.
    orders = {"2": [0, 1], "3": [2]}
    assert keys(plan(saga(4, orders=orders)).calls) == ["01:action", "02:action"]
    half = saga(4, orders=orders, actions={0: BranchStatus.SUCCEED})
    assert keys(plan(half).calls) == ["02:action"]
    both = saga(4, orders=orders, actions={0: BranchStatus.SUCCEED, 1: BranchStatus.SUCCEED})
    assert keys(plan(both).calls) == ["03:action"]
    # With the option and no orders, every action runs at once.
    assert keys(plan(saga(3, concurrent=True)).calls) == ["01:action", "02:action", "03:action"]


def test_all_actions_succeeded_means_succeed() -> None:
    done = saga(2, actions={0: BranchStatus.SUCCEED, 1: BranchStatus.SUCCEED})
    p = plan(done)
    assert p.new_status is Status.SUCCEED
    assert p.calls == ()
    # One still open: not yet.
    assert plan(saga(2, actions={0: BranchStatus.SUCCEED})).new_status is None


def test_finished_or_prepared_saga_has_nothing_to_do() -> None:
    for status in (Status.SUCCEED, Status.FAILED, Status.PREPARED):
        assert plan(saga(2, status=status)) == Plan()


# -- failure and abort ----------------------------------------------------------------


def test_action_failure_moves_to_aborting_with_reason() -> None:
    trans = saga(2, actions={0: BranchStatus.SUCCEED})
    verdict = MACHINE.absorb(trans, {"02:action": FAILURE}, T0, DEFAULTS)
    assert dict(verdict.branch_updates) == {"02:action": BranchStatus.FAILED}
    assert verdict.new_status is Status.ABORTING
    assert "02" in verdict.reason
    assert "http://svc/a1" in verdict.reason
    assert "business refused" in verdict.reason
    # A stored failed action (e.g. after a crash between the write and the move)
    # also leads to aborting when planned again.
    failed = trans.with_branches({"02:action": BranchStatus.FAILED})
    p = plan(failed)
    assert p.new_status is Status.ABORTING
    assert p.reason


def test_stored_rollback_reason_is_kept_when_planning_abort() -> None:
    failed = replace(saga(1, actions={0: BranchStatus.FAILED}), rollback_reason="out of stock")
    assert plan(failed).reason == "out of stock"


def test_compensations_run_in_reverse_for_started_actions_only() -> None:
    # 01 and 02 succeeded, 03 failed, 04 was never reachable.
    trans = saga(
        4,
        status=Status.ABORTING,
        actions={0: BranchStatus.SUCCEED, 1: BranchStatus.SUCCEED, 2: BranchStatus.FAILED},
    )
    rounds, final = roll_back(trans)
    assert rounds == [["03:compensate"], ["02:compensate"], ["01:compensate"]]
    assert final.status is Status.FAILED


def test_reachable_but_unanswered_action_is_compensated() -> None:
    # Timed out while 02 was running (no answer recorded): it may have reached the
    # service, so it is compensated; 03 could not have started and is not.
    trans = saga(3, status=Status.ABORTING, actions={0: BranchStatus.SUCCEED})
    rounds, final = roll_back(trans)
    assert rounds == [["02:compensate"], ["01:compensate"]]
    assert final.status is Status.FAILED


def test_concurrent_rollback_follows_reverse_dependencies() -> None:
    # 0 and 1 free, 2 after both, 3 after 2; 3 failed.
    trans = saga(
        4,
        status=Status.ABORTING,
        orders={"2": [0, 1], "3": [2]},
        actions={0: BranchStatus.SUCCEED, 1: BranchStatus.SUCCEED, 2: BranchStatus.SUCCEED,
                 3: BranchStatus.FAILED},
    )
    rounds, final = roll_back(trans)
    assert rounds[:2] == [["04:compensate"], ["03:compensate"]]
    assert sorted(rounds[2]) == ["01:compensate", "02:compensate"]
    assert len(rounds) == 3
    assert final.status is Status.FAILED


def test_concurrent_rollback_skips_steps_behind_the_failure() -> None:
    # 1 waits for 0, which failed; 2 is free and got no answer yet.
    trans = saga(
        3, status=Status.ABORTING, orders={"1": [0]}, actions={0: BranchStatus.FAILED}
    )
    rounds, _final = roll_back(trans)
    assert len(rounds) == 1
    assert sorted(rounds[0]) == ["01:compensate", "03:compensate"]


def test_compensation_waits_for_dependents_to_roll_back() -> None:
    trans = saga(
        2,
        status=Status.ABORTING,
        actions={0: BranchStatus.SUCCEED, 1: BranchStatus.SUCCEED},
    )
    assert keys(plan(trans).calls) == ["02:compensate"]
    # Compensation of 02 answered ONGOING: nothing recorded, and 01 must still wait.
    verdict = MACHINE.absorb(trans, {"02:compensate": ONGOING}, T0, DEFAULTS)
    assert dict(verdict.branch_updates) == {}
    assert verdict.retry is Retry.KEEP
    trans = trans.with_branches(dict(verdict.branch_updates))
    assert keys(plan(trans).calls) == ["02:compensate"]
    rolled = trans.with_branches({"02:compensate": BranchStatus.SUCCEED})
    assert keys(plan(rolled).calls) == ["01:compensate"]


def test_aborting_with_everything_rolled_back_is_failed() -> None:
    trans = saga(
        2,
        status=Status.ABORTING,
        actions={0: BranchStatus.SUCCEED, 1: BranchStatus.FAILED},
        compensations={0: BranchStatus.SUCCEED, 1: BranchStatus.SUCCEED},
    )
    assert plan(trans).new_status is Status.FAILED
    # Nothing ever started: nothing to undo.
    assert plan(saga(2, status=Status.ABORTING, actions={0: BranchStatus.FAILED},
                     compensations={0: BranchStatus.SUCCEED})).new_status is Status.FAILED
    unfinished = trans.with_branches({"01:compensate": BranchStatus.PREPARED})
    assert plan(unfinished).new_status is None


def test_failing_compensation_is_retried_not_failed() -> None:
    trans = saga(1, status=Status.ABORTING, actions={0: BranchStatus.FAILED})
    verdict = MACHINE.absorb(trans, {"01:compensate": FAILURE}, T0, DEFAULTS)
    assert dict(verdict.branch_updates) == {}
    assert verdict.new_status is None
    assert verdict.retry is not Retry.NONE
    assert keys(plan(trans).calls) == ["01:compensate"]


# -- timeouts and retries ------------------------------------------------------------------


def test_timeout_to_fail_aborts_at_the_deadline() -> None:
    trans = saga(2, options=Options(timeout_to_fail=5))
    before = plan(trans, T0 + 4_999)
    assert before.new_status is None
    assert keys(before.calls) == ["01:action"]
    at = plan(trans, T0 + 5_000)
    assert at.new_status is Status.ABORTING
    assert "5" in at.reason
    assert "imeout" in at.reason
    # A saga without the option never times out, whatever the server default.
    assert plan(saga(2), T0 + 10**9).new_status is None


def test_retry_limit_retries_at_once_then_aborts_with_dtms_reason() -> None:
    trans = saga(1, options=Options(retry_limit=2))
    verdicts = []
    for _ in range(3):
        verdict = MACHINE.absorb(trans, {"01:action": ERROR}, T0, DEFAULTS)
        verdicts.append(verdict)
        if verdict.new_status is not None:
            break
        trans = replace(trans, retry_count=int(verdict.fields["retry_count"]))
    assert [v.fields.get("retry_count") for v in verdicts] == ["1", "2", "2"]
    assert [v.new_status for v in verdicts] == [None, None, Status.ABORTING]
    # The exact text dtm writes: clients match on it.
    assert verdicts[-1].reason == "RetryCount is greater than RetryLimit, RetryLimit: 2"
    # Within the limit the retry is due now (same round), not after an interval.
    assert verdicts[0].retry is Retry.NONE
    assert verdicts[0].retry_at_once
    assert MACHINE.plan(trans, T0, DEFAULTS).calls[0].key == "01:action"


def test_retry_limit_counts_each_unanswered_action_of_a_round() -> None:
    trans = saga(2, orders={}, options=Options(retry_limit=3), retry_count=1)
    both = {"01:action": ERROR, "02:action": ONGOING}
    assert MACHINE.absorb(trans, both, T0, DEFAULTS).fields["retry_count"] == "3"
    over = replace(trans, retry_count=2)
    assert MACHINE.absorb(over, both, T0, DEFAULTS).new_status is Status.ABORTING


def test_without_retry_limit_errors_are_not_counted() -> None:
    trans = saga(1, retry_count=50)
    verdict = MACHINE.absorb(trans, {"01:action": ERROR}, T0, DEFAULTS)
    assert verdict.new_status is None
    assert "retry_count" not in verdict.fields
    assert verdict.retry is Retry.BACKOFF


def test_retry_limit_does_not_abandon_a_rollback() -> None:
    trans = saga(
        1, status=Status.ABORTING, actions={0: BranchStatus.FAILED},
        options=Options(retry_limit=1), retry_count=5,
    )
    verdict = MACHINE.absorb(trans, {"01:compensate": ERROR}, T0, DEFAULTS)
    assert verdict.new_status is None
    assert verdict.retry is Retry.BACKOFF
    assert "retry_count" not in verdict.fields


@pytest.mark.parametrize(
    ("outcomes", "retry"),
    [
        ({"01:action": ONGOING}, Retry.KEEP),
        ({"01:action": ERROR}, Retry.BACKOFF),
        ({"01:action": ONGOING, "02:action": ERROR}, Retry.BACKOFF),
        ({"01:action": SUCCESS, "02:action": ONGOING}, Retry.KEEP),
        ({"01:action": SUCCESS, "02:action": SUCCESS}, Retry.NONE),
    ],
)
def test_outcome_kinds_choose_the_retry(outcomes: dict[str, Outcome], retry: Retry) -> None:
    trans = saga(2, concurrent=True)
    verdict = MACHINE.absorb(trans, outcomes, T0, DEFAULTS)
    assert verdict.retry is retry
    assert verdict.new_status is None
    succeeded = {k for k, o in outcomes.items() if o.kind is OutcomeKind.SUCCESS}
    assert dict(verdict.branch_updates) == dict.fromkeys(succeeded, BranchStatus.SUCCEED)


# -- base helpers -----------------------------------------------------------------------


def _t(interval: int = 0, current: int = 0, trans_type: str = "saga",
       timeout: int = 0) -> Trans:
    return Trans(
        gid="g", trans_type=trans_type, status=Status.SUBMITTED, create_time=T0,
        options=Options(retry_interval=interval, timeout_to_fail=timeout),
        next_cron_interval=current,
    )


def test_next_interval_keeps_doubles_resets_and_caps() -> None:
    d = Defaults(retry_interval=10, max_retry_interval=60)
    # No interval stored yet: start from the base (server default or the option).
    assert next_interval(_t(), Retry.KEEP, d) == 10
    assert next_interval(_t(interval=3), Retry.KEEP, d) == 3
    # Ongoing keeps the current interval, error doubles it, success resets it.
    assert next_interval(_t(current=40), Retry.KEEP, d) == 40
    assert next_interval(_t(current=20), Retry.BACKOFF, d) == 40
    assert next_interval(_t(interval=3, current=24), Retry.NONE, d) == 3
    # The first error after creation or a success waits the base; later ones double.
    assert next_interval(_t(), Retry.BACKOFF, d) == 10
    assert next_interval(_t(current=10), Retry.BACKOFF, d) == 20
    # Doubling stops at the server's maximum...
    assert next_interval(_t(current=40), Retry.BACKOFF, d) == 60
    assert next_interval(_t(current=60), Retry.BACKOFF, d) == 60
    # ...unless the transaction's own interval is larger still.
    assert next_interval(_t(interval=100, current=100), Retry.BACKOFF, d) == 100


def test_is_timed_out_uses_now_ms_and_the_mode_default() -> None:
    d = Defaults(timeout_to_fail=35)
    tcc = _t(trans_type="tcc")
    assert not is_timed_out(tcc, T0 + 34_999, d)
    assert is_timed_out(tcc, T0 + 35_000, d)
    # The transaction's option overrides the default.
    assert not is_timed_out(_t(trans_type="tcc", timeout=60), T0 + 59_999, d)
    assert is_timed_out(_t(trans_type="tcc", timeout=60), T0 + 60_000, d)
    # Sagas have no timeout unless they set one.
    assert not is_timed_out(_t(), T0 + 10**10, d)
    assert is_timed_out(_t(timeout=1), T0 + 1_000, d)
