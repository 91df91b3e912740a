"""The SDK's workflow mode (coordinator.client.workflow) against a real coordinator.

Steps are local async functions that count their runs, so each test can tell a step
that ran from one restored from the coordinator's records. Recovery tests serve the
registry's recovery handler on a loopback port and let the coordinator call it.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from coordinator.client import (
    DtmClient,
    TransactionFailed,
    TransOptions,
    Workflow,
    WorkflowError,
    WorkflowRegistry,
)
from coordinator.client.barrier import BranchBarrier
from tests.support import AppServer, CoordinatorProcess, free_port, wait_for

RECOVER_PATH = "/workflow/resume"


class SimulatedCrash(Exception):
    """Stands for the process dying between two steps: nothing after it is sent."""


@pytest.fixture
async def dtm(shared_coordinator: CoordinatorProcess) -> AsyncIterator[DtmClient]:
    async with DtmClient(shared_coordinator.api) as client:
        yield client


def gid_for(name: str) -> str:
    return f"wf-{name}-{uuid.uuid4().hex[:12]}"


class Ledger:
    """What the steps did: run counts per name and the order of every run."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.order: list[str] = []
        self.barriers: dict[str, BranchBarrier] = {}

    def action(self, name: str, result: str = "", *, fail: str = "") -> Any:
        async def run(bb: BranchBarrier) -> str:
            self.runs[name] += 1
            self.order.append(name)
            self.barriers[name] = bb
            if fail:
                raise TransactionFailed(fail)
            return result or orjson.dumps({"step": name}).decode()

        return run

    def undo(self, name: str) -> Any:
        async def run(bb: BranchBarrier) -> None:
            self.runs[name] += 1
            self.order.append(name)
            self.barriers[name] = bb

        return run


class RecoveryApp:
    """The registry's recovery handler on a real port, counting the coordinator's calls."""

    def __init__(self, registry: WorkflowRegistry) -> None:
        self.calls: list[tuple[dict[str, str], bytes, int]] = []
        handler = registry.recovery_handler()

        async def counted(request: web.Request) -> web.Response:
            body = await request.read()
            response = await handler(request)
            self.calls.append((dict(request.query), body, response.status))
            return response

        app = web.Application()
        app.router.add_post(RECOVER_PATH, counted)
        self.server = AppServer(app, port=free_port())
        registry.recovery_url = self.server.url(RECOVER_PATH)

    async def __aenter__(self) -> RecoveryApp:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()


async def query(dtm: DtmClient, gid: str) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
    """The transaction and its branches as {(branch_id, op): (status, data)}."""
    reply = await dtm.query(gid)
    branches = {
        (b["branch_id"], b["op"]): (b["status"], base64.b64decode(b.get("bin_data", "")))
        for b in reply["branches"]
    }
    return reply["transaction"], branches


async def wait_finished(dtm: DtmClient, gid: str, timeout: float = 10.0) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal seen
        seen = (await dtm.query(gid))["transaction"] or {}
        return seen.get("status") in ("succeed", "failed")

    await wait_for(done, timeout, 0.05, f"workflow {gid} to finish")
    return seen


def three_steps(registry: WorkflowRegistry, ledger: Ledger, name: str = "transfer",
                **options: Any) -> None:
    """A 3-step workflow whose result joins the step results and echoes its input."""

    async def transfer(wf: Workflow, data: bytes) -> bytes:
        a = await wf.step(ledger.action("a"), compensate=ledger.undo("undo-a"))
        b = await wf.step(ledger.action("b"), compensate=ledger.undo("undo-b"))
        c = await wf.step(ledger.action("c"), compensate=ledger.undo("undo-c"))
        return orjson.dumps({"input": orjson.loads(data), "steps": [
            orjson.loads(a), orjson.loads(b), orjson.loads(c)]})

    registry.register(name, transfer, options=TransOptions(**options) if options else None)


# -- success, failure -------------------------------------------------------------------


