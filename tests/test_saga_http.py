"""SAGA mode and the dtm HTTP API, end to end.

Every test runs a real `coordinator serve` process against the real Redis, with
participants listening on loopback sockets that record each call they receive (path,
method, query, headers, body, and when it started and ended). Assertions are about what
the participants observed and what the API answers, never about internals.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import string
import time
from typing import Any

import aiohttp
import orjson

from coordinator import __version__
from coordinator.keys import partition_of
from tests.cluster_support import CLUSTER_TOO
from tests.support import (
    ERROR,
    FAIL,
    FAIL_200,
    OK,
    ONGOING,
    Api,
    Call,
    CoordinatorProcess,
    Participant,
    wait_for,
)

ONGOING_200 = (200, '{"dtm_result":"ONGOING"}')


# -- helpers ----------------------------------------------------------------------------


def step(p: Participant, name: str) -> dict[str, str]:
    """Step `name`: action /a<name>, compensation /c<name>."""
    return {"action": p.url(f"a{name}"), "compensate": p.url(f"c{name}")}


def saga(gid: str, steps: list[dict[str, str]], payloads: list[str] | None = None,
         **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"gid": gid, "trans_type": "saga", "steps": steps}
    if payloads is not None:
        body["payloads"] = payloads
    body.update(options)
    return body


def calls_of(p: Participant, gid: str) -> list[Call]:
    return [c for c in p.calls if c.query.get("gid") == gid]


def paths(calls: list[Call]) -> list[str]:
    return [c.path for c in calls]


def gaps(calls: list[Call]) -> list[float]:
    """Seconds between the starts of consecutive calls."""
    return [b.started - a.started for a, b in itertools.pairwise(calls)]


def assert_between(value: float, lo: float, hi: float, what: str) -> None:
    assert lo <= value <= hi, f"{what}: {value:.2f}s is not within [{lo}, {hi}]"


async def quiet_for(seconds: float) -> None:
    await asyncio.sleep(seconds)


# -- success and rollback ---------------------------------------------------------------


@CLUSTER_TOO
async def test_saga_success_calls_actions_in_order_with_dtm_protocol(
    api: Api, participant: Participant
) -> None:
    gid = "ok-order"
    body = saga(gid, [step(participant, "1"), step(participant, "2"), step(participant, "3")],
                ['{"amount":30}', "", '{"n":3}'], wait_result=True)
    status, reply = await api.post("submit", body)
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a2", "/a3"]
    # Strictly sequential: each action starts after the previous one answered.
    for before, after in itertools.pairwise(calls):
        assert after.started >= before.ended
    # A body means POST with that body; an empty payload means GET without a body.
    assert [(c.method, c.body) for c in calls] == [
        ("POST", '{"amount":30}'), ("GET", ""), ("POST", '{"n":3}')
    ]
    for c, bid in zip(calls, ["01", "02", "03"], strict=True):
        assert c.query == {"gid": gid, "trans_type": "saga", "branch_id": bid, "op": "action"}
        assert c.headers.get("Content-Type", "").startswith("application/json")
    assert await api.status(gid) == "succeed"
    # Nothing is called again once the saga succeeded.
    await quiet_for(1.2)
    assert len(calls_of(participant, gid)) == 3


@CLUSTER_TOO
async def test_saga_rollback_compensates_in_reverse_including_failed_step(
    api: Api, participant: Participant
) -> None:
    gid = "rb-reverse"
    participant.plan("a3", FAIL)
    payloads = ['{"s":1}', '{"s":2}', '{"s":3}']
    body = saga(gid, [step(participant, str(i)) for i in (1, 2, 3)], payloads,
                wait_result=True)
    status, reply = await api.post("submit", body)
    assert status == 409
    assert reply["dtm_result"] == "FAILURE"
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a2", "/a3", "/c3", "/c2", "/c1"]
    for before, after in itertools.pairwise(calls):
        assert after.started >= before.ended
    comps = calls[3:]
    assert [(c.query["branch_id"], c.query["op"]) for c in comps] == [
        ("03", "compensate"), ("02", "compensate"), ("01", "compensate")
    ]
    # A compensation receives its step's payload, like the action did.
    assert [c.body for c in comps] == payloads[::-1]
    assert all(c.method == "POST" for c in comps)

    q = await api.query(gid)
    trans = q["transaction"]
    assert trans["status"] == "failed"
    reason = trans["rollback_reason"]
    assert "03" in reason
    assert participant.url("a3") in reason
    assert "business refused" in reason  # the participant's own message is kept
    assert reply["message"] == reason
    statuses = {(b["branch_id"], b["op"]): b["status"] for b in q["branches"]}
    assert statuses == {
        ("01", "compensate"): "succeed", ("01", "action"): "succeed",
        ("02", "compensate"): "succeed", ("02", "action"): "succeed",
        ("03", "compensate"): "succeed", ("03", "action"): "failed",
    }
    await quiet_for(1.2)
    assert len(calls_of(participant, gid)) == 6


async def test_failure_in_a_200_body_counts_as_failure(
    api: Api, participant: Participant
) -> None:
    gid = "fail-200"
    participant.plan("a2", FAIL_200)
    status, reply = await api.post(
        "submit", saga(gid, [step(participant, "1"), step(participant, "2")], wait_result=True)
    )
    assert status == 409, reply
    assert reply["dtm_result"] == "FAILURE"
    assert paths(calls_of(participant, gid)) == ["/a1", "/a2", "/c2", "/c1"]
    assert await api.status(gid) == "failed"


# -- retries ----------------------------------------------------------------------------


async def test_ongoing_is_retried_at_the_same_interval(
    api: Api, participant: Participant
) -> None:
    gid = "ongoing"
    participant.plan("a1", ONGOING, ONGOING_200, ONGOING, OK)
    status, _ = await api.post(
        "submit", saga(gid, [step(participant, "1"), step(participant, "2")], retry_interval=1)
    )
    assert status == 200
    await api.wait_status(gid, "succeed", timeout=15)
    calls = calls_of(participant, gid)
    # ONGOING in a 200 body is ongoing too: it took exactly four attempts.
    assert paths(calls) == ["/a1"] * 4 + ["/a2"]
    assert [c.status for c in calls[:4]] == [425, 200, 425, 200]
    for i, gap in enumerate(gaps(calls[:4])):
        # Kept at retry_interval (1 s); a doubling interval would give 2 s, 4 s.
        assert_between(gap, 0.7, 1.6, f"ongoing gap {i}")


async def test_errors_back_off_doubling_and_success_resets(
    api: Api, participant: Participant
) -> None:
    gid = "backoff"
    participant.plan("a1", ERROR, ERROR, ERROR, OK)
    participant.plan("a2", ERROR, OK)
    status, _ = await api.post(
        "submit", saga(gid, [step(participant, "1"), step(participant, "2")], retry_interval=1)
    )
    assert status == 200
    await api.wait_status(gid, "succeed", timeout=25)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1"] * 4 + ["/a2"] * 2
    g1, g2, g3 = gaps(calls[:4])
    assert_between(g1, 0.7, 1.7, "first retry after an error")
    assert_between(g2, 1.6, 3.0, "second retry")
    assert_between(g3, 3.3, 5.5, "third retry")
    assert g2 > g1 * 1.4, (g1, g2, g3)
    assert g3 > g2 * 1.4, (g1, g2, g3)
    # a1's success reset the interval: a2's first error waits 1 s again, not 8 s.
    assert_between(calls[5].started - calls[4].started, 0.7, 1.7, "retry after a reset")


async def test_timed_out_call_is_an_error_retried_with_back_off(api: Api) -> None:
    gid = "slow"
    slow = await Participant(delay=2.0).start()
    try:
        body = saga(gid, [step(slow, "1")], request_timeout=1, retry_interval=1)
        status, _ = await api.post("submit", body)
        assert status == 200
        await wait_for(lambda: len(calls_of(slow, gid)) >= 2, 10, what="a second attempt")
        slow.delay = 0.0  # the third attempt answers in time
        await api.wait_status(gid, "succeed", timeout=15)
        calls = calls_of(slow, gid)
        assert paths(calls) == ["/a1"] * 3
        # Each timed-out attempt took request_timeout (1 s), then the wait doubled.
        wait1, wait2 = (g - 1.0 for g in gaps(calls))
        assert_between(wait1, 0.7, 1.7, "wait after the first timeout")
        assert_between(wait2, 1.6, 3.0, "wait after the second timeout")
    finally:
        await slow.stop()


async def test_retry_limit_exhausted_rolls_back(api: Api, participant: Participant) -> None:
    gid = "retry-limit"
    participant.plan("a2", ERROR)
    body = saga(gid, [step(participant, "1"), step(participant, "2")],
                retry_interval=30, retry_limit=2, wait_result=True)
    started = time.monotonic()
    status, reply = await api.post("submit", body)
    # One attempt plus retry_limit retries at once (not retry_interval apart), then
    # compensation in reverse order, all within the wait_result request.
    assert status == 409, reply
    assert time.monotonic() - started < 5
    assert reply["message"] == "RetryCount is greater than RetryLimit, RetryLimit: 2"
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a2", "/a2", "/a2", "/c2", "/c1"]
    trans = (await api.query(gid))["transaction"]
    assert trans["status"] == "failed"
    assert trans["rollback_reason"] == "RetryCount is greater than RetryLimit, RetryLimit: 2"
    await quiet_for(1.2)
    assert len(calls_of(participant, gid)) == 6


async def test_retry_within_the_limit_answers_wait_result_with_success(
    api: Api, participant: Participant
) -> None:
    gid = "retry-limit-ok"
    participant.plan("a1", ERROR, ONGOING, OK)
    body = saga(gid, [step(participant, "1")], retry_interval=30, retry_limit=3,
                wait_result=True)
    status, reply = await api.post("submit", body)
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    assert paths(calls_of(participant, gid)) == ["/a1"] * 3
    trans = (await api.query(gid))["transaction"]
    assert (trans["status"], trans["retry_count"]) == ("succeed", 2)


async def test_retries_at_once_stop_after_one_rounds_time_budget(
    api: Api, participant: Participant
) -> None:
    # A huge retry_limit on a branch that errs at once must not spin a worker: like
    # dtm, retries run at once for request_timeout + 2 s, then wait the retry interval.
    gid = "retry-burst"
    participant.plan("a1", ERROR)
    status, _ = await api.post("submit", saga(
        gid, [step(participant, "1")], retry_interval=30, retry_limit=1_000_000,
        request_timeout=1))
    assert status == 200

    async def released() -> bool:
        trans = (await api.query(gid))["transaction"]
        return "owner" not in trans and bool(trans.get("next_cron_interval"))

    await wait_for(released, 10, what="the burst to end")
    calls = calls_of(participant, gid)
    assert_between(calls[-1].started - calls[0].started, 2.5, 4.5, "the burst")
    await quiet_for(1.0)
    assert len(calls_of(participant, gid)) == len(calls)
    trans = (await api.query(gid))["transaction"]
    assert trans["status"] == "submitted"
    # Every failed call was granted a retry; the last one is the call after the wait.
    assert trans["retry_count"] == len(calls)


async def test_timeout_to_fail_aborts_a_saga_stuck_ongoing(
    api: Api, participant: Participant
) -> None:
    gid = "timeout-to-fail"
    participant.plan("a2", ONGOING)
    body = saga(gid, [step(participant, "1"), step(participant, "2")],
                retry_interval=1, timeout_to_fail=2)
    status, _ = await api.post("submit", body)
    assert status == 200
    await api.wait_status(gid, "aborting", "failed", timeout=10)
    await api.wait_status(gid, "failed", timeout=10)
    calls = calls_of(participant, gid)
    names = paths(calls)
    assert names[0] == "/a1"
    first_c = names.index("/c2")
    assert set(names[1:first_c]) == {"/a2"}, names
    assert first_c >= 3, names  # a2 was retried while it answered ONGOING
    # The ongoing step counts as started, so it is compensated too, before step 1.
    assert names[first_c:] == ["/c2", "/c1"]
    assert_between(calls[first_c].started - calls[0].started, 1.5, 4.0, "abort after 2 s")
    reason = (await api.query(gid))["transaction"]["rollback_reason"]
    assert "timeout" in reason.lower()
    await quiet_for(1.2)
    assert paths(calls_of(participant, gid)) == names


# -- concurrent sagas -------------------------------------------------------------------


def overlap(a: Call, b: Call) -> bool:
    return a.started < b.ended and b.started < a.ended


async def test_concurrent_saga_honours_orders(api: Api, participant: Participant) -> None:
    participant.delay = 0.4
    custom = '{"concurrent":true,"orders":{"2":[0,1]}}'
    steps = [step(participant, str(i)) for i in range(3)]
    ok_gid, rb_gid, early_gid = "conc-ok", "conc-rb", "conc-early"
    participant.plan_for(rb_gid, "a2", FAIL)
    participant.plan_for(early_gid, "a0", FAIL)
    replies = await asyncio.gather(
        *(api.post("submit", saga(g, steps, custom_data=custom, wait_result=True))
          for g in (ok_gid, rb_gid, early_gid))
    )
    assert [status for status, _ in replies] == [200, 409, 409], replies

    # Success: steps 0 and 1 run at the same time, step 2 only after both succeeded.
    by_path = {c.path: c for c in calls_of(participant, ok_gid)}
    assert sorted(by_path) == ["/a0", "/a1", "/a2"]
    assert len(calls_of(participant, ok_gid)) == 3
    a0, a1, a2 = by_path["/a0"], by_path["/a1"], by_path["/a2"]
    assert overlap(a0, a1), "steps 0 and 1 should run concurrently"
    assert a2.started >= max(a0.ended, a1.ended)

    # Rollback: step 2 depends on 0 and 1, so it is compensated first; then 0 and 1.
    calls = calls_of(participant, rb_gid)
    by_path = {c.path: c for c in calls}
    assert sorted(by_path) == ["/a0", "/a1", "/a2", "/c0", "/c1", "/c2"]
    assert len(calls) == 6
    c0, c1, c2 = by_path["/c0"], by_path["/c1"], by_path["/c2"]
    assert c2.started >= by_path["/a2"].ended
    assert c0.started >= c2.ended
    assert c1.started >= c2.ended
    assert overlap(c0, c1)

    # Step 0 fails while step 1 runs: step 2 never starts, so it is not compensated.
    calls = calls_of(participant, early_gid)
    assert sorted(paths(calls)) == ["/a0", "/a1", "/c0", "/c1"]
    assert await api.status(early_gid) == "failed"


# -- options and API operations ---------------------------------------------------------


async def test_branch_headers_sent_on_every_call_including_retries(
    api: Api, participant: Participant
) -> None:
    gid = "headers"
    participant.plan("a1", ERROR, OK)
    participant.plan("c1", ONGOING, OK)
    participant.plan("a2", FAIL)
    body = saga(gid, [step(participant, "1"), step(participant, "2")], ["{}", ""],
                retry_interval=1, branch_headers={"X-Tenant": "t-42", "Authorization": "B x"})
    status, _ = await api.post("submit", body)
    assert status == 200
    await api.wait_status(gid, "failed", timeout=15)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a1", "/a2", "/c2", "/c1", "/c1"]
    for c in calls:
        assert c.headers.get("X-Tenant") == "t-42", c
        assert c.headers.get("Authorization") == "B x", c
        assert c.headers.get("Content-Type", "").startswith("application/json")


async def test_resubmitting_a_finished_transaction_is_409(
    api: Api, participant: Participant
) -> None:
    participant.plan_for("re-failed", "a1", FAIL)
    counts: dict[str, tuple[int, str]] = {}
    for gid, final in (("re-ok", "succeed"), ("re-failed", "failed")):
        body = saga(gid, [step(participant, "1")], wait_result=True)
        await api.post("submit", body)
        assert await api.status(gid) == final
        before = len(calls_of(participant, gid))
        # Without wait_result dtm refuses it; with wait_result the identical resend
        # reports the outcome like the first submit (see test_resubmit.py).
        status, reply = await api.post("submit", {**body, "wait_result": False})
        assert status == 409, reply
        assert reply["dtm_result"] == "FAILURE"
        assert final in reply["message"]
        # prepare on a finished transaction is refused too.
        status, reply = await api.post("prepare", body)
        assert status == 409, reply
        counts[gid] = (before, final)
    await quiet_for(1.2)  # longer than the retry interval: nothing runs again
    for gid, (before, final) in counts.items():
        assert len(calls_of(participant, gid)) == before
        assert await api.status(gid) == final


async def test_force_stop(api: Api, participant: Participant) -> None:
    gid = "force-stop"
    participant.plan("a1", ONGOING)
    status, _ = await api.post(
        "submit", saga(gid, [step(participant, "1")], retry_interval=1)
    )
    assert status == 200
    await wait_for(lambda: any(c.ended for c in calls_of(participant, gid)), 5,
                   what="a first attempt")
    await asyncio.sleep(0.2)  # the worker has released it and waits for the retry
    status, reply = await api.post("forceStop", {"gid": gid})
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    stopped_at = time.monotonic()
    trans = (await api.query(gid))["transaction"]
    assert trans["status"] == "failed"
    assert trans["rollback_reason"]
    await quiet_for(2.5)  # more than two retry intervals
    late = [c for c in calls_of(participant, gid) if c.started > stopped_at]
    assert late == []
    assert await api.status(gid) == "failed"

    # A finished transaction cannot be force-stopped.
    status, reply = await api.post("forceStop", {"gid": gid})
    assert status == 409, reply
    assert reply["dtm_result"] == "FAILURE"
    done = "force-stop-done"
    await api.post("submit", saga(done, [step(participant, "2")], wait_result=True))
    status, reply = await api.post("forceStop", {"gid": done})
    assert status == 409, reply
    assert await api.status(done) == "succeed"


async def test_reset_next_cron_time_brings_a_retry_forward(
    api: Api, participant: Participant
) -> None:
    gid = "reset-cron"
    participant.plan("a1", ERROR, OK)
    status, _ = await api.post(
        "submit", saga(gid, [step(participant, "1")], retry_interval=30)
    )
    assert status == 200

    async def released() -> bool:
        trans = (await api.query(gid))["transaction"]
        return "owner" not in trans and bool(trans.get("next_cron_interval"))

    await wait_for(released, 5, what="the worker to schedule the retry")
    assert len(calls_of(participant, gid)) == 1
    status, reply = await api.post("resetNextCronTime", {"gid": gid})
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    reset_at = time.monotonic()
    await api.wait_status(gid, "succeed", timeout=5)
    calls = calls_of(participant, gid)
    assert len(calls) == 2
    assert calls[1].started - reset_at < 3.0
    # A finished transaction has nothing to bring forward: dtm answers SUCCESS.
    status, reply = await api.post("resetNextCronTime", {"gid": gid})
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    status, _ = await api.post("resetNextCronTime", {"gid": "reset-cron-unknown"})
    assert status == 404


async def test_empty_urls_succeed_without_a_call_and_old_data_form(
    api: Api, participant: Participant
) -> None:
    empty = {"action": "", "compensate": ""}
    status, _ = await api.post("submit", saga(
        "empty-ok", [empty, step(participant, "2"), empty], ["{}", "{}", "{}"],
        wait_result=True))
    assert status == 200
    assert paths(calls_of(participant, "empty-ok")) == ["/a2"]
    assert await api.status("empty-ok") == "succeed"

    participant.plan_for("empty-rb", "a2", FAIL)
    status, _ = await api.post("submit", saga(
        "empty-rb", [empty, step(participant, "2")], wait_result=True))
    assert status == 409
    assert paths(calls_of(participant, "empty-rb")) == ["/a2", "/c2"]
    assert await api.status("empty-rb") == "failed"

    # The old form: each step carries its body as "data" instead of payloads.
    participant.plan_for("old-form", "a2", FAIL)
    old_steps = [dict(step(participant, "1"), data='{"x":1}'),
                 dict(step(participant, "2"), data='{"x":2}')]
    status, _ = await api.post("submit", saga("old-form", old_steps, wait_result=True))
    assert status == 409
    calls = calls_of(participant, "old-form")
    assert [(c.path, c.method, c.body) for c in calls] == [
        ("/a1", "POST", '{"x":1}'), ("/a2", "POST", '{"x":2}'),
        ("/c2", "POST", '{"x":2}'), ("/c1", "POST", '{"x":1}'),
    ]
    q = await api.query("old-form")
    assert q["transaction"]["payloads"] == ['{"x":1}', '{"x":2}']


async def test_query_branch_layout(api: Api, participant: Participant) -> None:
    gid = "query-layout"
    payloads = ['{"amount":30}', "", '{"name":"é"}']
    steps = [step(participant, "1"), step(participant, "2"), step(participant, "3")]
    status, _ = await api.post("submit", saga(gid, steps, payloads, wait_result=True))
    assert status == 200
    q = await api.query(gid)
    trans = q["transaction"]
    assert trans["gid"] == gid
    assert trans["trans_type"] == "saga"
    assert trans["status"] == "succeed"
    assert trans["steps"] == steps
    assert trans["payloads"] == payloads
    assert trans["create_time"]
    assert trans["finish_time"]
    branches = q["branches"]
    assert [(b["branch_id"], b["op"]) for b in branches] == [
        ("01", "compensate"), ("01", "action"),
        ("02", "compensate"), ("02", "action"),
        ("03", "compensate"), ("03", "action"),
    ]
    for b in branches:
        i = int(b["branch_id"]) - 1
        assert b["gid"] == gid
        assert b["url"] == steps[i][b["op"]]
        assert b["status"] == ("succeed" if b["op"] == "action" else "prepared")
        expected = base64.b64encode(payloads[i].encode()).decode()
        assert b.get("bin_data", "") == expected
        if b["op"] == "action":
            assert base64.b64decode(b.get("bin_data", "")).decode() == payloads[i]

    assert await api.query("no-such-gid") == {"transaction": None, "branches": []}
    status, reply = await api.get("query")
    assert status == 400, reply
    assert reply.get("field") == "gid", reply


# -- listing ----------------------------------------------------------------------------


async def _walk(api: Api, limit: int, **filters: str) -> tuple[list[dict[str, Any]], int]:
    seen: list[dict[str, Any]] = []
    position = ""
    for pages in itertools.count(1):
        if pages > 200:
            break
        status, reply = await api.get("all", limit=limit, position=position, **filters)
        assert status == 200, reply
        page = reply["transactions"]
        assert len(page) <= limit
        seen.extend(page)
        position = reply["next_position"]
        if not position:
            return seen, pages
        assert len(page) == limit, "a page short of the limit must be the last one"
    raise AssertionError("the walk did not end")


@CLUSTER_TOO
async def test_all_pages_without_loss_or_duplicates(
    api: Api, participant: Participant
) -> None:
    participant.plan("refuse", FAIL)
    ok_step = {"action": "", "compensate": ""}
    fail_step = {"action": participant.url("refuse"), "compensate": ""}

    async def submit(gid: str, steps: list[dict[str, str]]) -> None:
        status, reply = await api.post("submit", saga(gid, steps))
        assert status == 200, reply

    async def prepare_msg(gid: str) -> None:
        body = {"gid": gid, "trans_type": "msg", "steps": [{"action": participant.url("m")}],
                "payloads": ["{}"], "query_prepared": participant.url("qp")}
        status, reply = await api.post("prepare", body)
        assert status == 200, reply

    ok = ["list-first"] + [f"list-ok-{i:03d}" for i in range(98)] + ["list-last"]
    failing = [f"list-fail-{i:02d}" for i in range(10)]
    msgs = [f"list-msg-{i:02d}" for i in range(10)]
    everything = ok + failing + msgs
    assert len(everything) == 120
    assert len({partition_of(g, 16) for g in everything}) >= 12  # spread over partitions

    await submit("list-first", [ok_step])
    await asyncio.sleep(0.02)
    await asyncio.gather(
        *(submit(g, [ok_step]) for g in ok[1:-1]),
        *(submit(g, [fail_step]) for g in failing),
        *(prepare_msg(g) for g in msgs),
    )
    await asyncio.sleep(0.02)
    await submit("list-last", [ok_step])

    async def settled() -> bool:
        statuses = [await api.status(g) for g in ok + failing]
        return all(s in ("succeed", "failed") for s in statuses)

    await wait_for(settled, 15, 0.2, "every saga to finish")

    listed, pages = await _walk(api, 7)
    gids = [t["gid"] for t in listed]
    assert len(gids) == len(set(gids)), "a transaction was listed twice"
    assert set(gids) == set(everything)
    assert pages >= 18
    # Newest first: (create_time, gid) descending; the last one created comes first.
    order = [(t["create_time"], t["gid"]) for t in listed]
    assert order == sorted(order, reverse=True)
    assert gids[0] == "list-last"
    assert gids[-1] == "list-first"

    failed, _ = await _walk(api, 7, status="failed")
    assert sorted(t["gid"] for t in failed) == sorted(failing)
    assert all(t["status"] == "failed" for t in failed)
    msg, _ = await _walk(api, 7, transType="msg")
    assert sorted(t["gid"] for t in msg) == sorted(msgs)
    both, _ = await _walk(api, 7, status="succeed", transType="saga")
    assert sorted(t["gid"] for t in both) == sorted(ok)
    none, _ = await _walk(api, 7, status="succeed", transType="msg")
    assert none == []

    status, reply = await api.get("all", gid="list-first")
    assert status == 200
    assert [t["gid"] for t in reply["transactions"]] == ["list-first"]


# -- bad input and the small routes -----------------------------------------------------

STEP = {"action": "http://127.0.0.1:9/a", "compensate": "http://127.0.0.1:9/c"}


def _bad(gid_: str, **changes: Any) -> dict[str, Any]:
    """A valid saga body with some fields changed (`...` removes a field)."""
    body: dict[str, Any] = {"gid": gid_, "trans_type": "saga", "steps": [STEP],
                            "payloads": ["{}"]}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


# (label, route, raw body, expected status, expected field or None, gid to check or None)
BAD_INPUT: list[tuple[str, str, bytes, int, str | None, str | None]] = [
    ("malformed JSON", "submit", b'{"gid": "bad-json", "trans_type": "saga",', 400, None,
     "bad-json"),
    ("not an object", "submit", b'["bad-list"]', 400, None, None),
    ("empty body", "submit", b"", 400, None, None),
    ("missing gid", "submit", orjson.dumps(_bad("x", gid=...)), 400, "gid", None),
    ("gid not a string", "submit", orjson.dumps(_bad("x", gid=12)), 400, "gid", None),
    ("gid with spaces", "submit", orjson.dumps(_bad("bad gid")), 400, "gid", None),
    ("missing trans_type", "submit", orjson.dumps(_bad("bad-tt0", trans_type=...)), 400,
     "trans_type", "bad-tt0"),
    ("unknown trans_type", "submit", orjson.dumps(_bad("bad-tt1", trans_type="sagas")), 400,
     "trans_type", "bad-tt1"),
    ("trans_type not a string", "submit",
     orjson.dumps(_bad("bad-tt2", trans_type=["saga"])), 400, "trans_type", "bad-tt2"),
    ("steps/payloads mismatch", "submit",
     orjson.dumps(_bad("bad-len", payloads=["{}", "{}"])), 400, "payloads", "bad-len"),
    ("retry_interval as text", "submit",
     orjson.dumps(_bad("bad-ri", retry_interval="5")), 400, "retry_interval", "bad-ri"),
    ("wait_result as text", "submit",
     orjson.dumps(_bad("bad-wr", wait_result="yes")), 400, "wait_result", "bad-wr"),
    ("steps not a list", "submit", orjson.dumps(_bad("bad-steps", steps="a")), 400, "steps",
     "bad-steps"),
    ("step not an object", "submit",
     orjson.dumps(_bad("bad-step", steps=["a"])), 400, "steps[0]", "bad-step"),
    ("action not a string", "submit",
     orjson.dumps(_bad("bad-act", steps=[{"action": 5}])), 400, "steps[0].action", "bad-act"),
    ("unknown step key", "submit",
     orjson.dumps(_bad("bad-key", steps=[dict(STEP, acton="x")])), 400, "steps[0]",
     "bad-key"),
    ("payloads not strings", "submit",
     orjson.dumps(_bad("bad-pl", payloads=[{"a": 1}])), 400, "payloads", "bad-pl"),
    ("negative timeout", "submit",
     orjson.dumps(_bad("bad-tf", timeout_to_fail=-1)), 400, "timeout_to_fail", "bad-tf"),
    ("retry_interval out of range", "submit",
     orjson.dumps(_bad("bad-ri-big", retry_interval=10**12)), 400, "retry_interval",
     "bad-ri-big"),
    ("request_timeout beyond 64 bits", "submit",
     orjson.dumps(_bad("bad-rt-big", request_timeout=2**63)), 400, "request_timeout",
     "bad-rt-big"),
    ("retry_limit as bool", "submit",
     orjson.dumps(_bad("bad-rl", retry_limit=True)), 400, "retry_limit", "bad-rl"),
    ("branch_headers not strings", "submit",
     orjson.dumps(_bad("bad-bh", branch_headers={"X": 1})), 400, "branch_headers", "bad-bh"),
    ("orders out of range", "submit",
     orjson.dumps(_bad("bad-ord", custom_data='{"concurrent":true,"orders":{"3":[0]}}')),
     400, "custom_data", "bad-ord"),
    ("orders in a cycle", "submit",
     orjson.dumps(_bad("bad-cyc", steps=[STEP, STEP], payloads=["{}", "{}"],
                       custom_data='{"concurrent":true,"orders":{"0":[1],"1":[0]}}')),
     400, "custom_data", "bad-cyc"),
    ("custom_data not a string", "submit",
     orjson.dumps(_bad("bad-cd", custom_data={"concurrent": True})), 400, "custom_data",
     "bad-cd"),
    ("saga without steps", "submit", orjson.dumps(_bad("bad-empty", steps=[], payloads=[])),
     400, "steps", "bad-empty"),
    ("unknown protocol", "submit", orjson.dumps(_bad("bad-proto", protocol="smtp")), 400,
     "protocol", "bad-proto"),
    ("prepare with wrong type", "prepare",
     orjson.dumps(_bad("bad-prep", request_timeout="3")), 400, "request_timeout",
     "bad-prep"),
    ("forceStop without gid", "forceStop", b"{}", 400, "gid", None),
    ("resetNextCronTime malformed", "resetNextCronTime", b"{", 400, None, None),
    ("oversized body", "submit",
     orjson.dumps(_bad("bad-big", payloads=["x" * (1 << 20)])), 413, None, "bad-big"),
]


async def test_bad_input_is_a_4xx_with_a_message_and_stores_nothing(
    api: Api, session: aiohttp.ClientSession, coordinator: CoordinatorProcess
) -> None:
    problems: list[str] = []
    for label, route, raw, want_status, want_field, gid in BAD_INPUT:
        # A stream, so aiohttp does not warn about a large in-memory body.
        async with session.post(f"{api.api}/{route}", data=io.BytesIO(raw),
                                headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            status, ctype = r.status, r.content_type
        try:
            reply = orjson.loads(text)
        except orjson.JSONDecodeError:
            problems.append(f"{label}: {status} body is not JSON: {text[:200]!r}")
            continue
        if status != want_status:
            problems.append(f"{label}: status {status}, wanted {want_status}: {reply}")
        if ctype != "application/json":
            problems.append(f"{label}: content type {ctype}")
        if not isinstance(reply, dict) or not reply.get("message"):
            problems.append(f"{label}: no message in {reply}")
            continue
        if want_field is not None and reply.get("field") != want_field:
            problems.append(f"{label}: field {reply.get('field')!r}, wanted {want_field!r}")
        if "Traceback" in text or 'File "' in text:
            problems.append(f"{label}: stack trace in the reply")
        if "SUCCESS" in text:
            problems.append(f"{label}: an error reply says SUCCESS")
        if gid is not None and await api.query(gid) != {"transaction": None, "branches": []}:
            problems.append(f"{label}: {gid} was stored")
    assert not problems, "\n".join(problems)

    for params, field in (({"limit": "x"}, "limit"), ({"limit": "0"}, "limit"),
                          ({"status": "done"}, "status"), ({"position": "junk"}, "position")):
        status, reply = await api.get("all", **params)
        assert status == 400, (params, reply)
        assert reply.get("field") == field, (params, reply)

    # Nothing reached the store and the server is still healthy.
    status, reply = await api.get("all")
    assert (status, reply) == (200, {"transactions": [], "next_position": ""})
    async with session.get(f"{coordinator.base}/api/ping") as r:
        assert (r.status, await r.json()) == (200, {"msg": "pong"})


async def test_new_gid_version_and_ping(
    api: Api, session: aiohttp.ClientSession, coordinator: CoordinatorProcess
) -> None:
    gids = set()
    for _ in range(3):
        async with session.get(f"{api.api}/newGid") as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            reply = await r.json()
        assert set(reply) == {"gid", "dtm_result"}
        assert reply["dtm_result"] == "SUCCESS"
        gid = reply["gid"]
        assert isinstance(gid, str)
        assert len(gid) >= 16
        assert set(gid) <= set(string.ascii_letters + string.digits)
        gids.add(gid)
    assert len(gids) == 3
    # A new gid is usable as is.
    status, _ = await api.post("submit", saga(gid, [{"action": "", "compensate": ""}],
                                              wait_result=True))
    assert status == 200
    assert await api.status(gid) == "succeed"

    status, reply = await api.get("version")
    assert (status, reply) == (200, {"version": __version__})
    async with session.get(f"{coordinator.base}/api/ping") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.json() == {"msg": "pong"}
