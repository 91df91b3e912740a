"""The asyncio SDK against a real `coordinator serve` process.

Participants are real sockets on loopback: the recording `Participant` of tests.support,
or small aiohttp apps built with the SDK's own participant helpers. Assertions are
about what participants observed and what the coordinator reports.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from coordinator.client import (
    BranchCallError,
    BranchInfo,
    CoordinatorUnavailable,
    DtmClient,
    Msg,
    RequestRejected,
    Saga,
    TransactionFailed,
    TransactionOngoing,
    TransOptions,
    branch_handler,
    local_gid,
    new_gid,
    tcc_global,
    xa_global,
    xa_local_transaction,
    xa_phase2,
)
from coordinator.client.barrier_mysql import quiet_cursor
from coordinator.client.http import classify_branch, parse_envelope
from tests.conftest import MYSQL_DB, MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER
from tests.support import (
    ERROR,
    FAIL,
    AppServer,
    Call,
    CoordinatorProcess,
    Participant,
    free_port,
    wait_for,
)


@pytest.fixture
async def dtm(shared_coordinator: CoordinatorProcess) -> AsyncIterator[DtmClient]:
    async with DtmClient(shared_coordinator.api) as client:
        yield client


def gid_for(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def of(p: Participant, gid: str) -> list[Call]:
    return [c for c in p.calls if c.query.get("gid") == gid]


async def final_status(dtm: DtmClient, gid: str, timeout: float = 15.0) -> str:
    seen = ""

    async def done() -> bool:
        nonlocal seen
        trans = (await dtm.query(gid))["transaction"]
        seen = trans["status"] if trans else ""
        return seen in ("succeed", "failed")

    await wait_for(done, timeout, 0.05, f"{gid} to finish")
    return seen


# -- gids ---------------------------------------------------------------------------------


async def test_gids_from_the_coordinator_and_local(dtm: DtmClient) -> None:
    a, b = await new_gid(dtm), await new_gid(dtm.url)  # a client, or a bare URL
    assert a != b
    assert len(a) == 22
    assert local_gid("{3}").startswith("{3}")
    assert len(local_gid()) == 22


# -- saga -----------------------------------------------------------------------------------


async def test_saga_success_calls_actions_in_order_with_their_payloads(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("saga-ok")
    saga = Saga(dtm, gid, TransOptions(wait_result=True, branch_headers={"X-Trace": "t1"}))
    saga.add(participant.url("a1"), participant.url("c1"), {"amount": 30})
    saga.add(participant.url("a2"), participant.url("c2"), '{"raw":true}')
    await saga.submit()
    calls = of(participant, gid)
    assert [c.path for c in calls] == ["/a1", "/a2"]
    assert orjson.loads(calls[0].body) == {"amount": 30}
    assert calls[1].body == '{"raw":true}'
    assert calls[0].query == {"gid": gid, "trans_type": "saga", "branch_id": "01",
                              "op": "action"}
    assert calls[0].headers.get("X-Trace") == "t1"
    trans = (await dtm.query(gid))["transaction"]
    assert trans["status"] == "succeed"


async def test_saga_rollback_raises_transaction_failed_with_the_reason(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("saga-rb")
    participant.plan_for(gid, "a2", FAIL)
    saga = Saga(dtm, gid, TransOptions(wait_result=True))
    for i in (1, 2, 3):
        saga.add(participant.url(f"a{i}"), participant.url(f"c{i}"), {"step": i})
    with pytest.raises(TransactionFailed, match="business refused"):
        await saga.submit()
    assert [c.path for c in of(participant, gid)] == ["/a1", "/a2", "/c2", "/c1"]
    trans = (await dtm.query(gid))["transaction"]
    assert trans["status"] == "failed"
    assert "business refused" in trans["rollback_reason"]


async def test_concurrent_saga_runs_steps_in_parallel_after_their_prerequisites(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("saga-conc")
    for name in ("a0", "a1"):
        participant.delay_for(gid, name, 0.4)
    saga = Saga(dtm, gid, TransOptions(wait_result=True))
    for i in range(3):
        saga.add(participant.url(f"a{i}"), participant.url(f"c{i}"), {"step": i})
    saga.add_order(2, [0, 1])
    await saga.submit()
    calls = {c.path: c for c in of(participant, gid)}
    assert set(calls) == {"/a0", "/a1", "/a2"}
    # a0 and a1 overlapped (concurrent); a2 waited for both.
    assert calls["/a1"].started < calls["/a0"].ended
    assert calls["/a0"].started < calls["/a1"].ended
    assert calls["/a2"].started >= max(calls["/a0"].ended, calls["/a1"].ended)
    custom = orjson.loads((await dtm.query(gid))["transaction"]["custom_data"])
    assert custom == {"concurrent": True, "orders": {"2": [0, 1]}}


async def test_concurrent_saga_rolls_back_every_started_step(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("saga-conc-rb")
    participant.plan_for(gid, "a1", FAIL)
    saga = Saga(dtm, gid, TransOptions(wait_result=True), concurrent=True)
    for i in range(3):
        saga.add(participant.url(f"a{i}"), participant.url(f"c{i}"), {"step": i})
    saga.add_order(2, [1])
    with pytest.raises(TransactionFailed):
        await saga.submit()
    paths = {c.path for c in of(participant, gid)}
    assert {"/a0", "/a1", "/c0", "/c1"} <= paths
    assert not paths & {"/a2", "/c2"}


async def test_saga_orders_are_checked_before_sending() -> None:
    saga = Saga("http://127.0.0.1:1/api/dtmsvr", "g").add("", "").add("", "")
    saga.add_order(1, [5])
    with pytest.raises(ValueError, match="outside"):
        await saga.submit()


# -- msg ------------------------------------------------------------------------------------


async def test_msg_prepare_then_submit_calls_every_action(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("msg")
    msg = Msg(dtm, gid).add(participant.url("m1"), {"n": 1}).add(participant.url("m2"), {"n": 2})
    await msg.prepare(participant.url("query"))
    trans = (await dtm.query(gid))["transaction"]
    assert trans["status"] == "prepared"
    assert trans["query_prepared"] == participant.url("query")
    assert of(participant, gid) == []
    await msg.submit()
    assert await final_status(dtm, gid) == "succeed"
    calls = of(participant, gid)
    assert [c.path for c in calls] == ["/m1", "/m2"]
    assert [orjson.loads(c.body) for c in calls] == [{"n": 1}, {"n": 2}]


async def test_msg_abort_fails_it_without_calls(dtm: DtmClient, participant: Participant) -> None:
    gid = gid_for("msg-abort")
    msg = Msg(dtm, gid).add(participant.url("m1"), {"n": 1})
    await msg.prepare(participant.url("query"))
    await msg.abort()
    assert await final_status(dtm, gid) == "failed"
    await asyncio.sleep(0.3)
    assert of(participant, gid) == []
    with pytest.raises(TransactionFailed):  # a finished message cannot be submitted
        await msg.submit()


# -- tcc ------------------------------------------------------------------------------------


def tcc_urls(p: Participant, name: str) -> tuple[str, str, str]:
    return p.url(f"{name}-try"), p.url(f"{name}-confirm"), p.url(f"{name}-cancel")


async def test_tcc_success_tries_then_confirms(dtm: DtmClient, participant: Participant) -> None:
    gid = gid_for("tcc-ok")
    async with tcc_global(dtm, gid) as tcc:
        reply = await tcc.call_branch({"amount": 30}, *tcc_urls(participant, "out"))
        assert reply.json() == {"dtm_result": "SUCCESS"}
        await tcc.call_branch({"amount": 30}, *tcc_urls(participant, "in"))
        # Only the Trys so far, called by the SDK itself with op=try.
        assert [c.path for c in of(participant, gid)] == ["/out-try", "/in-try"]
    assert await final_status(dtm, gid) == "succeed"
    calls = of(participant, gid)
    assert sorted(c.path for c in calls[2:]) == ["/in-confirm", "/out-confirm"]
    first = calls[0]
    assert (first.query["op"], first.query["branch_id"]) == ("try", "01")
    assert first.query["dtm"] == dtm.url
    assert orjson.loads(calls[2].body) == {"amount": 30}  # confirm carries the body


async def test_tcc_exception_in_the_body_cancels_and_is_reraised(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("tcc-exc")

    async def transfer() -> None:
        async with tcc_global(dtm, gid) as tcc:
            await tcc.call_branch({"amount": 30}, *tcc_urls(participant, "out"))
            raise RuntimeError("order service down")

    with pytest.raises(RuntimeError, match="order service down"):
        await transfer()
    assert await final_status(dtm, gid) == "failed"
    paths = [c.path for c in of(participant, gid)]
    assert paths == ["/out-try", "/out-cancel"]
    trans = (await dtm.query(gid))["transaction"]
    assert "order service down" in trans["rollback_reason"]


async def test_tcc_try_refused_cancels_every_registered_branch(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("tcc-refused")
    participant.plan_for(gid, "in-try", FAIL)

    async def transfer() -> None:
        async with tcc_global(dtm, gid) as tcc:
            await tcc.call_branch({"amount": 30}, *tcc_urls(participant, "out"))
            await tcc.call_branch({"amount": 30}, *tcc_urls(participant, "in"))

    with pytest.raises(TransactionFailed):
        await transfer()
    assert await final_status(dtm, gid) == "failed"
    # The refused branch was registered before its Try, so it is cancelled as well.
    assert sorted(c.path for c in of(participant, gid)[2:]) == ["/in-cancel", "/out-cancel"]


async def test_tcc_try_error_raises_branch_call_error_and_cancels(
    dtm: DtmClient, participant: Participant
) -> None:
    gid = gid_for("tcc-error")
    participant.plan_for(gid, "out-try", ERROR)
    with pytest.raises(BranchCallError) as info:
        async with tcc_global(dtm, gid) as tcc:
            await tcc.call_branch({"amount": 1}, *tcc_urls(participant, "out"))
    assert info.value.status == 500
    assert await final_status(dtm, gid) == "failed"
    assert [c.path for c in of(participant, gid)] == ["/out-try", "/out-cancel"]


# -- xa on MariaDB ------------------------------------------------------------------------


class XaBank:
    """A participant whose branch work is an insert into MariaDB inside an XA branch."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.connect = functools.partial(
            aiomysql_connect, host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER,
            password=MYSQL_PASSWORD, db=MYSQL_DB,
        )
        self.ops: list[str] = []
        app = web.Application()
        app.router.add_post("/xa", branch_handler(self.handle))
        self.server = AppServer(app)

    async def handle(self, request: web.Request, branch: BranchInfo) -> None:
        self.ops.append(branch.op)
        if branch.op != "action":
            await xa_phase2(self.connect, branch)
            return
        body = await request.json()
        if body.get("refuse"):
            raise TransactionFailed("refused by the bank")

        async def insert(conn: Any) -> None:
            async with conn.cursor() as cur:
                await cur.execute("INSERT INTO sdk_xa_ledger (id, amount) VALUES (%s, %s)",
                                  (f"{branch.gid}-{branch.branch_id}",
                                   body["amount"]))

        await xa_local_transaction(self.connect, branch, insert)

    async def rows(self, gid: str) -> list[tuple[str, int]]:
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT id, amount FROM sdk_xa_ledger WHERE id LIKE %s "
                                  "ORDER BY id", (f"{gid}-%",))
                rows = await cur.fetchall()
            await conn.commit()
            return [(r[0], r[1]) for r in rows]
        finally:
            conn.close()

    def gid(self, name: str) -> str:
        """Gids of this bank carry its tag, so leftovers in XA RECOVER can be found."""
        return f"{self.tag}-{name}"

    async def pending_xids(self) -> list[tuple[str, str]]:
        """This bank's prepared XA branches, as (gid, branch_id)."""
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute("XA RECOVER")
                rows = await cur.fetchall()
        finally:
            conn.close()
        out = []
        for _, gtrid_length, _, data in rows:
            gid, branch = data[:gtrid_length].decode(), data[gtrid_length:].decode()
            if gid.startswith(self.tag):
                out.append((gid, branch))
        return out