async def test_three_steps_succeed_and_record_every_step(dtm: DtmClient) -> None:
    registry, ledger, gid = WorkflowRegistry(dtm, "http://127.0.0.1:9/x"), Ledger(), gid_for("ok")
    three_steps(registry, ledger)

    result = await registry.execute("transfer", gid, b'{"amount": 30}')

    assert orjson.loads(result) == {"input": {"amount": 30}, "steps": [
        {"step": "a"}, {"step": "b"}, {"step": "c"}]}
    assert ledger.order == ["a", "b", "c"]
    trans, branches = await query(dtm, gid)
    assert trans["status"] == "succeed"
    assert trans["trans_type"] == "workflow"
    assert base64.b64decode(trans["result"]) == result
    assert orjson.loads(trans["custom_data"]) == {
        "name": "transfer", "data": base64.b64encode(b'{"amount": 30}').decode()}
    assert branches == {
        (bid, "action"): ("succeed", orjson.dumps({"step": s}))
        for bid, s in (("01", "a"), ("02", "b"), ("03", "c"))
    }
    # Each step saw its own branch identity, for barriers and participant calls.
    assert [(ledger.barriers[s].branch_id, ledger.barriers[s].op) for s in "abc"] == [
        ("01", "action"), ("02", "action"), ("03", "action")]
    assert {ledger.barriers[s].gid for s in "abc"} == {gid}


async def test_failed_step_compensates_finished_steps_in_reverse(dtm: DtmClient) -> None:
    registry, ledger, gid = WorkflowRegistry(dtm), Ledger(), gid_for("fail")

    @registry.register("pay")
    async def pay(wf: Workflow, data: bytes) -> None:
        await wf.step(ledger.action("a"), compensate=ledger.undo("undo-a"))
        await wf.step(ledger.action("b"), compensate=ledger.undo("undo-b"))
        await wf.step(ledger.action("c", fail="insufficient funds"),
                      compensate=ledger.undo("undo-c"))
        await wf.step(ledger.action("d"), compensate=ledger.undo("undo-d"))

    with pytest.raises(TransactionFailed, match="insufficient funds"):
        await registry.execute("pay", gid, b"{}")

    # The failed step is not compensated (its business said no); nothing after it runs.
    assert ledger.order == ["a", "b", "c", "undo-b", "undo-a"]
    assert ledger.barriers["undo-b"].op == "compensate"
    assert ledger.barriers["undo-b"].branch_id == "02"
    trans, branches = await query(dtm, gid)
    assert trans["status"] == "failed"
    assert trans["rollback_reason"] == "insufficient funds"
    assert branches == {
        ("01", "action"): ("succeed", b'{"step":"a"}'),
        ("02", "action"): ("succeed", b'{"step":"b"}'),
        ("03", "action"): ("failed", b"insufficient funds"),
        ("02", "compensate"): ("succeed", b""),
        ("01", "compensate"): ("succeed", b""),
    }


async def test_reexecuting_a_finished_workflow_runs_nothing(dtm: DtmClient) -> None:
    registry, ledger = WorkflowRegistry(dtm), Ledger()
    three_steps(registry, ledger)
    calls = Counter[str]()

    @registry.register("refuse")
    async def refuse(wf: Workflow, data: bytes) -> None:
        calls["refuse"] += 1
        await wf.step(ledger.action("x"), compensate=ledger.undo("undo-x"))
        raise TransactionFailed("out of stock")

    ok_gid, failed_gid = gid_for("again"), gid_for("again-failed")
    first = await registry.execute("transfer", ok_gid, b'{"n": 1}')
    with pytest.raises(TransactionFailed, match="out of stock"):
        await registry.execute("refuse", failed_gid)
    before = (Counter(ledger.runs), dict(calls))

    # Other input on purpose: a finished workflow keeps what it recorded.
    again = await registry.execute("transfer", ok_gid, b'{"n": 2}')
    with pytest.raises(TransactionFailed, match="out of stock"):
        await registry.execute("refuse", failed_gid)

    assert again == first
    assert (ledger.runs, calls) == before
    assert ledger.runs["undo-x"] == 1
    assert (await query(dtm, ok_gid))[0]["status"] == "succeed"


# -- resuming ---------------------------------------------------------------------------


