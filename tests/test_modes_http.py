"""msg, topics, TCC, XA, workflow, JSON-RPC and resetCronTime, end to end.

A real `coordinator serve` process runs against the real Redis; participants are aiohttp
services on loopback sockets recording every call (path, method, query, body, times).
To keep the module fast, one coordinator serves the whole module (each test uses its own
gids, topics and participant); a test that needs a coordinator to itself (resetCronTime
counts every waiting transaction) starts its own. Assertions are about what participants
observed and what the API answers.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from coordinator.keys import partition_of
from coordinator.settings import RedisSettings
from tests.cluster_support import CLUSTER_TOO, RedisClusterProcess
from tests.support import (
    ERROR,
    FAIL,
    OK,
    ONGOING,
    Api,
    Call,
    CoordinatorProcess,
    Participant,
    running_coordinator,
    wait_for,
)

# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(redis_url: str) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module, with its own key prefix (deleted afterwards)."""
    with running_coordinator(redis_url) as proc:
        yield proc


@pytest.fixture(scope="module")
def shared_on_cluster(redis_cluster: RedisClusterProcess) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module on the test cluster (which is thrown away)."""
    proc = CoordinatorProcess(redis_cluster.url, "t" + uuid.uuid4().hex[:10])
    asyncio.run(proc.start())
    yield proc
    proc.stop()


@pytest.fixture
def api(
    request: pytest.FixtureRequest, session: aiohttp.ClientSession, backend_url: str
) -> Api:
    name = "shared_on_cluster" if backend_url != request.getfixturevalue("redis_url") else "shared"
    proc: CoordinatorProcess = request.getfixturevalue(name)
    return Api(session, proc.api)


@pytest.fixture
def own_api(session: aiohttp.ClientSession, coordinator: CoordinatorProcess) -> Api:
    """An API client of a coordinator of this test's own."""
    return Api(session, coordinator.api)


def new_gid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def calls_of(p: Participant, gid: str, path: str | None = None) -> list[Call]:
    return [c for c in p.calls if c.query.get("gid") == gid
            and (path is None or c.path == "/" + path)]


def paths(calls: list[Call]) -> list[str]:
    return [c.path for c in calls]


def gaps(calls: list[Call]) -> list[float]:
    return [b.started - a.started for a, b in itertools.pairwise(calls)]


def assert_between(value: float, lo: float, hi: float, what: str) -> None:
    assert lo <= value <= hi, f"{what}: {value:.2f}s is not within [{lo}, {hi}]"


def assert_sequential(calls: list[Call]) -> None:
    for before, after in itertools.pairwise(calls):
        assert after.started >= before.ended, f"{after.path} started before {before.path} ended"


def msg_body(gid: str, p: Participant, n: int, **options: Any) -> dict[str, Any]:
    """A msg whose step i (1-based) calls /a<i> with the body {"gid":..,"n":i}."""
    return {
        "gid": gid,
        "trans_type": "msg",
        "steps": [{"action": p.url(f"a{i}")} for i in range(1, n + 1)],
        "payloads": [orjson.dumps({"gid": gid, "n": i}).decode() for i in range(1, n + 1)],
        "query_prepared": p.url("qp"),
        **options,
    }


async def ok(api: Api, op: str, body: dict[str, Any]) -> None:
    status, reply = await api.post(op, body)
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"}), (op, status, reply)


async def refused(api: Api, op: str, body: dict[str, Any]) -> dict[str, Any]:
    status, reply = await api.post(op, body)
    assert status == 409, (op, status, reply)
    assert reply["dtm_result"] == "FAILURE"
    return reply


def branch_layout(query: dict[str, Any]) -> list[tuple[str, str]]:
    return [(b["branch_id"], b["op"]) for b in query["branches"]]


def branch_statuses(query: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(b["branch_id"], b["op"]): b["status"] for b in query["branches"]}


# -- msg --------------------------------------------------------------------------------


