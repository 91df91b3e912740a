"""dtm's own Python client (dtmcli, unmodified) against our coordinator: TCC and msg.

dtmcli is blocking (`requests`, DB-API), so it runs in a worker thread while the
participants answer from the test's event loop. The msg cases with a local transaction
use dtmcli's own sub-transaction barrier on MariaDB (table dtm_barrier.barrier).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql
import pytest
from aiohttp import web
from dtmcli import barrier, msg, tcc, utils

from coordinator.client import barrier_mysql
from tests.conftest import require_service
from tests.support import FAIL, Api, CoordinatorProcess, Participant

DB: dict[str, Any] = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "",
                      "connect_timeout": 3}
BUSI = "test.dtmcli_modes_busi"  # the local business: one row per committed transfer

def _connect() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(**DB)


def _execute(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = _connect()
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            rows = list(cur.fetchall())
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mariadb() -> Iterator[str]:
    """dtm's barrier table and a business table; yields this module's gid prefix."""
    try:
        _connect().close()
    except pymysql.MySQLError as exc:
        require_service("MariaDB", str(exc))
    for statement in barrier_mysql.SCHEMA:  # dtm's table: same columns and unique key
        _execute(statement)
    _execute(f"create table if not exists {BUSI}("
             "gid varchar(128) primary key, amount int not null)")
    run = "dtmcli-" + uuid.uuid4().hex[:8]
    yield run
    _execute("delete from dtm_barrier.barrier where gid like %s", run + "%")
    _execute(f"delete from {BUSI} where gid like %s", run + "%")


@dataclass
class BackCheck:
    """The application's query_prepared endpoint, answering from dtmcli's barrier."""

    calls: list[dict[str, str]] = field(default_factory=list)
    answered: list[float] = field(default_factory=list)  # time.monotonic() of each answer
    url: str = ""
    _runner: web.AppRunner | None = None

    @staticmethod
    def _check(query: dict[str, str]) -> None:
        """dtmcli's `BranchBarrier.query_prepared`; raises DTMFailureError on rollback."""
        bb = barrier.BranchBarrier(query["trans_type"], query["gid"], query["branch_id"],
                                   query["op"])
        # AutoCursor closes the cursor's connection on the way out, as dtm's examples do.
        with barrier.AutoCursor(_connect().cursor()) as cursor:
            bb.query_prepared(cursor)

    async def _handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        query["user_agent"] = request.headers.get("User-Agent", "")
        self.calls.append(query)
        try:
            # Blocking DB-API work runs in a thread: the event loop serves everyone.
            await asyncio.to_thread(self._check, query)
        except utils.DTMFailureError as exc:
            return web.json_response({"dtm_result": "FAILURE", "message": str(exc)},
                                     status=409)
        finally:
            self.answered.append(time.monotonic())
        return web.json_response({"dtm_result": "SUCCESS"})

    async def start(self) -> BackCheck:
        app = web.Application()
        app.router.add_get("/query_prepared", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/query_prepared"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def back_check(mariadb: str) -> AsyncIterator[BackCheck]:
    service = await BackCheck().start()
    yield service
    await service.stop()


def _busi_rows(gid: str) -> list[tuple[Any, ...]]:
    return _execute(f"select gid, amount from {BUSI} where gid = %s", gid)


def _barrier_rows(gid: str) -> list[tuple[Any, ...]]:
    return _execute("select trans_type, branch_id, op, barrier_id, reason "
                    "from dtm_barrier.barrier where gid = %s order by id", gid)


def _transfer(gid: str, amount: int) -> Callable[[Any], None]:
    """The local business: record the transfer inside the barrier's transaction."""

    def busi(cursor: Any) -> None:
        cursor.execute(f"insert into {BUSI}(gid, amount) values(%s, %s)", (gid, amount))

    return busi


def _new_msg(coordinator: CoordinatorProcess, participant: Participant, gid: str) -> msg.Msg:
    m = msg.Msg(coordinator.api, gid)
    m.add({"amount": 30}, participant.url("TransOut"))
    m.add({"amount": 30}, participant.url("TransIn"))
    return m


def _assert_actions_called_once(participant: Participant, gid: str) -> None:
    for i, path in enumerate(("TransOut", "TransIn"), start=1):
        calls = participant.calls_to(path, gid)
        assert len(calls) == 1, f"{path} called {len(calls)} times"
        assert calls[0].status == 200
        assert calls[0].method == "POST"
        assert json.loads(calls[0].body) == {"amount": 30}
        assert calls[0].query == {"gid": gid, "trans_type": "msg", "branch_id": f"{i:02d}",
                                  "op": "action"}


# -- TCC ------------------------------------------------------------------------------------


def _tcc_callback(participant: Participant) -> Callable[[tcc.Tcc], None]:
    def callback(t: tcc.Tcc) -> None:
        for n in (1, 2):
            t.call_branch({"amount": 30, "n": n}, participant.url(f"try{n}"),
                          participant.url(f"confirm{n}"), participant.url(f"cancel{n}"))

    return callback


async def test_tcc_success_confirms_both(
    coordinator: CoordinatorProcess, api: Api, participant: Participant
) -> None:
    gid = "dtmcli-tcc-ok-" + uuid.uuid4().hex[:8]
    result = await asyncio.to_thread(
        tcc.tcc_global_transaction, coordinator.api, gid, _tcc_callback(participant)
    )
    assert result == gid
    assert await api.wait_status(gid, "succeed", "failed") == "succeed"
    for n in (1, 2):
        (tried,) = participant.calls_to(f"try{n}", gid)
        assert tried.query == {"gid": gid, "trans_type": "tcc", "branch_id": f"0{n}",
                               "op": "try"}
        (confirmed,) = participant.calls_to(f"confirm{n}", gid)
        assert confirmed.query == {"gid": gid, "trans_type": "tcc", "branch_id": f"0{n}",
                                   "op": "confirm"}
        # The registered body reaches phase two unchanged.
        assert json.loads(confirmed.body) == {"amount": 30, "n": n}
        assert confirmed.started >= tried.ended
    assert not [c for c in participant.calls if c.path.startswith("/cancel")]
    branches = (await api.query(gid))["branches"]
    assert [(b["branch_id"], b["op"], b["status"]) for b in branches] == [
        ("01", "cancel", "prepared"), ("01", "confirm", "succeed"),
        ("02", "cancel", "prepared"), ("02", "confirm", "succeed"),
    ]


async def test_tcc_try_failure_cancels_every_registered_branch(
    coordinator: CoordinatorProcess, api: Api, participant: Participant
) -> None:
    gid = "dtmcli-tcc-fail-" + uuid.uuid4().hex[:8]
    participant.plan_for(gid, "try2", FAIL)
    result = await asyncio.to_thread(
        tcc.tcc_global_transaction, coordinator.api, gid, _tcc_callback(participant)
    )
    assert result == ""  # dtmcli aborted the global transaction
    assert await api.wait_status(gid, "succeed", "failed") == "failed"
    assert [c.status for c in participant.calls_to("try2", gid)] == [409]
    # The refused try's branch was registered before its try: it is cancelled too,
    # newest first.
    cancels = [c for c in participant.calls if c.path.startswith("/cancel")]
    assert [(c.path, c.query["branch_id"], c.query["op"]) for c in cancels] == [
        ("/cancel2", "02", "cancel"), ("/cancel1", "01", "cancel"),
    ]
    assert json.loads(cancels[0].body) == {"amount": 30, "n": 2}
    assert not [c for c in participant.calls if c.path.startswith("/confirm")]


# -- msg ------------------------------------------------------------------------------------


async def test_msg_prepare_then_submit(
    coordinator: CoordinatorProcess, api: Api, participant: Participant
) -> None:
    gid = "dtmcli-msg-" + uuid.uuid4().hex[:8]
    m = _new_msg(coordinator, participant, gid)
    await asyncio.to_thread(m.prepare, participant.url("query_prepared"))
    assert await api.status(gid) == "prepared"
    assert not participant.calls  # nothing happens before the submit
    await asyncio.to_thread(m.submit)
    assert await api.wait_status(gid, "succeed", "failed") == "succeed"
    _assert_actions_called_once(participant, gid)
    assert not participant.calls_to("query_prepared")


def _do_and_submit_db(m: msg.Msg, query_prepared: str, busi: Callable[[Any], None]) -> None:
    conn = _connect()
    try:
        m.do_and_submit_db(query_prepared, conn.cursor(), busi)
    finally:
        conn.close()


async def test_msg_do_and_submit_db_commits_then_submits(
    mariadb: str, back_check: BackCheck, coordinator: CoordinatorProcess, api: Api,
    participant: Participant,
) -> None:
    gid = f"{mariadb}-ok"
    m = _new_msg(coordinator, participant, gid)
    await asyncio.to_thread(_do_and_submit_db, m, back_check.url, _transfer(gid, 30))
    assert await api.wait_status(gid, "succeed", "failed") == "succeed"
    _assert_actions_called_once(participant, gid)
    assert _busi_rows(gid) == [(gid, 30)]
    assert _barrier_rows(gid) == [("msg", "00", "msg", "01", "msg")]
    assert back_check.calls == []  # submitted at once: no back-check was needed


class Refused(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "client_checks_back"),
    [(Refused("insufficient balance"), True),
     (utils.DTMFailureError("insufficient balance"), False)],
    ids=["error", "dtm-failure"],
)
async def test_msg_do_and_submit_db_business_raises(
    mariadb: str, back_check: BackCheck, coordinator: CoordinatorProcess, api: Api,
    participant: Participant, error: Exception, client_checks_back: bool,
) -> None:
    """The local transaction rolls back. On an ordinary error dtmcli asks query_prepared
    itself (the barrier then records the rollback and answers FAILURE); on FAILURE it
    aborts at once. Either way the message fails and no action is ever called."""
    gid = f"{mariadb}-raise-{'check' if client_checks_back else 'abort'}"
    m = _new_msg(coordinator, participant, gid)
    transfer = _transfer(gid, 30)

    def busi(cursor: Any) -> None:
        transfer(cursor)
        raise error

    with pytest.raises(type(error), match="insufficient balance"):
        await asyncio.to_thread(_do_and_submit_db, m, back_check.url, busi)
    # dtmcli's abort is answered after the transaction failed: no waiting needed.
    trans = (await api.query(gid))["transaction"]
    assert trans["status"] == "failed"
    assert _busi_rows(gid) == []
    if client_checks_back:
        assert [(c["gid"], c["branch_id"], c["op"]) for c in back_check.calls] == [
            (gid, "00", "msg")
        ]
        assert back_check.calls[0]["user_agent"].startswith("python-requests")
        assert _barrier_rows(gid) == [("msg", "00", "msg", "01", "rollback")]
    else:
        assert back_check.calls == []
        assert _barrier_rows(gid) == []
    # A failed message stays failed: the coordinator never calls an action for it.
    await asyncio.sleep(1.5)
    assert not participant.calls
    assert await api.status(gid) == "failed"


