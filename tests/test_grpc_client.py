"""The SDK over gRPC (DtmGrpcClient) and gRPC branch handlers, against a real coordinator.

The coordinator calls HTTP branches here (gRPC branch calls by the engine are tested
with the engine's caller); the SDK's own branch calls (TCC try) go over gRPC to a
grpc.aio service that uses the barrier on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from aiohttp import web

from coordinator.client import (
    BranchCallError,
    BranchInfo,
    CoordinatorUnavailable,
    DtmClient,
    DtmGrpcClient,
    Msg,
    PostgresBarrier,
    RequestRejected,
    Saga,
    TransactionFailed,
    TransactionOngoing,
    TransOptions,
    WorkflowRegistry,
    branch_handler,
    grpc_branch_handler,
    new_gid,
    register_service,
    register_xa_branch,
    tcc_global,
    xa_global,
)
from coordinator.client.grpc_client import split_grpc_url
from tests.etcd_support import EtcdServer
from tests.support import FAIL, AppServer, CoordinatorProcess, Participant, free_port
from tests.test_client import final_status, gid_for, of
from tests.test_workflow_client import Ledger, three_steps


@pytest.fixture
async def dtm(shared_coordinator: CoordinatorProcess) -> AsyncIterator[DtmGrpcClient]:
    async with DtmGrpcClient(f"127.0.0.1:{shared_coordinator.grpc_port}") as client:
        yield client


@pytest.fixture
async def http(shared_coordinator: CoordinatorProcess) -> AsyncIterator[DtmClient]:
    async with DtmClient(shared_coordinator.api) as client:
        yield client


class TransOutService:
    """A grpc.aio service `pb.Trans` whose TransOutTry debits behind the PG barrier."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.barrier = PostgresBarrier(pool)
        self.seen: list[BranchInfo] = []
        self.port = free_port()
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(grpc_branch_handler(self.trans_out))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("pb.Trans", {"TransOutTry": handler})]
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def url(self, method: str = "TransOutTry") -> str:
        return f"127.0.0.1:{self.port}/pb.Trans/{method}"

    async def trans_out(self, request: bytes, branch: BranchInfo) -> bytes:
        self.seen.append(branch)
        body = orjson.loads(request)
        if body.get("refuse"):
            raise TransactionFailed("insufficient balance")
        if body.get("later"):
            raise TransactionOngoing("not yet")

        async def debit(conn: Any) -> None:
            await conn.execute("INSERT INTO sdk_grpc_ledger (id, amount) VALUES ($1, $2)",
                               f"{branch.gid}-{branch.branch_id}", body["amount"])

        await branch.barrier().call(self.barrier, debit)
        return b'{"debited":true}'

    async def rows(self, gid: str) -> list[int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT amount FROM sdk_grpc_ledger WHERE id LIKE $1 "
                                    "ORDER BY id", f"{gid}-%")
        return [r["amount"] for r in rows]


@pytest.fixture
async def trans_out(pg_pool: Any) -> AsyncIterator[TransOutService]:
    async with pg_pool.acquire() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS sdk_grpc_ledger "
                           "(id text PRIMARY KEY, amount bigint NOT NULL)")
    service = TransOutService(pg_pool)
    await service.server.start()
    yield service
    await service.server.stop(None)


async def test_new_gid_and_what_grpc_does_not_have(dtm: DtmGrpcClient) -> None:
    a, b = await new_gid(dtm), await new_gid(dtm)
    assert len(a) == 22
    assert a != b
    with pytest.raises(RequestRejected, match="HTTP API"):
        await dtm.query(a)