async def test_crashed_workflow_is_finished_by_the_coordinators_recovery_call(
    dtm: DtmClient,
) -> None:
    registry, ledger, gid = WorkflowRegistry(dtm), Ledger(), gid_for("crash")
    crash = True
    seen_inputs: list[bytes] = []

    @registry.register("ship", options=TransOptions(timeout_to_fail=1, retry_interval=1))
    async def ship(wf: Workflow, data: bytes) -> str:
        seen_inputs.append(data)
        first = await wf.step(ledger.action("a"), compensate=ledger.undo("undo-a"))
        if crash:
            raise SimulatedCrash("process died after step 1")
        await wf.step(ledger.action("b"), compensate=ledger.undo("undo-b"))
        await wf.step(ledger.action("c"), compensate=ledger.undo("undo-c"))
        return "shipped after " + first.decode()

    async with RecoveryApp(registry) as app:
        with pytest.raises(SimulatedCrash):
            await registry.execute("ship", gid, b'{"order": 7}')
        trans, branches = await query(dtm, gid)
        assert trans["status"] == "prepared"  # no submit was sent
        assert set(branches) == {("01", "action")}
        crash = False

        final = await wait_finished(dtm, gid)

        assert final["status"] == "succeed"
        assert base64.b64decode(final["result"]) == b'shipped after {"step":"a"}'
        # Step a ran once: the recovery restored it from its record.
        assert ledger.runs == Counter({"a": 1, "b": 1, "c": 1})
        assert ledger.order == ["a", "b", "c"]
        assert seen_inputs == [b'{"order": 7}', b'{"order": 7}']
        # The workflow's own submit can land before the recovery call has answered.
        await wait_for(lambda: app.calls, 5, 0.01, "the recovery call's answer")
        query_string, body, status = app.calls[0]
        assert (query_string["op"], query_string["gid"], body, status) == (
            "ship", gid, b'{"order": 7}', 200)
        _, branches = await query(dtm, gid)
        assert {k: v[0] for k, v in branches.items()} == {
            ("01", "action"): "succeed", ("02", "action"): "succeed",
            ("03", "action"): "succeed"}
        # And the result stays: executing again restores it without running anything.
        assert await registry.execute("ship", gid) == b'shipped after {"step":"a"}'
        assert ledger.runs == Counter({"a": 1, "b": 1, "c": 1})