async def aiomysql_connect(**kwargs: Any) -> Any:
    import aiomysql
    import pymysql

    from tests.conftest import require_service

    try:
        return await aiomysql.connect(connect_timeout=5, **kwargs)
    except (OSError, pymysql.err.OperationalError) as exc:
        require_service("MySQL/MariaDB", str(exc))


@pytest.fixture
async def xa_bank(prefix: str) -> AsyncIterator[XaBank]:
    bank = XaBank(prefix)
    conn = await bank.connect()
    try:
        async with conn.cursor(quiet_cursor()) as cur:
            await cur.execute("CREATE TABLE IF NOT EXISTS sdk_xa_ledger (id varchar(200) "
                              "PRIMARY KEY, amount bigint NOT NULL) ENGINE = InnoDB")
    finally:
        conn.close()
    await bank.server.start()
    yield bank
    await bank.server.stop()
    # A failed test may leave prepared branches behind, holding their locks for ever.
    for gid, branch_id in await bank.pending_xids():
        await xa_phase2(bank.connect, BranchInfo(gid, "xa", branch_id, "rollback"))
    conn = await bank.connect()
    try:
        async with conn.cursor() as cur:
            await cur.execute("DELETE FROM sdk_xa_ledger WHERE id LIKE %s", (f"{prefix}-%",))
        await conn.commit()
    finally:
        conn.close()