async def test_saga_success_and_rollback(
    dtm: DtmGrpcClient, http: DtmClient, participant: Participant
) -> None:
    gid = gid_for("gsaga-ok")
    saga = Saga(dtm, gid, TransOptions(wait_result=True, branch_headers={"X-Trace": "t1"}))
    saga.add(participant.url("a1"), participant.url("c1"), {"amount": 30})
    saga.add(participant.url("a2"), participant.url("c2"), "é raw")
    await saga.submit()
    calls = of(participant, gid)
    assert [c.path for c in calls] == ["/a1", "/a2"]
    assert orjson.loads(calls[0].body) == {"amount": 30}
    assert calls[1].body == "é raw"  # the UTF-8 bytes went through unchanged
    assert calls[0].headers.get("X-Trace") == "t1"
    assert (await http.query(gid))["transaction"]["protocol"] == "grpc"

    gid = gid_for("gsaga-rb")
    participant.plan_for(gid, "a2", FAIL)
    saga = Saga(dtm, gid, TransOptions(wait_result=True))
    for i in (1, 2):
        saga.add(participant.url(f"a{i}"), participant.url(f"c{i}"), {"step": i})
    with pytest.raises(TransactionFailed, match="business refused"):
        await saga.submit()
    assert [c.path for c in of(participant, gid)] == ["/a1", "/a2", "/c2", "/c1"]


async def test_concurrent_saga(dtm: DtmGrpcClient, http: DtmClient,
                               participant: Participant) -> None:
    gid = gid_for("gsaga-conc")
    saga = Saga(dtm, gid, TransOptions(wait_result=True))
    for i in (1, 2, 3):
        saga.add(participant.url(f"a{i}"), participant.url(f"c{i}"), {"step": i})
    saga.add_order(2, [0, 1])
    await saga.submit()
    paths = [c.path for c in of(participant, gid)]
    assert sorted(paths[:2]) == ["/a1", "/a2"]
    assert paths[2] == "/a3"


async def test_msg_prepare_submit_and_abort(
    dtm: DtmGrpcClient, http: DtmClient, participant: Participant
) -> None:
    gid = gid_for("gmsg")
    msg = Msg(dtm, gid, TransOptions(wait_result=True)).add(participant.url("m1"), {"n": 1})
    await msg.prepare(participant.url("qp"))
    await msg.submit()
    assert [c.body for c in of(participant, gid)] == ['{"n":1}']
    gid = gid_for("gmsg-abort")
    msg = Msg(dtm, gid).add(participant.url("m1"), {"n": 2})
    await msg.prepare(participant.url("qp"))
    await msg.abort()
    assert await final_status(http, gid) == "failed"
    assert of(participant, gid) == []


async def test_tcc_try_over_grpc_with_the_pg_barrier(
    dtm: DtmGrpcClient, http: DtmClient, participant: Participant,
    trans_out: TransOutService,
) -> None:
    gid = gid_for("gtcc-ok")
    async with tcc_global(dtm, gid) as tcc:
        reply = await tcc.call_branch({"amount": 30}, trans_out.url(),
                                      participant.url("confirm"), participant.url("cancel"))
        assert reply.json() == {"debited": True}
    assert await final_status(http, gid) == "succeed"
    [seen] = trans_out.seen
    assert (seen.gid, seen.trans_type, seen.branch_id, seen.op) == (gid, "tcc", "01", "try")
    assert seen.dtm == dtm.target
    assert [c.path for c in of(participant, gid)] == ["/confirm"]
    assert await trans_out.rows(gid) == [30]
    # The same try again (a retry): the barrier skips it, nothing is debited twice.
    await dtm.call_branch(trans_out.url(), body='{"amount":30}', params={
        "gid": gid, "trans_type": "tcc", "branch_id": "01", "op": "try"})
    assert await trans_out.rows(gid) == [30]


async def test_tcc_try_refused_is_aborted_and_cancels(
    dtm: DtmGrpcClient, http: DtmClient, participant: Participant,
    trans_out: TransOutService,
) -> None:
    gid = gid_for("gtcc-rb")
    with pytest.raises(TransactionFailed, match="insufficient balance"):
        async with tcc_global(dtm, gid) as tcc:
            await tcc.call_branch({"amount": 30, "refuse": True}, trans_out.url(),
                                  participant.url("confirm"), participant.url("cancel"))
    assert await final_status(http, gid) == "failed"
    assert [c.path for c in of(participant, gid)] == ["/cancel"]
    assert await trans_out.rows(gid) == []