async def test_msg_crash_after_local_commit_is_submitted_by_back_check(
    mariadb: str, back_check: BackCheck, coordinator: CoordinatorProcess, api: Api,
    participant: Participant,
) -> None:
    """The application commits its local transaction (with dtmcli's barrier) and dies
    before submit: our coordinator's back-check finds the barrier row and submits."""
    gid = f"{mariadb}-crash-committed"
    m = _new_msg(coordinator, participant, gid)
    m.trans_base.timeout_to_fail = 2  # back-check after 2 s instead of the default 35 s

    def prepare_and_commit() -> None:
        m.prepare(back_check.url)
        conn = _connect()
        try:
            bb = barrier.BranchBarrier("msg", gid, "00", "msg")
            bb.call(conn.cursor(), _transfer(gid, 30))
        finally:
            conn.close()
        # ... and the process dies here, before m.submit().

    started = time.monotonic()
    await asyncio.to_thread(prepare_and_commit)
    assert _busi_rows(gid) == [(gid, 30)]
    assert await api.wait_status(gid, "succeed", "failed", timeout=20) == "succeed"
    assert time.monotonic() - started >= 1.5  # not before the prepared message timed out
    assert len(back_check.calls) == 1
    check = back_check.calls[0]
    assert (check["gid"], check["trans_type"], check["branch_id"], check["op"]) == (
        gid, "msg", "00", "msg"
    )
    assert not check["user_agent"].startswith("python-requests")  # the coordinator asked
    _assert_actions_called_once(participant, gid)
    assert participant.calls_to("TransOut", gid)[0].started >= back_check.answered[0]
    assert _barrier_rows(gid) == [("msg", "00", "msg", "01", "msg")]


