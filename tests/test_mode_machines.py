"""Unit tests of the pure msg, tcc/xa and workflow state machines.

No Redis, no HTTP, no clock: transactions are built as plain values, and the tests play
the engine's part by hand (plan, feed outcomes to absorb, apply the verdict, plan again).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import replace

import orjson
import pytest

from coordinator.machines.base import (
    SUCCESS,
    Defaults,
    Machine,
    Outcome,
    OutcomeKind,
    Retry,
)
from coordinator.machines.msg import BACK_CHECK_KEY, MsgMachine, branches_for, delay_of
from coordinator.machines.tcc import TccMachine, XaMachine
from coordinator.machines.workflow import WorkflowMachine, recovery_call
from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans

DEFAULTS = Defaults(retry_interval=10, max_retry_interval=300, timeout_to_fail=35)
T0 = 1_700_000_000_000  # creation time in ms; the machines never read a clock

FAILURE = Outcome(OutcomeKind.FAILURE, "business refused")
ONGOING = Outcome(OutcomeKind.ONGOING, "not yet")
ERROR = Outcome(OutcomeKind.ERROR, "HTTP 500")


# -- helpers ----------------------------------------------------------------------------


def msg(
    actions: int = 2,
    *,
    status: Status = Status.SUBMITTED,
    query_prepared: str = "http://app/qp",
    custom_data: str = "",
    options: Options | None = None,
    done: tuple[int, ...] = (),
) -> Trans:
    """A msg with `actions` plain steps; `done` lists 0-based steps already succeeded."""
    steps = tuple({"action": f"http://svc/a{i}"} for i in range(actions))
    branches = tuple(
        replace(b, seq=i + 1, status=BranchStatus.SUCCEED if i in done else b.status)
        for i, b in enumerate(branches_for(steps, {}))
    )
    return Trans(
        gid="g-msg", trans_type="msg", status=status, steps=steps, branches=branches,
        query_prepared=query_prepared, custom_data=custom_data,
        options=options or Options(), create_time=T0, update_time=T0,
    )


def phase_two(trans_type: str, ids: list[str], status: Status, **kw: object) -> Trans:
    """A tcc or xa transaction with branches registered in the order of `ids`."""
    back, fwd = (Op.CANCEL, Op.CONFIRM) if trans_type == "tcc" else (Op.ROLLBACK, Op.COMMIT)
    branches: list[Branch] = []
    for bid in ids:
        for op in (back, fwd):
            branches.append(Branch(bid, op, f"http://svc/{op.value}{bid}",
                                   seq=len(branches) + 1))
    return Trans(gid="g-2pc", trans_type=trans_type, status=status, branches=tuple(branches),
                 create_time=T0, update_time=T0, **kw)  # type: ignore[arg-type]


def drive(
    machine: Machine, trans: Trans, now: int, answer: Callable[[Branch], Outcome] | None = None,
    rounds: int = 50,
) -> tuple[Trans, list[list[str]]]:
    """Play the engine until the transaction finishes or waits; the keys called per round."""
    answer = answer or (lambda b: SUCCESS)
    called: list[list[str]] = []
    for _ in range(rounds):
        if trans.status in (Status.SUCCEED, Status.FAILED):
            return trans, called
        plan = machine.plan(trans, now, DEFAULTS)
        if plan.new_status is not None:
            trans = replace(trans, status=plan.new_status,
                            rollback_reason=plan.reason or trans.rollback_reason)
            continue
        if not plan.calls:
            return trans, called
        called.append([b.key for b in plan.calls])
        verdict = machine.absorb(trans, {b.key: answer(b) for b in plan.calls}, now, DEFAULTS)
        trans = trans.with_branches(dict(verdict.branch_updates))
        if verdict.new_status is not None:
            trans = replace(trans, status=verdict.new_status,
                            rollback_reason=verdict.reason or trans.rollback_reason)
    raise AssertionError(f"no end after {rounds} rounds: {called}")


# -- msg: prepared and the back-check ---------------------------------------------------


MSG = MsgMachine()


def test_prepared_msg_waits_until_its_timeout() -> None:
    trans = msg(status=Status.PREPARED, options=Options(timeout_to_fail=5))
    plan = MSG.plan(trans, T0 + 4_999, DEFAULTS)
    assert plan.calls == ()
    assert plan.new_status is None
    assert plan.wake_at_ms == T0 + 5_000


def test_prepared_msg_without_own_timeout_uses_the_default() -> None:
    trans = msg(status=Status.PREPARED)
    assert MSG.plan(trans, T0, DEFAULTS).wake_at_ms == T0 + DEFAULTS.timeout_to_fail * 1000
    assert MSG.plan(trans, T0 + 34_999, DEFAULTS).calls == ()
    assert len(MSG.plan(trans, T0 + 35_000, DEFAULTS).calls) == 1


def test_prepared_msg_past_timeout_asks_query_prepared() -> None:
    trans = msg(status=Status.PREPARED, options=Options(timeout_to_fail=5))
    plan = MSG.plan(trans, T0 + 5_000, DEFAULTS)
    assert plan.new_status is None
    (check,) = plan.calls
    assert (check.branch_id, check.op, check.url) == ("00", Op.MSG, "http://app/qp")
    assert check.key == BACK_CHECK_KEY
    # No body: the caller sends the back-check as a GET.
    assert trans.payload_of(check) == ""


def test_prepared_msg_without_query_prepared_fails_at_timeout() -> None:
    trans = msg(status=Status.PREPARED, query_prepared="", options=Options(timeout_to_fail=5))
    plan = MSG.plan(trans, T0 + 6_000, DEFAULTS)
    assert plan.new_status is Status.FAILED
    assert plan.calls == ()
    assert "query_prepared" in plan.reason


@pytest.mark.parametrize(
    ("outcome", "status", "retry"),
    [
        (SUCCESS, Status.SUBMITTED, Retry.NONE),
        (FAILURE, Status.FAILED, Retry.NONE),
        (ONGOING, None, Retry.KEEP),
        (ERROR, None, Retry.BACKOFF),
    ],
)
def test_back_check_outcomes(outcome: Outcome, status: Status | None, retry: Retry) -> None:
    trans = msg(status=Status.PREPARED, options=Options(timeout_to_fail=1))
    verdict = MSG.absorb(trans, {BACK_CHECK_KEY: outcome}, T0 + 2_000, DEFAULTS)
    assert verdict.new_status is status
    assert verdict.retry is retry
    assert not verdict.branch_updates  # the back-check is no action
    if status is Status.FAILED:
        assert "business refused" in verdict.reason


def test_back_check_success_then_actions_run() -> None:
    trans = msg(3, status=Status.PREPARED, options=Options(timeout_to_fail=1))
    end, called = drive(MSG, trans, T0 + 1_000)
    assert end.status is Status.SUCCEED
    assert called == [["00:msg"], ["01:action"], ["02:action"], ["03:action"]]


def test_back_check_failure_calls_no_action() -> None:
    trans = msg(3, status=Status.PREPARED, options=Options(timeout_to_fail=1))
    end, called = drive(MSG, trans, T0 + 1_000,
                        lambda b: FAILURE if b.op is Op.MSG else SUCCESS)
    assert end.status is Status.FAILED
    assert called == [["00:msg"]]
    assert all(b.status is BranchStatus.PREPARED for b in end.branches)


# -- msg: submitted ---------------------------------------------------------------------


def test_ordered_msg_calls_one_action_at_a_time_in_order() -> None:
    trans = msg(3)
    assert [b.key for b in MSG.plan(trans, T0, DEFAULTS).calls] == ["01:action"]
    assert [b.key for b in MSG.plan(msg(3, done=(0,)), T0, DEFAULTS).calls] == ["02:action"]
    end, called = drive(MSG, trans, T0)
    assert end.status is Status.SUCCEED
    assert called == [["01:action"], ["02:action"], ["03:action"]]


def test_concurrent_msg_calls_every_pending_action_at_once() -> None:
    trans = msg(3, options=Options(concurrent=True), done=(1,))
    assert [b.key for b in MSG.plan(trans, T0, DEFAULTS).calls] == ["01:action", "03:action"]
    end, called = drive(MSG, msg(3, options=Options(concurrent=True)), T0)
    assert end.status is Status.SUCCEED
    assert called == [["01:action", "02:action", "03:action"]]


def test_msg_action_failure_is_retried_never_failed() -> None:
    trans = msg(2)
    verdict = MSG.absorb(trans, {"01:action": FAILURE}, T0, DEFAULTS)
    assert verdict.new_status is None
    assert verdict.retry is Retry.BACKOFF
    assert "01:action" not in verdict.branch_updates
    # Even after many refusals the plan keeps calling the same action.
    answers = iter([FAILURE, FAILURE, ONGOING, SUCCESS, SUCCESS])
    end, called = drive(MSG, trans, T0, lambda b: next(answers))
    assert end.status is Status.SUCCEED
    assert called == [["01:action"]] * 4 + [["02:action"]]


def test_msg_ongoing_keeps_and_error_backs_off() -> None:
    trans = msg(2, options=Options(concurrent=True))
    assert MSG.absorb(trans, {"01:action": ONGOING}, T0, DEFAULTS).retry is Retry.KEEP
    both = MSG.absorb(trans, {"01:action": ONGOING, "02:action": ERROR}, T0, DEFAULTS)
    assert both.retry is Retry.BACKOFF
    mixed = MSG.absorb(trans, {"01:action": SUCCESS, "02:action": ERROR}, T0, DEFAULTS)
    assert dict(mixed.branch_updates) == {"01:action": BranchStatus.SUCCEED}


def test_delay_holds_the_first_call_back() -> None:
    trans = msg(2, custom_data='{"delay":7}')
    early = MSG.plan(trans, T0 + 6_999, DEFAULTS)
    assert early.calls == ()
    assert early.new_status is None
    assert early.wake_at_ms == T0 + 7_000
    assert [b.key for b in MSG.plan(trans, T0 + 7_000, DEFAULTS).calls] == ["01:action"]


@pytest.mark.parametrize(
    ("raw", "delay"), [("", 0), ('{"delay":3}', 3), ('{"other":1}', 0), ('{"delay":0}', 0)]
)
def test_delay_of_reads_custom_data(raw: str, delay: int) -> None:
    assert delay_of(raw) == delay


@pytest.mark.parametrize("raw", ["{", "[1]", '{"delay":-1}', '{"delay":"3"}',
                                 '{"delay":true}', '{"delay":1.5}'])
def test_delay_of_rejects_malformed_values(raw: str) -> None:
    with pytest.raises(ValueError, match="custom_data"):
        delay_of(raw)


def test_msg_in_another_status_does_nothing() -> None:
    for status in (Status.SUCCEED, Status.FAILED):
        plan = MSG.plan(msg(2, status=status), T0 + 10**9, DEFAULTS)
        assert plan.calls == ()
        assert plan.new_status is None


# -- msg: topics ------------------------------------------------------------------------


def test_topic_fans_out_to_each_subscriber() -> None:
    steps = [{"action": "http://svc/first"}, {"action": "topic://orders"},
             {"action": "http://svc/last"}]
    topics = {"orders": ["http://s1/x", "http://s2/y", "http://s3/z"]}
    got = [(b.branch_id, b.op, b.url) for b in branches_for(steps, topics)]
    assert got == [
        ("01", Op.ACTION, "http://svc/first"),
        ("02-01", Op.ACTION, "http://s1/x"),
        ("02-02", Op.ACTION, "http://s2/y"),
        ("02-03", Op.ACTION, "http://s3/z"),
        ("03", Op.ACTION, "http://svc/last"),
    ]


def test_topic_branches_share_their_steps_payload() -> None:
    steps = ({"action": "topic://t"}, {"action": "http://svc/b"})
    branches = branches_for(steps, {"t": ["http://s1", "http://s2"]})
    trans = Trans(gid="g", trans_type="msg", status=Status.SUBMITTED, steps=steps,
                  payloads=('{"p":1}', '{"p":2}'), branches=branches)
    assert [trans.payload_of(b) for b in branches] == ['{"p":1}', '{"p":1}', '{"p":2}']


def test_topic_with_one_subscriber_keeps_the_plain_id() -> None:
    (branch,) = branches_for([{"action": "topic://solo"}], {"solo": ["http://only"]})
    assert (branch.branch_id, branch.url) == ("01", "http://only")


@pytest.mark.parametrize("topics", [{}, {"t": []}])
def test_topic_without_subscribers_is_refused(topics: Mapping[str, list[str]]) -> None:
    with pytest.raises(KeyError) as info:
        branches_for([{"action": "http://svc/a"}, {"action": "topic://t"}], topics)
    assert info.value.args[0] == "t"


def test_topic_fan_out_is_concurrent_when_asked() -> None:
    steps = ({"action": "topic://t"},)
    branches = branches_for(steps, {"t": ["http://s1", "http://s2"]})
    trans = Trans(gid="g", trans_type="msg", status=Status.SUBMITTED, steps=steps,
                  branches=branches, options=Options(concurrent=True), create_time=T0)
    end, called = drive(MSG, trans, T0)
    assert called == [["01-01:action", "01-02:action"]]
    assert end.status is Status.SUCCEED


# -- tcc and xa -------------------------------------------------------------------------


TCC = TccMachine()
XA = XaMachine()


@pytest.mark.parametrize("machine", [TCC, XA], ids=["tcc", "xa"])
def test_prepared_phase_two_waits_then_aborts_at_timeout(machine: Machine) -> None:
    kind = "tcc" if machine is TCC else "xa"
    trans = phase_two(kind, ["01"], Status.PREPARED, options=Options(timeout_to_fail=3))
    before = machine.plan(trans, T0 + 2_999, DEFAULTS)
    assert before.new_status is None
    assert before.calls == ()
    assert before.wake_at_ms == T0 + 3_000
    after = machine.plan(trans, T0 + 3_000, DEFAULTS)
    assert after.new_status is Status.ABORTING
    assert "timeout" in after.reason.lower()
    assert "3" in after.reason


def test_prepared_tcc_uses_the_default_timeout() -> None:
    trans = phase_two("tcc", ["01"], Status.PREPARED)
    assert TCC.plan(trans, T0 + 34_999, DEFAULTS).new_status is None
    assert TCC.plan(trans, T0 + 35_000, DEFAULTS).new_status is Status.ABORTING


def test_tcc_cancels_in_reverse_order_of_registration() -> None:
    # Registration order 01, 0101 (nested in 01), 02: sorted ids would give another order.
    trans = phase_two("tcc", ["01", "0101", "02"], Status.ABORTING)
    end, called = drive(TCC, trans, T0)
    assert called == [["02:cancel"], ["0101:cancel"], ["01:cancel"]]
    assert end.status is Status.FAILED
    assert all(b.status is BranchStatus.PREPARED for b in end.branches if b.op is Op.CONFIRM)


def test_tcc_confirms_every_branch_one_at_a_time() -> None:
    trans = phase_two("tcc", ["01", "02", "03"], Status.SUBMITTED)
    end, called = drive(TCC, trans, T0)
    assert all(len(c) == 1 for c in called)
    assert sorted(k for (k,) in called) == ["01:confirm", "02:confirm", "03:confirm"]
    assert end.status is Status.SUCCEED
    assert all(b.status is BranchStatus.PREPARED for b in end.branches if b.op is Op.CANCEL)


def test_timed_out_tcc_goes_on_to_cancel() -> None:
    trans = phase_two("tcc", ["01", "02"], Status.PREPARED, options=Options(timeout_to_fail=1))
    end, called = drive(TCC, trans, T0 + 1_000)
    assert called == [["02:cancel"], ["01:cancel"]]
    assert end.status is Status.FAILED
    assert "timeout" in end.rollback_reason.lower()


@pytest.mark.parametrize("machine", [TCC, XA], ids=["tcc", "xa"])
def test_phase_two_never_fails_a_branch(machine: Machine) -> None:
    kind = "tcc" if machine is TCC else "xa"
    trans = phase_two(kind, ["01"], Status.SUBMITTED)
    key = trans.branches[1].key
    for outcome, retry in ((FAILURE, Retry.BACKOFF), (ERROR, Retry.BACKOFF),
                           (ONGOING, Retry.KEEP)):
        verdict = machine.absorb(trans, {key: outcome}, T0, DEFAULTS)
        assert verdict.new_status is None
        assert not verdict.branch_updates
        assert verdict.retry is retry
    answers = iter([FAILURE, ERROR, ONGOING, SUCCESS])
    end, called = drive(machine, trans, T0, lambda b: next(answers))
    assert called == [[key]] * 4
    assert end.status is Status.SUCCEED


def test_xa_commits_in_registration_order() -> None:
    trans = phase_two("xa", ["02", "01", "03"], Status.SUBMITTED)
    end, called = drive(XA, trans, T0)
    assert called == [["02:commit"], ["01:commit"], ["03:commit"]]
    assert end.status is Status.SUCCEED


def test_xa_rolls_back_in_registration_order_like_dtm() -> None:
    trans = phase_two("xa", ["02", "01", "03"], Status.ABORTING)
    end, called = drive(XA, trans, T0)
    assert called == [["02:rollback"], ["01:rollback"], ["03:rollback"]]
    assert end.status is Status.FAILED


def test_phase_two_without_branches_finishes_at_once() -> None:
    assert TCC.plan(phase_two("tcc", [], Status.SUBMITTED), T0, DEFAULTS).new_status \
        is Status.SUCCEED
    assert XA.plan(phase_two("xa", [], Status.ABORTING), T0, DEFAULTS).new_status \
        is Status.FAILED


# -- workflow ---------------------------------------------------------------------------


WF = WorkflowMachine()


def workflow(custom: object = None, **kw: object) -> Trans:
    custom_data = "" if custom is None else orjson.dumps(custom).decode()
    fields: dict[str, object] = {"query_prepared": "http://app/wf-recover",
                                 "options": Options(timeout_to_fail=2)}
    fields.update(kw)
    return Trans(gid="g-wf", trans_type="workflow", status=Status.PREPARED,
                 custom_data=custom_data, create_time=T0, update_time=T0,
                 **fields)  # type: ignore[arg-type]


def test_workflow_recovery_call_names_the_workflow_and_decodes_its_data() -> None:
    data = b'{"order":42,"amount":"9.50"}'
    trans = workflow({"name": "wf", "data": base64.b64encode(data).decode()})
    call = recovery_call(trans)
    assert (call.branch_id, call.url) == ("00", "http://app/wf-recover")
    assert call.op_name == "wf"  # the wire op is the workflow's name
    assert trans.payload_of(call) == data.decode()


def test_workflow_waits_until_timeout_then_asks_the_client() -> None:
    trans = workflow({"name": "pay", "data": base64.b64encode(b'{"x":1}').decode()})
    before = WF.plan(trans, T0 + 1_999, DEFAULTS)
    assert before.calls == ()
    assert before.wake_at_ms == T0 + 2_000
    (call,) = WF.plan(trans, T0 + 2_000, DEFAULTS).calls
    assert (call.op_name, call.data) == ("pay", '{"x":1}')


@pytest.mark.parametrize("custom", [None, {"name": "w", "data": "%%not base64%%"}, [1, 2]])
def test_workflow_recovery_with_unreadable_data_sends_an_empty_object(custom: object) -> None:
    call = recovery_call(workflow(custom))
    assert call.data == "{}"


def test_workflow_without_query_prepared_is_not_called() -> None:
    plan = WF.plan(workflow({"name": "w"}, query_prepared=""), T0 + 10**6, DEFAULTS)
    assert plan.calls == ()
    assert plan.new_status is None


def test_finished_workflow_is_left_alone() -> None:
    for status in (Status.SUCCEED, Status.FAILED):
        plan = WF.plan(replace(workflow({"name": "w"}), status=status), T0 + 10**6, DEFAULTS)
        assert plan == type(plan)()


@pytest.mark.parametrize(
    ("outcome", "retry"),
    [(SUCCESS, Retry.KEEP), (ONGOING, Retry.KEEP), (ERROR, Retry.BACKOFF),
     (FAILURE, Retry.BACKOFF)],
)
def test_workflow_absorb_never_finishes_it(outcome: Outcome, retry: Retry) -> None:
    trans = workflow({"name": "w"})
    verdict = WF.absorb(trans, {"00:msg": outcome}, T0 + 10**6, DEFAULTS)
    assert verdict.new_status is None
    assert not verdict.branch_updates
    assert verdict.retry is retry