async def test_xa_commit_makes_every_branch_visible(dtm: DtmClient, xa_bank: XaBank) -> None:
    gid = xa_bank.gid("xa-ok")
    async with xa_global(dtm, gid) as xa:
        await xa.call_branch({"amount": 30}, xa_bank.server.url("xa"))
        await xa.call_branch({"amount": 40}, xa_bank.server.url("xa"))
        assert await xa_bank.rows(gid) == []  # prepared, not yet committed
        assert len(await xa_bank.pending_xids()) == 2
    assert await final_status(dtm, gid) == "succeed"
    assert [amount for _, amount in await xa_bank.rows(gid)] == [30, 40]
    assert await xa_bank.pending_xids() == []
    assert xa_bank.ops == ["action", "action", "commit", "commit"]


async def test_xa_refused_branch_rolls_back_the_others(dtm: DtmClient, xa_bank: XaBank) -> None:
    gid = xa_bank.gid("xa-rb")

    async def transfer() -> None:
        async with xa_global(dtm, gid) as xa:
            await xa.call_branch({"amount": 30}, xa_bank.server.url("xa"))
            await xa.call_branch({"amount": 40, "refuse": True}, xa_bank.server.url("xa"))

    with pytest.raises(TransactionFailed, match="refused by the bank"):
        await transfer()
    assert await final_status(dtm, gid) == "failed"
    assert await xa_bank.rows(gid) == []
    assert await xa_bank.pending_xids() == []
    assert xa_bank.ops == ["action", "action", "rollback"]


