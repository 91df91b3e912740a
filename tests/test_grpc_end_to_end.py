"""gRPC both ways, the go-zero way: a `coordinator serve --register etcd://…/dtmservice`
process, found by the SDK's DtmGrpcClient through etcd, takes transactions over
dtmgimp.Dtm whose branches are grpc.aio services, dialled directly (host:port/…) and
through etcd (etcd://…/<key>/…): saga (success, rollback), msg with a gRPC back-check,
TCC, XA and workflow.

The pieces are tested on their own elsewhere (test_grpc_api: the RPCs with HTTP
branches; test_grpc_branches: gRPC branches of transactions submitted over HTTP;
test_grpc_client: the SDK over gRPC; test_registry: the registration); here they meet.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest

from coordinator.client import (
    BranchInfo,
    DtmGrpcClient,
    Msg,
    Saga,
    TransactionFailed,
    TransOptions,
    Workflow,
    WorkflowRegistry,
    grpc_branch_handler,
    register_service,
    register_xa_branch,
    tcc_global,
    xa_global,
)
from coordinator.registry.resolver import Resolver
from tests.etcd_support import EtcdServer, require_etcd
from tests.grpc_participant import FAILURE, GrpcParticipant
from tests.support import Api, CoordinatorProcess, drop_keys
from tests.test_client import gid_for

WAIT = TransOptions(wait_result=True)
_keys = itertools.count()


@dataclass
class Stack:
    etcd: EtcdServer
    coordinator: CoordinatorProcess

    @property
    def dtm_target(self) -> str:
        return self.etcd.target("dtmservice")


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    """One etcd and one coordinator registered in it for the module."""
    require_etcd()
    with tempfile.TemporaryDirectory(prefix="etcd-e2e-") as tmp:
        etcd = EtcdServer(Path(tmp))
        asyncio.run(etcd.start())
        name = "t" + uuid.uuid4().hex[:10]
        proc = CoordinatorProcess(redis_url, name)
        proc.extra_args = ["--register", etcd.target("dtmservice")]
        try:
            asyncio.run(proc.start())
            asyncio.run(_registered(etcd.target("dtmservice"), f"127.0.0.1:{proc.grpc_port}"))
            yield Stack(etcd, proc)
        finally:
            proc.stop()
            etcd.stop()
            drop_keys(redis_url, name)


async def _registered(target: str, endpoint: str) -> None:
    resolver = Resolver(target)
    try:
        assert await resolver.wait_for(lambda e: e == (endpoint,), 10), resolver.endpoints
    finally:
        await resolver.close()


@pytest.fixture
async def dtm(stack: Stack) -> AsyncIterator[DtmGrpcClient]:
    # Nothing but the registry target: the coordinator's address comes from etcd.
    async with DtmGrpcClient(stack.dtm_target) as client:
        yield client


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, stack.coordinator.api)


@dataclass
class Busi:
    """A gRPC participant published under a key of its own in etcd."""

    participant: GrpcParticipant
    etcd: EtcdServer
    key: str

    def direct(self, method: str) -> str:
        return self.participant.url(method)

    def via_etcd(self, method: str) -> str:
        return f"etcd://{self.etcd.endpoint}/{self.key}/busi.Busi/{method}"


@pytest.fixture
async def busi(stack: Stack) -> AsyncIterator[Busi]:
    participant = await GrpcParticipant().start()
    key = f"busi{next(_keys)}.rpc"  # a fresh key: no endpoint of an earlier test in it
    publisher = await register_service(stack.etcd.target(key), participant.address)
    yield Busi(participant, stack.etcd, key)
    await publisher.stop()
    await participant.stop()


async def test_saga_success_and_rollback(dtm: DtmGrpcClient, http: Api, busi: Busi) -> None:
    gid = gid_for("e2e-saga")
    saga = Saga(dtm, gid, WAIT)
    saga.add(busi.direct("Out"), busi.direct("OutRevert"), {"amount": 30})
    saga.add(busi.via_etcd("In"), busi.via_etcd("InRevert"), {"amount": 30})
    await saga.submit()
    (out,), (inn,) = busi.participant.calls_to("Out", gid), busi.participant.calls_to("In", gid)
    assert orjson.loads(out.body) == {"amount": 30}  # the bytes the client sent
    assert (inn.metadata["dtm-branch_id"], inn.metadata["dtm-op"]) == ("02", "action")
    assert (await http.query(gid))["transaction"]["protocol"] == "grpc"

    gid = gid_for("e2e-saga-rb")
    busi.participant.plan("Refuse", FAILURE)
    saga = Saga(dtm, gid, WAIT)
    saga.add(busi.via_etcd("Out"), busi.via_etcd("OutRevert"), {"amount": 30})
    saga.add(busi.direct("Refuse"), busi.direct("InRevert"), {"amount": 30})
    with pytest.raises(TransactionFailed, match="business refused"):
        await saga.submit()
    ops = [(c.method.rsplit("/", 1)[1], c.op) for c in busi.participant.calls
           if c.metadata.get("dtm-gid") == gid]
    assert ops == [("Out", "action"), ("Refuse", "action"), ("InRevert", "compensate"),
                   ("OutRevert", "compensate")]


async def test_msg_with_a_grpc_back_check(dtm: DtmGrpcClient, http: Api, busi: Busi) -> None:
    gid = gid_for("e2e-msg")
    msg = Msg(dtm, gid, TransOptions(timeout_to_fail=1))
    msg.add(busi.via_etcd("Deliver"), {"n": 1}).add(busi.direct("Deliver"), {"n": 2})
    await msg.prepare(busi.via_etcd("QueryPrepared"))
    # No submit: the coordinator asks QueryPrepared over gRPC, which answers OK.
    await http.wait_status(gid, "succeed", timeout=20)
    (check,) = busi.participant.calls_to("QueryPrepared", gid)
    assert (check.body, check.metadata["dtm-branch_id"], check.op) == (b"", "00", "msg")
    assert sorted(c.body for c in busi.participant.calls_to("Deliver", gid)) == [
        b'{"n":1}', b'{"n":2}']


async def test_tcc_confirm_and_cancel(dtm: DtmGrpcClient, http: Api, busi: Busi) -> None:
    gid = gid_for("e2e-tcc")
    async with tcc_global(dtm, gid, WAIT) as tcc:
        await tcc.call_branch({"amount": 30}, busi.via_etcd("Try"), busi.via_etcd("Confirm"),
                              busi.direct("Cancel"))
    assert [c.op for c in busi.participant.calls if c.metadata["dtm-gid"] == gid] == [
        "try", "confirm"]

    gid = gid_for("e2e-tcc-rb")
    busi.participant.plan("TryRefused", FAILURE)

    async def refused() -> None:
        async with tcc_global(dtm, gid, WAIT) as tcc:
            await tcc.call_branch({"amount": 30}, busi.direct("Try"), busi.direct("Confirm"),
                                  busi.via_etcd("Cancel"))
            await tcc.call_branch({"amount": 30}, busi.via_etcd("TryRefused"),
                                  busi.direct("Confirm"), busi.via_etcd("Cancel"))

    with pytest.raises(TransactionFailed, match="business refused"):
        await refused()
    await http.wait_status(gid, "failed")
    cancels = busi.participant.calls_to("Cancel", gid)
    assert sorted(c.metadata["dtm-branch_id"] for c in cancels) == ["01", "02"]
    assert not busi.participant.calls_to("Confirm", gid)


class XaService:
    """An XA participant over gRPC: its action registers the branch with the coordinator
    (through the same etcd-found client), phase 2 arrives at the phase2 URL."""

    def __init__(self, dtm: DtmGrpcClient) -> None:
        self.dtm = dtm
        self.seen: list[tuple[str, str, str]] = []
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(grpc_branch_handler(self.branch))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("xa.Busi", {"Xa": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def branch(self, request: bytes, branch: BranchInfo) -> bytes:
        self.seen.append((branch.gid, branch.branch_id, branch.op))
        if branch.op == "action":
            if orjson.loads(request).get("refuse"):
                raise TransactionFailed("refused before prepare")
            await register_xa_branch(self.dtm, branch.gid, branch.branch_id, branch.phase2_url)
        return b""


async def test_xa_commit_and_rollback(dtm: DtmGrpcClient, http: Api, stack: Stack) -> None:
    xa = XaService(dtm)
    await xa.server.start()
    publisher = await register_service(stack.etcd.target("xa.rpc"), f"127.0.0.1:{xa.port}")
    url = f"etcd://{stack.etcd.endpoint}/xa.rpc/xa.Busi/Xa"
    try:
        ok, rb = gid_for("e2e-xa"), gid_for("e2e-xa-rb")
        async with xa_global(dtm, ok, WAIT) as tx:
            await tx.call_branch({"amount": 30}, url)
            await tx.call_branch({"amount": 30}, f"127.0.0.1:{xa.port}/xa.Busi/Xa")

        async def refused() -> None:
            async with xa_global(dtm, rb, WAIT) as tx:
                await tx.call_branch({"amount": 30}, url)
                await tx.call_branch({"refuse": True}, url)

        with pytest.raises(TransactionFailed, match="refused before prepare"):
            await refused()
        await http.wait_status(rb, "failed")
        assert sorted(s for s in xa.seen if s[0] == ok) == [
            (ok, "01", "action"), (ok, "01", "commit"), (ok, "02", "action"),
            (ok, "02", "commit")]
        assert sorted(s for s in xa.seen if s[0] == rb) == [
            (rb, "01", "action"), (rb, "01", "rollback"), (rb, "02", "action")]
    finally:
        await publisher.stop()
        await xa.server.stop(None)


async def test_workflow_steps_call_grpc_branches(dtm: DtmGrpcClient, http: Api,
                                                 busi: Busi) -> None:
    registry = WorkflowRegistry(dtm)

    @registry.register("transfer")
    async def transfer(wf: Workflow, data: bytes) -> bytes:
        async def call(url: str, op: str, branch_id: str) -> None:
            await dtm.call_branch(url, body=data.decode(), params={
                "gid": gid, "trans_type": "workflow", "branch_id": branch_id, "op": op})

        await wf.step(lambda bb: call(busi.via_etcd("Out"), "action", bb.branch_id),
                      compensate=lambda bb: call(busi.direct("OutRevert"), "compensate",
                                                 bb.branch_id))
        await wf.step(lambda bb: call(busi.direct(target), "action", bb.branch_id))
        return b"done"

    gid, target = gid_for("e2e-wf"), "In"
    assert await registry.execute("transfer", gid, b'{"amount":30}') == b"done"
    assert (await http.query(gid))["transaction"]["status"] == "succeed"
    assert [c.method for c in busi.participant.calls if c.metadata["dtm-gid"] == gid] == [
        "/busi.Busi/Out", "/busi.Busi/In"]

    gid, target = gid_for("e2e-wf-rb"), "Refuse"
    busi.participant.plan("Refuse", FAILURE)
    with pytest.raises(TransactionFailed, match="business refused"):
        await registry.execute("transfer", gid, b'{"amount":30}')
    await http.wait_status(gid, "failed")
    assert [(c.method, c.op) for c in busi.participant.calls
            if c.metadata["dtm-gid"] == gid] == [
        ("/busi.Busi/Out", "action"), ("/busi.Busi/Refuse", "action"),
        ("/busi.Busi/OutRevert", "compensate")]