async def test_grpc_branch_answers(dtm: DtmGrpcClient, trans_out: TransOutService) -> None:
    params = {"gid": gid_for("gb"), "trans_type": "saga", "branch_id": "01", "op": "action"}
    with pytest.raises(TransactionOngoing, match="not yet"):
        await dtm.call_branch(trans_out.url(), body='{"later":true}', params=params)
    with pytest.raises(BranchCallError, match="INVALID_ARGUMENT"):  # no dtm-* metadata
        await dtm.call_branch(trans_out.url(), body='{"amount":1}', params={})
    with pytest.raises(BranchCallError, match="UNIMPLEMENTED"):
        await dtm.call_branch(trans_out.url("Nope"), body="{}", params=params)
    # Raw channel: the codes a coordinator sees.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{trans_out.port}") as ch:
        call = ch.unary_unary("/pb.Trans/TransOutTry")
        md = [(f"dtm-{k}", v) for k, v in params.items()]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b'{"refuse":true}', metadata=md)
        assert info.value.code() == grpc.StatusCode.ABORTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b'{"later":true}', metadata=md)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_xa_registers_over_grpc(
    dtm: DtmGrpcClient, http: DtmClient, participant: Participant
) -> None:
    """An XA participant registers its branch through the gRPC client."""
    ops: list[str] = []

    async def xa(request: web.Request, branch: BranchInfo) -> None:
        ops.append(branch.op)
        if branch.op == "action":
            await register_xa_branch(dtm, branch.gid, branch.branch_id, branch.phase2_url)

    app = web.Application()
    app.router.add_post("/xa", branch_handler(xa))
    server = await AppServer(app).start()
    try:
        gid = gid_for("gxa")
        async with xa_global(dtm, gid) as tx:
            await tx.call_branch({"amount": 30}, server.url("xa"))
        assert await final_status(http, gid) == "succeed"
        assert ops == ["action", "commit"]
    finally:
        await server.stop()


async def test_workflow(dtm: DtmGrpcClient, http: DtmClient) -> None:
    registry, ledger = WorkflowRegistry(dtm, "http://127.0.0.1:9/x"), Ledger()
    three_steps(registry, ledger)
    gid = gid_for("gwf")
    result = await registry.execute("transfer", gid, b'{"amount": 30}')
    assert orjson.loads(result)["input"] == {"amount": 30}
    assert ledger.order == ["a", "b", "c"]
    reply = await http.query(gid)
    assert reply["transaction"]["status"] == "succeed"
    assert reply["transaction"]["protocol"] == "grpc"
    # Executing it again reads the outcome back over gRPC and runs nothing.
    assert await registry.execute("transfer", gid, b'{"amount": 30}') == result
    assert ledger.order == ["a", "b", "c"]


def test_branch_urls() -> None:
    assert split_grpc_url("127.0.0.1:9/pb.Trans/TransOut") == ("127.0.0.1:9", "/pb.Trans/TransOut")
    assert split_grpc_url("etcd://h1:2379,h2:2379/trans.rpc/pb.Trans/TransOut") == (
        "etcd://h1:2379,h2:2379/trans.rpc", "/pb.Trans/TransOut")
    for bad in ("127.0.0.1:9", "127.0.0.1:9/pb.Trans", "etcd://h:1/pb.T/M", "/pb.T/M"):
        with pytest.raises(ValueError, match="not a gRPC branch URL"):
            split_grpc_url(bad)


async def test_client_finds_the_coordinator_through_etcd(
    shared_coordinator: Any, etcd: EtcdServer
) -> None:
    """go-zero's way: the coordinator's address is read from etcd, not configured."""
    target = etcd.target("dtmservice")
    async with DtmGrpcClient(target) as client:
        with pytest.raises(CoordinatorUnavailable, match="no endpoint"):
            await new_gid(client)
    publisher = await register_service(target, f"127.0.0.1:{shared_coordinator.grpc_port}")
    try:
        async with DtmGrpcClient(target) as client:
            assert await new_gid(client)
    finally:
        await publisher.stop()


async def test_a_resolver_can_be_passed(shared_coordinator: Any) -> None:
    async def resolver(target: str) -> list[str]:
        assert target == "etcd://127.0.0.1:1/dtmservice"
        return [f"127.0.0.1:{shared_coordinator.grpc_port}"]

    async with DtmGrpcClient("etcd://127.0.0.1:1/dtmservice", resolver=resolver) as client:
        assert await new_gid(client)