# -- errors and the envelope ---------------------------------------------------------------


async def test_coordinator_errors_map_to_types(dtm: DtmClient, participant: Participant) -> None:
    with pytest.raises(RequestRejected) as bad:
        await dtm.post("submit", {"gid": "x", "trans_type": "bogus"})
    assert bad.value.status == 400
    assert "trans_type" in bad.value.message
    # registerBranch without a prepared global transaction: dtm answers FAILURE.
    with pytest.raises(TransactionFailed):
        await dtm.post("registerBranch", {"gid": gid_for("none"), "branch_id": "01",
                                          "trans_type": "tcc", "confirm": "", "cancel": ""})
    # A query whose rollback reason mentions FAILURE is still a successful reply.
    gid = gid_for("reason")
    participant.plan_for(gid, "a1", (409, '{"dtm_result":"FAILURE"}'))
    with pytest.raises(TransactionFailed):
        await Saga(dtm, gid, TransOptions(wait_result=True)).add(
            participant.url("a1"), "").submit()
    assert "FAILURE" in (await dtm.query(gid))["transaction"]["rollback_reason"]


async def test_unreachable_coordinator_is_coordinator_unavailable() -> None:
    dead = f"http://127.0.0.1:{free_port()}/api/dtmsvr"
    with pytest.raises(CoordinatorUnavailable):
        await new_gid(dead)
    with pytest.raises(CoordinatorUnavailable):
        await Saga(dead, "g1").add("", "").submit()