async def test_msg_crash_before_local_commit_fails_and_blocks_late_commit(
    mariadb: str, back_check: BackCheck, coordinator: CoordinatorProcess, api: Api,
    participant: Participant,
) -> None:
    """Prepared, but the local transaction never committed: the back-check's barrier row
    says rollback, the message fails, and a late local commit is refused by the barrier."""
    gid = f"{mariadb}-crash-uncommitted"
    m = _new_msg(coordinator, participant, gid)
    m.trans_base.timeout_to_fail = 2
    await asyncio.to_thread(m.prepare, back_check.url)
    assert await api.wait_status(gid, "succeed", "failed", timeout=20) == "failed"
    assert len(back_check.calls) == 1
    assert _barrier_rows(gid) == [("msg", "00", "msg", "01", "rollback")]
    reason = (await api.query(gid))["transaction"]["rollback_reason"]
    assert "FAILURE" in reason

    def late_commit() -> None:
        conn = _connect()
        try:
            barrier.BranchBarrier("msg", gid, "00", "msg").call(conn.cursor(),
                                                                _transfer(gid, 30))
        finally:
            conn.close()

    with pytest.raises(Exception, match="msg duplicate error"):
        await asyncio.to_thread(late_commit)
    assert _busi_rows(gid) == []
    assert not participant.calls