async def test_cancelled_step_runs_again_on_recovery_and_recorded_ones_do_not(
    dtm: DtmClient,
) -> None:
    registry, ledger, gid = WorkflowRegistry(dtm), Ledger(), gid_for("cancel")
    entered, block = asyncio.Event(), True

    async def slow_b(bb: BranchBarrier) -> str:
        ledger.runs["b"] += 1
        entered.set()
        if block:
            await asyncio.Event().wait()  # hangs until cancelled
        return "b-done"

    inputs: list[bytes] = []

    @registry.register("slow", options=TransOptions(timeout_to_fail=1, retry_interval=1))
    async def slow(wf: Workflow, data: bytes) -> bytes:
        inputs.append(data)
        a = await wf.step(ledger.action("a", "a-done"))
        b = await wf.step(slow_b)
        return a + b"+" + b

    async with RecoveryApp(registry) as app:
        task = asyncio.create_task(registry.execute("slow", gid, b""))
        await asyncio.wait_for(entered.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not registry.is_running(gid)
        block = False

        final = await wait_finished(dtm, gid)

        assert final["status"] == "succeed"
        assert base64.b64decode(final["result"]) == b"a-done+b-done"
        # b was cut off before its record, so it ran again (at-least-once); a did not.
        assert ledger.runs == Counter({"a": 1, "b": 2})
        # The coordinator posts "{}" for an empty input; the recorded input is used.
        await wait_for(lambda: app.calls, 5, 0.01, "the recovery call's answer")
        assert app.calls[-1][1] == b"{}"
        assert inputs == [b"", b""]
        assert app.calls
        assert app.calls[-1][2] == 200


async def test_crash_during_compensation_resumes_the_rollback_only(dtm: DtmClient) -> None:
    registry, ledger, gid = WorkflowRegistry(dtm), Ledger(), gid_for("undo-crash")
    undo_a_fails = True

    async def flaky_undo_a(bb: BranchBarrier) -> None:
        ledger.runs["undo-a"] += 1
        if undo_a_fails:
            raise ConnectionError("account service down")

    inputs: list[bytes] = []

    @registry.register("book")
    async def book(wf: Workflow, data: bytes) -> None:
        inputs.append(data)
        await wf.step(ledger.action("a"), compensate=flaky_undo_a)
        await wf.step(ledger.action("b"), compensate=ledger.undo("undo-b"))
        await wf.step(ledger.action("c", fail="no seats left"))

    with pytest.raises(ConnectionError):
        await registry.execute("book", gid, b'{"seat": 1}')
    trans, branches = await query(dtm, gid)
    assert trans["status"] == "prepared"
    assert ("02", "compensate") in branches
    assert ("01", "compensate") not in branches
    undo_a_fails = False

    with pytest.raises(TransactionFailed, match="no seats left"):
        await registry.execute("book", gid, b'{"seat": 2}')  # the first input is kept

    # No action ran again (the failure of c was replayed from its record), undo-b was
    # recorded before the crash, and only undo-a was tried a second time.
    assert ledger.runs == Counter({"a": 1, "b": 1, "c": 1, "undo-b": 1, "undo-a": 2})
    trans, branches = await query(dtm, gid)
    assert (trans["status"], trans["rollback_reason"]) == ("failed", "no seats left")
    assert branches[("01", "compensate")][0] == "succeed"
    assert inputs == [b'{"seat": 1}', b'{"seat": 1}']


# -- misuse and the handler's edges -----------------------------------------------------


async def test_unknown_names_and_foreign_gids_are_refused(dtm: DtmClient) -> None:
    registry, ledger = WorkflowRegistry(dtm), Ledger()
    three_steps(registry, ledger)
    three_steps(registry, ledger, name="other")
    with pytest.raises(ValueError, match="already registered"):
        three_steps(registry, ledger)
    with pytest.raises(WorkflowError, match="no workflow named"):
        await registry.execute("missing", gid_for("missing"))

    gid = gid_for("owned")
    await registry.execute("transfer", gid, b"{}")
    with pytest.raises(WorkflowError, match="belongs to workflow 'transfer'"):
        await registry.execute("other", gid, b"{}")
    saga_gid = gid_for("saga")
    await dtm.post("prepare", {"gid": saga_gid, "trans_type": "tcc"})
    with pytest.raises(WorkflowError, match="belongs to a tcc transaction"):
        await registry.execute("transfer", saga_gid, b"{}")
    assert ledger.runs == Counter({"a": 1, "b": 1, "c": 1})


async def test_recovery_handler_answers(dtm: DtmClient) -> None:
    registry = WorkflowRegistry(dtm)
    release = asyncio.Event()

    @registry.register("wait")
    async def wait(wf: Workflow, data: bytes) -> None:
        await wf.step(lambda bb: release.wait())  # returns True: not bytes

    @registry.register("refuse")
    async def refuse(wf: Workflow, data: bytes) -> None:
        raise TransactionFailed("nope")

    timeout = aiohttp.ClientTimeout(total=5)
    async with RecoveryApp(registry) as app, aiohttp.ClientSession(timeout=timeout) as s:
        url = registry.recovery_url

        async def post(**params: str) -> tuple[int, str]:
            async with s.post(url, params=params, data=b"{}") as r:
                return r.status, await r.text()

        assert (await post(gid="g"))[0] == 400
        status, text = await post(op="nobody", gid=gid_for("h"))
        assert status == 500
        assert "no workflow named" in text
        status, text = await post(op="refuse", gid=gid_for("h"))
        assert (status, orjson.loads(text)["dtm_result"]) == (409, "FAILURE")

        gid = gid_for("busy")
        task = asyncio.create_task(registry.execute("wait", gid))
        await wait_for(lambda: registry.is_running(gid), 5, 0.01, "the execution")
        assert (await post(op="wait", gid=gid))[0] == 425
        release.set()
        with pytest.raises(TypeError, match="not bool"):
            await task
        assert len(app.calls) == 4