async def test_fake_dtm_answers_map_to_types() -> None:
    """Statuses our coordinator does not produce on demand, from a fake dtm."""
    answers = {
        "ongoing": web.json_response({"dtm_result": "ONGOING"}, status=425),
        "old-failure": web.json_response({"dtm_result": "FAILURE", "message": "no"}),
        "busy": web.Response(status=503, text="overloaded"),
        "boom": web.json_response({"message": "internal"}, status=500),
    }

    async def handle(request: web.Request) -> web.Response:
        return answers[request.match_info["op"]]

    app = web.Application()
    app.router.add_route("*", "/api/dtmsvr/{op}", handle)
    server = await AppServer(app).start()
    try:
        async with DtmClient(server.url("api/dtmsvr")) as client:
            with pytest.raises(TransactionOngoing):
                await client.post("ongoing", {})
            with pytest.raises(TransactionFailed, match="no"):
                await client.post("old-failure", {})
            with pytest.raises(CoordinatorUnavailable, match="overloaded"):
                await client.post("busy", {})
            with pytest.raises(RequestRejected, match="internal"):
                await client.post("boom", {})
    finally:
        await server.stop()


def test_envelope_and_branch_classification() -> None:
    assert parse_envelope(200, '{"dtm_result":"SUCCESS"}') == {"dtm_result": "SUCCESS"}
    with pytest.raises(TransactionFailed, match="nope"):
        parse_envelope(409, '{"dtm_result":"FAILURE","message":"nope"}')
    with pytest.raises(TransactionOngoing):
        parse_envelope(425, "")
    with pytest.raises(RequestRejected):
        parse_envelope(200, "not json")
    assert classify_branch("u", 200, "ok").text == "ok"
    with pytest.raises(TransactionFailed):
        classify_branch("u", 200, '{"dtm_result":"FAILURE"}')
    with pytest.raises(TransactionOngoing):
        classify_branch("u", 200, "ONGOING")
    with pytest.raises(BranchCallError):
        classify_branch("u", 502, "bad gateway")


async def test_borrowed_session_stays_open(dtm: DtmClient) -> None:
    async with aiohttp.ClientSession() as session:
        async with DtmClient(dtm.url, session=session) as client:
            await new_gid(client)
        assert not session.closed
        await new_gid(DtmClient(dtm.url, session=session))


# -- participant helpers -------------------------------------------------------------------


async def test_branch_handler_speaks_dtm_answers() -> None:
    async def handler(request: web.Request, branch: BranchInfo) -> Any:
        what = request.query.get("what")
        if what == "refuse":
            raise TransactionFailed("no stock")
        if what == "later":
            raise TransactionOngoing("not yet")
        if what == "crash":
            raise RuntimeError("FAILURE of a disk")  # must not read as a business failure
        if what == "data":
            return {"order": branch.gid}
        return None

    app = web.Application()
    app.router.add_route("*", "/b", branch_handler(handler))
    server = await AppServer(app).start()
    query = {"gid": "g1", "trans_type": "saga", "branch_id": "01", "op": "action"}
    try:
        async with aiohttp.ClientSession() as s:
            async def get(**extra: str) -> tuple[int, str]:
                async with s.get(server.url("b"), params={**query, **extra}) as r:
                    return r.status, await r.text()

            assert await get() == (200, '{"dtm_result":"SUCCESS"}')
            status, text = await get(what="data")
            assert (status, orjson.loads(text)) == (200, {"dtm_result": "SUCCESS",
                                                          "order": "g1"})
            status, text = await get(what="refuse")
            assert (status, orjson.loads(text)["dtm_result"]) == (409, "FAILURE")
            assert (await get(what="later"))[0] == 425
            status, text = await get(what="crash")
            assert status == 500
            assert "FAILURE" not in text
            assert "ONGOING" not in text
            async with s.get(server.url("b"), params={"gid": "g1"}) as r:
                assert r.status == 400
    finally:
        await server.stop()