@CLUSTER_TOO
async def test_msg_prepare_submit_calls_actions_in_order(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("msg-ok")
    body = msg_body(gid, participant, 3)
    await ok(api, "prepare", body)
    assert await api.status(gid) == "prepared"
    await asyncio.sleep(0.3)
    assert calls_of(participant, gid) == [], "a prepared msg must not run before submit"
    await ok(api, "submit", {**body, "wait_result": True})
    assert await api.status(gid) == "succeed"
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a2", "/a3"]  # no back-check: it was submitted
    assert_sequential(calls)
    assert [(c.method, c.body) for c in calls] == [
        ("POST", p) for p in body["payloads"]
    ]
    for c, bid in zip(calls, ["01", "02", "03"], strict=True):
        assert c.query == {"gid": gid, "trans_type": "msg", "branch_id": bid, "op": "action"}
    q = await api.query(gid)
    assert branch_statuses(q) == {(b, "action"): "succeed" for b in ("01", "02", "03")}


async def test_msg_prepare_twice_succeeds_and_after_finish_is_refused(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("msg-twice")
    body = msg_body(gid, participant, 1)
    await ok(api, "prepare", body)
    await ok(api, "prepare", body)
    assert await api.status(gid) == "prepared"
    await ok(api, "submit", {**body, "wait_result": True})
    reply = await refused(api, "prepare", body)
    assert "succeed" in reply["message"]
    assert await api.status(gid) == "succeed"
    assert len(calls_of(participant, gid, "a1")) == 1


@CLUSTER_TOO
async def test_msg_back_check_success_submits_it(api: Api, participant: Participant) -> None:
    gid = new_gid("msg-bc-ok")
    body = msg_body(gid, participant, 2, timeout_to_fail=1)
    started = time.monotonic()
    await ok(api, "prepare", body)  # ... and the application never submits
    await api.wait_status(gid, "succeed", timeout=10)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/qp", "/a1", "/a2"]
    check = calls[0]
    assert check.method == "GET"
    assert check.body == ""
    assert check.query == {"gid": gid, "trans_type": "msg", "branch_id": "00", "op": "msg"}
    assert_between(check.started - started, 0.9, 3.0, "back-check after timeout_to_fail=1")
    assert_sequential(calls)
    assert [c.body for c in calls[1:]] == body["payloads"]


async def test_msg_back_check_failure_fails_it_without_actions(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("msg-bc-fail")
    participant.plan_for(gid, "qp", FAIL)
    await ok(api, "prepare", msg_body(gid, participant, 2, timeout_to_fail=1))
    await api.wait_status(gid, "failed", timeout=10)
    trans = (await api.query(gid))["transaction"]
    assert "business refused" in trans["rollback_reason"]
    await asyncio.sleep(1.2)
    assert paths(calls_of(participant, gid)) == ["/qp"]


async def test_msg_back_check_ongoing_asks_again_later(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("msg-bc-ongoing")
    participant.plan_for(gid, "qp", ONGOING, ONGOING, OK)
    await ok(api, "prepare", msg_body(gid, participant, 1, timeout_to_fail=1))
    await api.wait_status(gid, "succeed", timeout=15)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/qp"] * 3 + ["/a1"]
    for i, gap in enumerate(gaps(calls[:3])):
        # Ongoing keeps the interval (1 s in these tests); it never doubles.
        assert_between(gap, 0.8, 1.9, f"ongoing back-check gap {i}")


async def test_msg_back_check_error_backs_off(api: Api, participant: Participant) -> None:
    gid = new_gid("msg-bc-error")
    participant.plan_for(gid, "qp", ERROR, ERROR, OK)
    await ok(api, "prepare", msg_body(gid, participant, 1, timeout_to_fail=1))
    await api.wait_status(gid, "succeed", timeout=15)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/qp"] * 3 + ["/a1"]
    g1, g2 = gaps(calls[:3])
    assert_between(g1, 0.8, 1.9, "first retry after an error")
    assert_between(g2, 1.7, 3.2, "second retry (doubled)")


async def test_abort_of_a_prepared_msg_fails_it(api: Api, participant: Participant) -> None:
    gid = new_gid("msg-abort")
    body = msg_body(gid, participant, 1, timeout_to_fail=1)
    await ok(api, "prepare", body)
    await ok(api, "abort", {"gid": gid, "trans_type": "msg"})
    assert await api.status(gid) == "failed"
    # Neither the back-check (due after 1 s) nor any action happens afterwards.
    await asyncio.sleep(1.6)
    assert calls_of(participant, gid) == []
    assert await api.status(gid) == "failed"
    await refused(api, "abort", {"gid": gid, "trans_type": "msg"})
    await refused(api, "submit", body)


async def test_msg_delay_holds_the_first_call_back(api: Api, participant: Participant) -> None:
    gid = new_gid("msg-delay")
    started = time.monotonic()
    await ok(api, "submit", msg_body(gid, participant, 2, custom_data='{"delay":2}'))
    await asyncio.sleep(1.5)
    assert calls_of(participant, gid) == []
    assert await api.status(gid) == "submitted"
    await api.wait_status(gid, "succeed", timeout=10)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a2"]
    assert_between(calls[0].started - started, 1.9, 3.5, "first call of a 2 s delayed msg")


async def test_concurrent_msg_calls_actions_in_parallel(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("msg-conc")
    for i in (1, 2, 3):
        participant.delay_for(gid, f"a{i}", 0.5)
    started = time.monotonic()
    await ok(api, "submit", msg_body(gid, participant, 3, concurrent=True, wait_result=True))
    elapsed = time.monotonic() - started
    calls = calls_of(participant, gid)
    assert sorted(paths(calls)) == ["/a1", "/a2", "/a3"]
    # Every call started before any one ended: they overlapped in time.
    assert max(c.started for c in calls) < min(c.ended for c in calls)
    assert elapsed < 1.4, f"three 0.5 s actions took {elapsed:.2f}s: not in parallel"
    assert await api.status(gid) == "succeed"


async def test_ordered_msg_does_not_overlap(api: Api, participant: Participant) -> None:
    gid = new_gid("msg-seq")
    for i in (1, 2):
        participant.delay_for(gid, f"a{i}", 0.3)
    await ok(api, "submit", msg_body(gid, participant, 2, wait_result=True))
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1", "/a2"]
    assert_sequential(calls)


async def test_msg_action_failure_is_retried_until_success(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("msg-retry")
    participant.plan_for(gid, "a1", FAIL, FAIL, OK)
    await ok(api, "submit", msg_body(gid, participant, 2))
    await api.wait_status(gid, "succeed", "failed", timeout=15)
    q = await api.query(gid)
    assert q["transaction"]["status"] == "succeed"
    assert "rollback_reason" not in q["transaction"]
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/a1"] * 3 + ["/a2"]
    assert [c.status for c in calls] == [409, 409, 200, 200]
    g1, g2 = gaps(calls[:3])
    assert_between(g1, 0.8, 1.9, "first retry of a refused msg action")
    assert_between(g2, 1.7, 3.2, "second retry (doubled)")


async def test_msg_retries_back_off_after_its_prepare_timeout(
    api: Api, participant: Participant
) -> None:
    """timeout_to_fail only bounds the prepared phase: once the back-check submitted the
    msg (necessarily after that timeout), a refused action still waits out the back-off
    instead of being retried at once."""
    gid = new_gid("msg-bc-retry")
    participant.plan_for(gid, "a1", FAIL, FAIL, OK)
    await ok(api, "prepare", msg_body(gid, participant, 1, timeout_to_fail=1))
    await api.wait_status(gid, "succeed", timeout=15)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/qp"] + ["/a1"] * 3
    g1, g2 = gaps(calls[1:])
    assert_between(g1, 0.8, 1.9, "first retry")
    assert_between(g2, 1.7, 3.2, "second retry (doubled)")


# -- topics -----------------------------------------------------------------------------


async def subscribe(api: Api, topic: str, url: str, remark: str = "") -> tuple[int, Any]:
    return await api.get("subscribe", topic=topic, url=url, remark=remark)


async def test_topic_fans_out_to_every_subscriber(api: Api, participant: Participant) -> None:
    topic = new_gid("orders")
    u1, u2 = participant.url("sub1"), participant.url("sub2")
    assert await subscribe(api, topic, u1, "first") == (200, {"dtm_result": "SUCCESS"})
    assert await subscribe(api, topic, u2, "second") == (200, {"dtm_result": "SUCCESS"})
    gid = new_gid("msg-topic")
    await ok(api, "submit", {
        "gid": gid, "trans_type": "msg", "steps": [{"action": f"topic://{topic}"}],
        "payloads": ['{"order":7}'], "wait_result": True,
    })
    calls = calls_of(participant, gid)
    assert sorted((c.path, c.query["branch_id"], c.query["op"], c.body) for c in calls) == [
        ("/sub1", "01-01", "action", '{"order":7}'),
        ("/sub2", "01-02", "action", '{"order":7}'),
    ]
    q = await api.query(gid)
    assert branch_statuses(q) == {("01-01", "action"): "succeed",
                                  ("01-02", "action"): "succeed"}
    assert {b["url"] for b in q["branches"]} == {u1, u2}


async def test_subscribing_twice_is_refused_and_unsubscribe_removes(
    api: Api, participant: Participant
) -> None:
    topic = new_gid("stock")
    u1, u2 = participant.url("sub1"), participant.url("sub2")
    assert (await subscribe(api, topic, u1))[0] == 200
    assert (await subscribe(api, topic, u2))[0] == 200
    status, reply = await subscribe(api, topic, u1)
    assert status == 409, reply
    assert reply["dtm_result"] == "FAILURE"
    assert await api.get("unsubscribe", topic=topic, url=u2) == (
        200, {"dtm_result": "SUCCESS"})
    status, _ = await api.get("unsubscribe", topic=topic, url=u2)
    assert status >= 400, "unsubscribing a URL that is not subscribed must be refused"
    gid = new_gid("msg-unsub")
    await ok(api, "submit", {"gid": gid, "trans_type": "msg",
                             "steps": [{"action": f"topic://{topic}"}], "wait_result": True})
    assert paths(calls_of(participant, gid)) == ["/sub1"]


async def test_kv_shapes_and_delete_topic(
    api: Api, session: aiohttp.ClientSession, participant: Participant
) -> None:
    topic = new_gid("kv")
    u1, u2 = participant.url("k1"), participant.url("k2")
    await subscribe(api, topic, u1, "r1")
    await subscribe(api, topic, u2, "r2")
    status, scanned = await api.get("scanKV", cat="topics")
    assert status == 200
    mine = [kv for kv in scanned["kv"] if kv["k"] == topic]
    assert len(mine) == 1
    assert set(mine[0]) >= {"cat", "k", "v", "version"}
    assert mine[0]["cat"] == "topics"
    assert orjson.loads(mine[0]["v"]) == [{"url": u1, "remark": "r1"},
                                          {"url": u2, "remark": "r2"}]
    status, queried = await api.get("queryKV", cat="topics", key=topic)
    assert status == 200
    assert queried["kv"] == mine
    await api.get("unsubscribe", topic=topic, url=u1)
    _, after = await api.get("queryKV", cat="topics", key=topic)
    (kv,) = after["kv"]
    assert kv["version"] > mine[0]["version"]
    assert orjson.loads(kv["v"]) == [{"url": u2, "remark": "r2"}]

    async with session.delete(f"{api.api}/topic/{topic}") as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"dtm_result": "SUCCESS"}
    _, gone = await api.get("queryKV", cat="topics", key=topic)
    assert gone["kv"] == []
    async with session.delete(f"{api.api}/topic/{topic}") as r:
        assert r.status >= 400
    gid = new_gid("msg-deleted-topic")
    await refused(api, "submit", {"gid": gid, "trans_type": "msg",
                                  "steps": [{"action": f"topic://{topic}"}]})
    assert await api.status(gid) == ""


async def test_msg_to_a_topic_without_subscribers_is_refused(
    api: Api, participant: Participant
) -> None:
    topic = new_gid("empty")
    url = participant.url("s")
    await subscribe(api, topic, url)
    await api.get("unsubscribe", topic=topic, url=url)  # the topic exists, nobody listens
    gids = [new_gid("msg-nosub"), new_gid("msg-nosub")]
    for gid, name in zip(gids, (topic, new_gid("never-created")), strict=True):
        reply = await refused(api, "submit", {
            "gid": gid, "trans_type": "msg",
            "steps": [{"action": participant.url("a1")}, {"action": f"topic://{name}"}],
        })
        assert name in reply["message"]
        assert await api.status(gid) == ""
    await asyncio.sleep(0.3)
    assert [c for gid in gids for c in calls_of(participant, gid)] == []


# -- TCC --------------------------------------------------------------------------------


def tcc_branch(gid: str, p: Participant, bid: str) -> dict[str, str]:
    return {"gid": gid, "trans_type": "tcc", "branch_id": bid,
            "confirm": p.url(f"confirm{bid}"), "cancel": p.url(f"cancel{bid}"),
            "data": orjson.dumps({"branch": bid}).decode()}


async def tcc_with(api: Api, p: Participant, gid: str, ids: list[str],
                   **options: Any) -> None:
    """Prepare a tcc and register its branches the way a client does (try included)."""
    await ok(api, "prepare", {"gid": gid, "trans_type": "tcc", **options})
    for i, bid in enumerate(ids):
        # Both spellings of the route are dtm's.
        await ok(api, "registerTccBranch" if i % 2 else "registerBranch",
                 tcc_branch(gid, p, bid))


@CLUSTER_TOO
async def test_tcc_submit_confirms_every_branch(api: Api, participant: Participant) -> None:
    gid = new_gid("tcc-ok")
    await tcc_with(api, participant, gid, ["01", "02", "03"])
    q = await api.query(gid)
    assert q["transaction"]["status"] == "prepared"
    assert branch_layout(q) == [("01", "cancel"), ("01", "confirm"), ("02", "cancel"),
                                ("02", "confirm"), ("03", "cancel"), ("03", "confirm")]
    await ok(api, "submit", {"gid": gid, "trans_type": "tcc", "wait_result": True})
    calls = calls_of(participant, gid)
    assert sorted(paths(calls)) == ["/confirm01", "/confirm02", "/confirm03"]
    assert_sequential(sorted(calls, key=lambda c: c.started))
    for c in calls:
        bid = c.path.removeprefix("/confirm")
        assert c.method == "POST"
        assert c.body == orjson.dumps({"branch": bid}).decode()
        assert c.query == {"gid": gid, "trans_type": "tcc", "branch_id": bid, "op": "confirm"}
    q = await api.query(gid)
    assert q["transaction"]["status"] == "succeed"
    statuses = branch_statuses(q)
    assert {k: v for k, v in statuses.items() if k[1] == "confirm"} == {
        (b, "confirm"): "succeed" for b in ("01", "02", "03")}
    assert {k: v for k, v in statuses.items() if k[1] == "cancel"} == {
        (b, "cancel"): "prepared" for b in ("01", "02", "03")}


@CLUSTER_TOO
async def test_tcc_abort_cancels_in_reverse_order(api: Api, participant: Participant) -> None:
    gid = new_gid("tcc-abort")
    await tcc_with(api, participant, gid, ["01", "02", "03"])
    await ok(api, "abort", {"gid": gid, "trans_type": "tcc"})
    await api.wait_status(gid, "failed", timeout=10)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/cancel03", "/cancel02", "/cancel01"]
    assert_sequential(calls)
    assert [c.query["op"] for c in calls] == ["cancel"] * 3
    assert [c.body for c in calls] == [orjson.dumps({"branch": b}).decode()
                                       for b in ("03", "02", "01")]


async def test_tcc_times_out_into_cancel(api: Api, participant: Participant) -> None:
    gid = new_gid("tcc-timeout")
    started = time.monotonic()
    await tcc_with(api, participant, gid, ["01", "02"], timeout_to_fail=1)
    await api.wait_status(gid, "failed", timeout=10)
    calls = calls_of(participant, gid)
    assert paths(calls) == ["/cancel02", "/cancel01"]
    assert_between(calls[0].started - started, 0.9, 3.0, "cancel after timeout_to_fail=1")
    reason = (await api.query(gid))["transaction"]["rollback_reason"]
    assert "timeout" in reason.lower()


async def test_tcc_register_needs_a_prepared_transaction(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("tcc-late")
    participant.delay_for(gid, "confirm01", 1.0)  # keep it in submitted for a while
    await tcc_with(api, participant, gid, ["01"])
    await ok(api, "submit", {"gid": gid, "trans_type": "tcc"})
    assert await api.status(gid) == "submitted"
    reply = await refused(api, "registerBranch", tcc_branch(gid, participant, "02"))
    assert "submitted" in reply["message"]
    await api.wait_status(gid, "succeed", timeout=10)
    await refused(api, "registerTccBranch", tcc_branch(gid, participant, "02"))
    assert branch_layout(await api.query(gid)) == [("01", "cancel"), ("01", "confirm")]
    assert paths(calls_of(participant, gid)) == ["/confirm01"]
    unknown = new_gid("tcc-unknown")
    await refused(api, "registerBranch", tcc_branch(unknown, participant, "01"))
    assert await api.status(unknown) == ""


async def test_tcc_confirm_is_retried_until_it_succeeds(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("tcc-retry")
    participant.plan_for(gid, "confirm01", ERROR, FAIL, OK)
    await tcc_with(api, participant, gid, ["01", "02"])
    await ok(api, "submit", {"gid": gid, "trans_type": "tcc"})
    await api.wait_status(gid, "succeed", "failed", timeout=15)
    assert await api.status(gid) == "succeed"
    first = calls_of(participant, gid, "confirm01")
    assert [c.status for c in first] == [500, 409, 200]
    g1, g2 = gaps(first)
    assert_between(g1, 0.8, 1.9, "first confirm retry")
    assert_between(g2, 1.7, 3.2, "second confirm retry (doubled)")
    assert len(calls_of(participant, gid, "confirm02")) == 1
    assert not any(c.path.startswith("/cancel") for c in calls_of(participant, gid))


async def test_nested_tcc_branches_are_all_confirmed(
    api: Api, session: aiohttp.ClientSession, participant: Participant
) -> None:
    gid = new_gid("tcc-nested")
    await ok(api, "prepare", {"gid": gid, "trans_type": "tcc"})
    await ok(api, "registerBranch", tcc_branch(gid, participant, "01"))
    # Branch 01's try (run by the client) opens a nested branch 0101 before answering.
    await ok(api, "registerBranch", tcc_branch(gid, participant, "0101"))
    for bid in ("0101", "01"):
        async with session.post(participant.url(f"try{bid}"),
                                params={"gid": gid, "branch_id": bid, "op": "try"}) as r:
            assert r.status == 200
    await ok(api, "submit", {"gid": gid, "trans_type": "tcc", "wait_result": True})
    confirms = [c for c in calls_of(participant, gid) if c.query.get("op") == "confirm"]
    assert sorted(c.query["branch_id"] for c in confirms) == ["01", "0101"]
    q = await api.query(gid)
    assert q["transaction"]["status"] == "succeed"
    assert branch_layout(q) == [("01", "cancel"), ("01", "confirm"),
                                ("0101", "cancel"), ("0101", "confirm")]
    assert branch_statuses(q)[("0101", "confirm")] == "succeed"


async def test_nested_tcc_abort_cancels_the_child_first(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("tcc-nested-abort")
    await tcc_with(api, participant, gid, ["01", "0101"])
    await ok(api, "abort", {"gid": gid, "trans_type": "tcc", "wait_result": True})
    assert await api.status(gid) == "failed"
    assert paths(calls_of(participant, gid)) == ["/cancel0101", "/cancel01"]


# -- XA ---------------------------------------------------------------------------------


async def xa_with(api: Api, p: Participant, gid: str) -> None:
    await ok(api, "prepare", {"gid": gid, "trans_type": "xa"})
    await ok(api, "registerBranch", {"gid": gid, "trans_type": "xa", "branch_id": "01",
                                     "url": p.url("xa1")})
    await ok(api, "registerXaBranch", {"gid": gid, "trans_type": "xa", "branch_id": "02",
                                       "url": p.url("xa2"), "data": '{"x":2}'})


async def test_xa_submit_commits_every_branch_by_post(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("xa-ok")
    await xa_with(api, participant, gid)
    q = await api.query(gid)
    assert branch_layout(q) == [("01", "rollback"), ("01", "commit"),
                                ("02", "rollback"), ("02", "commit")]
    await ok(api, "submit", {"gid": gid, "trans_type": "xa", "wait_result": True})
    calls = calls_of(participant, gid)
    assert [(c.path, c.method, c.body) for c in calls] == [
        ("/xa1", "POST", ""), ("/xa2", "POST", '{"x":2}')]
    assert [c.query for c in calls] == [
        {"gid": gid, "trans_type": "xa", "branch_id": b, "op": "commit"} for b in ("01", "02")
    ]
    assert await api.status(gid) == "succeed"


async def test_xa_abort_rolls_back_every_branch(api: Api, participant: Participant) -> None:
    gid = new_gid("xa-abort")
    await xa_with(api, participant, gid)
    await ok(api, "abort", {"gid": gid, "trans_type": "xa"})
    await api.wait_status(gid, "failed", timeout=10)
    calls = calls_of(participant, gid)
    # Registration order, as dtm rolls back (and as it commits).
    assert [(c.path, c.method, c.query["op"]) for c in calls] == [
        ("/xa1", "POST", "rollback"), ("/xa2", "POST", "rollback")]
    assert_sequential(calls)


# -- workflow ---------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def prepare_workflow(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    status, reply = await api.post("prepareWorkflow", body)
    assert status == 200, reply
    return reply


def workflow_step(gid: str, bid: str, op: str, status: str, data: str) -> dict[str, str]:
    return {"gid": gid, "trans_type": "workflow", "branch_id": bid, "op": op,
            "status": status, "data": data}


async def test_workflow_records_progress_and_succeeds(api: Api) -> None:
    gid = new_gid("wf-ok")
    body = {"gid": gid, "trans_type": "workflow"}
    first = await prepare_workflow(api, body)
    assert first["progresses"] == []
    assert first["transaction"]["gid"] == gid
    assert first["transaction"]["status"] == "prepared"
    assert first["transaction"]["trans_type"] == "workflow"
    await ok(api, "registerBranch", workflow_step(gid, "01", "action", "succeed", '{"r":1}'))
    await ok(api, "registerBranch", workflow_step(gid, "02", "action", "failed", '{"r":2}'))
    await ok(api, "registerBranch", workflow_step(gid, "02", "compensate", "succeed", ""))
    again = await prepare_workflow(api, body)
    progress = {(p["branch_id"], p["op"]): (p["status"], p.get("bin_data", ""))
                for p in again["progresses"]}
    assert progress == {
        ("01", "action"): ("succeed", b64('{"r":1}')),
        ("02", "action"): ("failed", b64('{"r":2}')),
        ("02", "compensate"): ("succeed", ""),
    }
    await ok(api, "submit", {**body, "req_extra": {"status": "succeed"}})
    assert await api.status(gid) == "succeed"
    await refused(api, "registerBranch", workflow_step(gid, "03", "action", "succeed", ""))


async def test_workflow_step_recorded_twice_is_refused_and_the_first_kept(api: Api) -> None:
    gid = new_gid("wf-dup")
    body = {"gid": gid, "trans_type": "workflow"}
    await prepare_workflow(api, body)
    await ok(api, "registerBranch", workflow_step(gid, "01", "action", "succeed", '{"v":1}'))
    # A second run of the same workflow must not rewrite a recorded result (dtm: every
    # store rejects the duplicate).
    reply = await refused(api, "registerBranch",
                          workflow_step(gid, "01", "action", "failed", '{"v":2}'))
    assert "already recorded" in reply["message"]
    await ok(api, "registerBranch", workflow_step(gid, "01", "compensate", "succeed", ""))
    progress = {(p["branch_id"], p["op"]): (p["status"], p.get("bin_data", ""))
                for p in (await prepare_workflow(api, body))["progresses"]}
    assert progress == {("01", "action"): ("succeed", b64('{"v":1}')),
                        ("01", "compensate"): ("succeed", "")}


async def test_workflow_submitted_as_failed_keeps_the_reason(api: Api) -> None:
    gid = new_gid("wf-fail")
    body = {"gid": gid, "trans_type": "workflow"}
    await prepare_workflow(api, body)
    await ok(api, "registerBranch", workflow_step(gid, "01", "action", "failed", "{}"))
    await ok(api, "submit", {**body, "req_extra": {"status": "failed", "rollback_reason": "x"}})
    trans = (await api.query(gid))["transaction"]
    assert trans["status"] == "failed"
    assert trans["rollback_reason"] == "x"
    await refused(api, "submit", {**body, "req_extra": {"status": "succeed"}})
    assert await api.status(gid) == "failed"


async def test_crashed_workflow_is_recovered_through_query_prepared(
    api: Api, session: aiohttp.ClientSession, participant: Participant
) -> None:
    gid = new_gid("wf-crash")
    wf_data = {"order": 42, "amount": 30}
    body = {
        "gid": gid, "trans_type": "workflow", "query_prepared": participant.url("wf-recover"),
        "custom_data": orjson.dumps({"name": "wf", "data": b64(orjson.dumps(wf_data).decode())}
                                    ).decode(),
        "timeout_to_fail": 1,
    }

    async def step(name: str) -> None:
        async with session.post(participant.url(name), params={"gid": gid}, json=wf_data) as r:
            assert r.status == 200

    async def run_workflow() -> None:
        """The client's workflow: skip steps recorded as done, run the rest, submit."""
        reply = await prepare_workflow(api, body)
        done = {(p["branch_id"], p["op"]) for p in reply["progresses"]
                if p["status"] == "succeed"}
        for bid, name in (("01", "step1"), ("02", "step2")):
            if (bid, "action") in done:
                continue
            await step(name)
            await ok(api, "registerBranch", workflow_step(gid, bid, "action", "succeed", "{}"))
        await ok(api, "submit", {**body, "req_extra": {"status": "succeed"}})

    replays: list[asyncio.Task[None]] = []

    def recover(call: Call) -> tuple[int, str]:
        if not replays:  # one replay; later recovery calls just answer
            replays.append(asyncio.get_running_loop().create_task(run_workflow()))
        return OK

    participant.plan_for(gid, "wf-recover", recover)
    started = time.monotonic()
    # The first run records step 1, then "crashes" before step 2 and the submit.
    await prepare_workflow(api, body)
    await step("step1")
    await ok(api, "registerBranch", workflow_step(gid, "01", "action", "succeed", "{}"))

    await api.wait_status(gid, "succeed", timeout=10)
    await asyncio.gather(*replays)
    (recovery, *_) = calls_of(participant, gid, "wf-recover")
    assert recovery.method == "POST"
    assert recovery.query == {"gid": gid, "trans_type": "workflow", "branch_id": "00",
                              "op": "wf"}
    assert orjson.loads(recovery.body) == wf_data
    assert_between(recovery.started - started, 0.9, 3.0, "recovery after timeout_to_fail=1")
    assert len(calls_of(participant, gid, "step1")) == 1  # the finished step was not redone
    assert len(calls_of(participant, gid, "step2")) == 1
    assert calls_of(participant, gid, "step2")[0].started > recovery.started
    q = await api.query(gid)
    assert branch_statuses(q) == {("01", "action"): "succeed", ("02", "action"): "succeed"}


# -- JSON-RPC ---------------------------------------------------------------------------


async def rpc(session: aiohttp.ClientSession, base: str, payload: Any,
              raw: bytes | None = None) -> dict[str, Any]:
    data = raw if raw is not None else orjson.dumps(payload)
    async with session.post(f"{base}/api/json-rpc", data=data,
                            headers={"Content-Type": "application/json"}) as r:
        reply = await r.json(content_type=None)
        assert isinstance(reply, dict), reply
        assert reply["jsonrpc"] == "2.0"
        return reply


def call(method: str, params: Any = None, rid: Any = 1) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        req["params"] = params
    return req


async def test_json_rpc_round_trips(
    api: Api, session: aiohttp.ClientSession, shared: CoordinatorProcess,
    participant: Participant,
) -> None:
    base = shared.base
    reply = await rpc(session, base, call("newGid", rid="g1"))
    assert reply["id"] == "g1"
    assert "error" not in reply
    assert reply["result"]["dtm_result"] == "SUCCESS"
    gid = reply["result"]["gid"]
    assert isinstance(gid, str)
    assert gid
    other = (await rpc(session, base, call("newGid")))["result"]["gid"]
    assert other != gid

    body = msg_body(gid, participant, 2)
    assert (await rpc(session, base, call("prepare", body, 2)))["result"] == {
        "dtm_result": "SUCCESS"}
    assert await api.status(gid) == "prepared"
    assert (await rpc(session, base, call("submit", {**body, "wait_result": True}, 3))
            )["result"] == {"dtm_result": "SUCCESS"}
    assert await api.status(gid) == "succeed"
    assert paths(calls_of(participant, gid)) == ["/a1", "/a2"]

    tcc = new_gid("rpc-tcc")
    assert "result" in await rpc(session, base, call("prepare", {"gid": tcc,
                                                                 "trans_type": "tcc"}))
    reg = await rpc(session, base, call("registerBranch", tcc_branch(tcc, participant, "01")))
    assert reg["result"] == {"dtm_result": "SUCCESS"}
    assert branch_layout(await api.query(tcc)) == [("01", "cancel"), ("01", "confirm")]
    aborted = await rpc(session, base, call("abort", {"gid": tcc, "trans_type": "tcc"}))
    assert aborted["result"] == {"dtm_result": "SUCCESS"}
    await api.wait_status(tcc, "failed", timeout=10)
    assert paths(calls_of(participant, tcc)) == ["/cancel01"]


async def test_json_rpc_errors(
    api: Api, session: aiohttp.ClientSession, shared: CoordinatorProcess,
    participant: Participant,
) -> None:
    base = shared.base
    parse = await rpc(session, base, None, raw=b'{"jsonrpc": "2.0", "method": ')
    assert parse["error"]["code"] == -32700
    assert parse["id"] is None
    for bad in ({"jsonrpc": "1.0", "id": 5, "method": "newGid"}, {"jsonrpc": "2.0", "id": 5}):
        reply = await rpc(session, base, bad)
        assert reply["error"]["code"] == -32600
        assert reply["id"] == 5
        assert "result" not in reply
    unknown = await rpc(session, base, call("noSuchMethod", {}, 6))
    assert unknown["error"]["code"] == -32601
    assert unknown["id"] == 6

    gid = new_gid("rpc-done")
    await ok(api, "submit", msg_body(gid, participant, 1, wait_result=True))
    again = await rpc(session, base, call("submit", msg_body(gid, participant, 1), 7))
    assert again["error"]["code"] == -32901
    assert "succeed" in again["error"]["message"]
    assert again["id"] == 7
    missing = await rpc(session, base, call("registerBranch",
                                            tcc_branch(new_gid("rpc-none"), participant, "01")))
    assert missing["error"]["code"] == -32901


# -- resetCronTime ----------------------------------------------------------------------


async def test_reset_cron_time_brings_waiting_transactions_forward(
    own_api: Api, participant: Participant
) -> None:
    api = own_api
    gids = [new_gid("reset-a"), new_gid("reset-b")]
    for gid in gids:
        participant.plan_for(gid, "a1", ERROR, OK)
        await ok(api, "submit", msg_body(gid, participant, 1, retry_interval=60))
    await wait_for(lambda: all(calls_of(participant, g) for g in gids), 5, what="first calls")
    await asyncio.sleep(0.5)
    # Each waits a minute after its error: nothing happens by itself.
    assert [len(calls_of(participant, g)) for g in gids] == [1, 1]
    assert [await api.status(g) for g in gids] == ["submitted", "submitted"]

    status, reply = await api.get("resetCronTime", timeout=20, limit=1)
    assert status == 200
    assert reply == {"has_remaining": True, "succeed_count": 1}
    status, reply = await api.get("resetCronTime", timeout=20, limit=5)
    assert reply == {"has_remaining": False, "succeed_count": 1}
    for gid in gids:
        await api.wait_status(gid, "succeed", timeout=5)
        assert [c.status for c in calls_of(participant, gid)] == [500, 200]
    status, reply = await api.get("resetCronTime", timeout=20, limit=5)
    assert reply == {"has_remaining": False, "succeed_count": 0}


async def test_reset_cron_time_exact_limit_has_nothing_remaining(
    own_api: Api, participant: Participant
) -> None:
    api = own_api
    # Not in the last partition: partitions after it must be looked at too.
    last = RedisSettings().partitions - 1
    gid = next(
        g for g in iter(lambda: new_gid("reset-one"), "") if partition_of(g, last + 1) < last
    )
    participant.plan_for(gid, "a1", ERROR, OK)
    await ok(api, "submit", msg_body(gid, participant, 1, retry_interval=60))
    await wait_for(lambda: calls_of(participant, gid), 5, what="first call")
    await asyncio.sleep(0.3)
    # Waiting a minute is not waiting longer than 100 s: left alone.
    status, reply = await api.get("resetCronTime", timeout=100, limit=5)
    assert reply == {"has_remaining": False, "succeed_count": 0}
    status, reply = await api.get("resetCronTime", timeout=20, limit=1)
    assert status == 200
    assert reply == {"has_remaining": False, "succeed_count": 1}
    await api.wait_status(gid, "succeed", timeout=5)


async def test_workflow_submit_cannot_finish_another_mode(api: Api) -> None:
    """A workflow-style submit must not end a prepared TCC without its cancels/confirms."""
    gid = new_gid("wf-guard-tcc")
    assert (await api.post("prepare", {"gid": gid, "trans_type": "tcc"}))[0] == 200
    status, body = await api.post("submit", {
        "gid": gid, "trans_type": "workflow", "req_extra": {"status": "succeed"}})
    assert status == 409, body
    assert "not a workflow" in body["message"]
    assert await api.status(gid) == "prepared"


async def test_a_submit_of_another_type_does_not_take_over_a_prepared_one(
    api: Api, participant: Participant
) -> None:
    """A tcc submit under a prepared workflow's gid used to move it on, after which its
    client could neither record steps nor finish it; a saga submit likewise a tcc."""
    gid = new_gid("wf-typed")
    await prepare_workflow(api, {"gid": gid, "trans_type": "workflow"})
    reply = await refused(api, "submit", {"gid": gid, "trans_type": "tcc"})
    assert "is a workflow, not a tcc" in reply["message"]
    assert await api.status(gid) == "prepared"
    await ok(api, "registerBranch", workflow_step(gid, "01", "action", "succeed", ""))
    await ok(api, "submit", {"gid": gid, "trans_type": "workflow",
                             "req_extra": {"status": "succeed"}})
    assert await api.status(gid) == "succeed"

    tcc = new_gid("tcc-typed")
    await ok(api, "prepare", {"gid": tcc, "trans_type": "tcc"})
    saga = {"gid": tcc, "trans_type": "saga", "payloads": ["{}"],
            "steps": [{"action": participant.url("a1"), "compensate": ""}]}
    await refused(api, "submit", saga)
    assert await api.status(tcc) == "prepared"
    assert calls_of(participant, tcc) == []
