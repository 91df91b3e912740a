"""Branches called over gRPC for transactions whose protocol is grpc, against real
grpc.aio servers: raw bytes in, metadata, status codes as dtm reads them, one channel per
server, msg back-checks, TCC, XA, etcd:// targets resolved through a real etcd, a bad
target refused at submit, and a SIGKILL of the coordinator with gRPC branches in flight.

Transactions are submitted over HTTP with "protocol": "grpc" (payloads as strings)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from coordinator.client import register_service
from coordinator.engine.grpc_caller import GrpcBranchCaller
from coordinator.machines.base import OutcomeKind
from coordinator.model import Branch, Op, Status, Trans
from coordinator.registry.resolver import Resolvers
from tests.etcd_support import EtcdServer
from tests.grpc_participant import (
    ERROR,
    FAILURE,
    OK,
    OLD_ONGOING,
    ONGOING,
    GrpcParticipant,
)
from tests.support import Api, CoordinatorProcess, StoreProbe, free_port, submit_all

# A protobuf-encoded message (field 1 = "hi", field 2 = 42): sent as it is, never re-encoded.
PAYLOAD = "\n\x02hi\x10\x2a"


@pytest.fixture
async def busi() -> AsyncIterator[GrpcParticipant]:
    p = await GrpcParticipant().start()
    yield p
    await p.stop()


@pytest.fixture
async def coord(redis_url: str, prefix: str) -> AsyncIterator[CoordinatorProcess]:
    proc = CoordinatorProcess(redis_url, prefix)
    await proc.start()
    yield proc
    await proc.aclose()


@pytest.fixture
async def api(coord: CoordinatorProcess) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, coord.api)


def grpc_saga(gid: str, busi: GrpcParticipant, steps: int, **options: Any) -> dict[str, Any]:
    return {
        "gid": gid, "trans_type": "saga", "protocol": "grpc",
        "steps": [{"action": busi.url(f"Action{i}"), "compensate": busi.url(f"Compensate{i}")}
                  for i in range(1, steps + 1)],
        "payloads": [PAYLOAD + str(i) for i in range(1, steps + 1)],
        **options,
    }


async def test_saga_branches_get_raw_bytes_and_dtm_metadata(
    api: Api, busi: GrpcParticipant, coord: CoordinatorProcess
) -> None:
    headers = {"authorization": "Bearer abc", "X-Tenant": "t1"}
    status, body = await api.post("submit", grpc_saga("g-ok", busi, 2, branch_headers=headers))
    assert status == 200, body
    await api.wait_status("g-ok", "succeed")
    (one,), (two,) = busi.calls_to("Action1"), busi.calls_to("Action2")
    assert one.body == (PAYLOAD + "1").encode()
    assert two.body == (PAYLOAD + "2").encode()
    assert one.started < two.started
    grpc_port = coord.grpc_port
    assert one.metadata["dtm-gid"] == "g-ok"
    assert one.metadata["dtm-trans_type"] == "saga"
    assert one.metadata["dtm-branch_id"] == "01"
    assert two.metadata["dtm-branch_id"] == "02"
    assert one.metadata["dtm-op"] == "action"
    assert one.metadata["dtm-dtm"] == f"127.0.0.1:{grpc_port}"
    assert one.metadata["authorization"] == "Bearer abc"
    assert one.metadata["x-tenant"] == "t1"  # gRPC metadata keys are lower case
    assert not busi.calls_to("Compensate1")
    trans = (await api.query("g-ok"))["transaction"]
    assert trans["protocol"] == "grpc"


async def test_saga_rollback_compensates_the_failed_step_too(
    api: Api, busi: GrpcParticipant
) -> None:
    busi.plan("Action2", FAILURE)
    assert (await api.post("submit", grpc_saga("g-rb", busi, 3)))[0] == 200
    await api.wait_status("g-rb", "failed")
    assert len(busi.calls_to("Action2")) == 1  # ABORTED is a failure: not retried
    assert not busi.calls_to("Action3")
    comps = [c for c in busi.calls if c.op == "compensate"]
    assert [c.method for c in comps] == ["/busi.Busi/Compensate2", "/busi.Busi/Compensate1"]
    assert comps[0].body == (PAYLOAD + "2").encode()
    trans = (await api.query("g-rb"))["transaction"]
    assert "business refused" in trans["rollback_reason"]


async def test_ongoing_and_errors_are_retried(api: Api, busi: GrpcParticipant) -> None:
    busi.plan("Action1", ONGOING, OLD_ONGOING, OK)
    busi.plan("Action2", ERROR, (grpc.StatusCode.INTERNAL, "boom"), OK)
    assert (await api.post("submit", grpc_saga("g-retry", busi, 2, retry_interval=1)))[0] == 200
    await api.wait_status("g-retry", "succeed", timeout=30)
    assert [str(c.code) for c in busi.calls_to("Action1")] == [
        "StatusCode.FAILED_PRECONDITION", "StatusCode.ABORTED", "StatusCode.OK"]
    assert [str(c.code) for c in busi.calls_to("Action2")] == [
        "StatusCode.UNAVAILABLE", "StatusCode.INTERNAL", "StatusCode.OK"]
    assert not [c for c in busi.calls if c.op == "compensate"]  # ONGOING is not a failure


async def test_request_timeout_is_the_deadline(api: Api, busi: GrpcParticipant) -> None:
    busi.slow("Action1", 10)
    assert (await api.post("submit", grpc_saga("g-slow", busi, 1, request_timeout=1)))[0] == 200
    await api.wait_status("g-slow", "succeed", timeout=20)
    first, second = busi.calls_to("Action1")
    assert first.cancelled_after is not None
    assert 0.8 < first.cancelled_after < 2.0  # the deadline, not the engine's 3 s default
    assert second.code == grpc.StatusCode.OK


async def test_concurrent_sagas_share_one_channel(api: Api, busi: GrpcParticipant) -> None:
    gids = [f"g-many-{i}" for i in range(40)]
    await submit_all(api.session, api.api, [grpc_saga(g, busi, 2) for g in gids], parallel=20)
    for gid in gids:
        await api.wait_status(gid, "succeed")
    assert len(busi.calls_to("Action1")) == 40
    assert len(busi.calls_to("Action2")) == 40
    assert len(busi.peers) == 1  # one connection for every call to this server


async def test_msg_back_check_over_grpc(api: Api, busi: GrpcParticipant) -> None:
    def msg(gid: str, check: str) -> dict[str, Any]:
        return {"gid": gid, "trans_type": "msg", "protocol": "grpc",
                "steps": [{"action": busi.url("MsgAction")}], "payloads": [PAYLOAD],
                "query_prepared": busi.url(check), "timeout_to_fail": 1}

    assert (await api.post("prepare", msg("g-msg-yes", "CheckYes")))[0] == 200
    busi.plan("CheckNo", FAILURE)
    assert (await api.post("prepare", msg("g-msg-no", "CheckNo")))[0] == 200
    await api.wait_status("g-msg-yes", "succeed", timeout=20)
    await api.wait_status("g-msg-no", "failed", timeout=20)
    (check,) = busi.calls_to("CheckYes")
    assert check.body == b""
    assert check.metadata["dtm-branch_id"] == "00"
    assert check.metadata["dtm-op"] == "msg"
    assert check.metadata["dtm-trans_type"] == "msg"
    assert [c.body for c in busi.calls_to("MsgAction")] == [PAYLOAD.encode()]


async def test_tcc_confirm_and_cancel(api: Api, busi: GrpcParticipant) -> None:
    for gid, finish in (("g-tcc-ok", "submit"), ("g-tcc-no", "abort")):
        body = {"gid": gid, "trans_type": "tcc", "protocol": "grpc"}
        assert (await api.post("prepare", body))[0] == 200
        status, reply = await api.post("registerBranch", {
            "gid": gid, "branch_id": "01", "trans_type": "tcc", "data": PAYLOAD,
            "confirm": busi.url("Confirm"), "cancel": busi.url("Cancel")})
        assert status == 200, reply
        assert (await api.post(finish, body))[0] == 200
    await api.wait_status("g-tcc-ok", "succeed")
    await api.wait_status("g-tcc-no", "failed")
    (confirm,) = busi.calls_to("Confirm")
    (cancel,) = busi.calls_to("Cancel")
    assert confirm.metadata["dtm-gid"] == "g-tcc-ok"
    assert confirm.metadata["dtm-op"] == "confirm"
    assert confirm.body == PAYLOAD.encode()
    assert cancel.metadata["dtm-gid"] == "g-tcc-no"
    assert cancel.metadata["dtm-op"] == "cancel"


async def test_xa_phase2_carries_its_url(api: Api, busi: GrpcParticipant) -> None:
    for gid, finish in (("g-xa-ok", "submit"), ("g-xa-no", "abort")):
        body = {"gid": gid, "trans_type": "xa", "protocol": "grpc"}
        assert (await api.post("prepare", body))[0] == 200
        assert (await api.post("registerBranch", {
            "gid": gid, "branch_id": "01", "trans_type": "xa", "url": busi.url("XaPhase2"),
            "data": PAYLOAD}))[0] == 200
        assert (await api.post(finish, body))[0] == 200
    await api.wait_status("g-xa-ok", "succeed")
    await api.wait_status("g-xa-no", "failed")
    ops = {c.metadata["dtm-gid"]: c for c in busi.calls_to("XaPhase2")}
    assert ops["g-xa-ok"].op == "commit"
    assert ops["g-xa-no"].op == "rollback"
    assert ops["g-xa-ok"].metadata["dtm-phase2_url"] == busi.url("XaPhase2")
    assert ops["g-xa-ok"].metadata["dtm-trans_type"] == "xa"


async def test_etcd_targets_are_resolved_through_etcd(
    api: Api, etcd: EtcdServer
) -> None:
    first, second = await GrpcParticipant().start(), await GrpcParticipant().start()
    publishers = [await register_service(etcd.target("trans.rpc"), p.address)
                  for p in (first, second)]
    try:
        for publisher in publishers:
            assert publisher.registered.is_set()

        def saga(gid: str) -> dict[str, Any]:
            url = f"etcd://{etcd.endpoint}/trans.rpc/busi.Busi/TransOut"
            return {"gid": gid, "trans_type": "saga", "protocol": "grpc", "payloads": [PAYLOAD],
                    "steps": [{"action": url, "compensate": url.replace("Out", "OutRevert")}]}

        gids = [f"g-etcd-{i}" for i in range(6)]
        await submit_all(api.session, api.api, [saga(g) for g in gids[:3]], parallel=1)
        for gid in gids[:3]:
            await api.wait_status(gid, "succeed")
        # Spread over both registered services.
        assert first.calls_to("TransOut")
        assert second.calls_to("TransOut")
        # One stops: its key is revoked and every later call goes to the other.
        await publishers[0].stop()
        await first.stop()
        await asyncio.sleep(0.5)
        before = len(second.calls_to("TransOut"))
        await submit_all(api.session, api.api, [saga(g) for g in gids[3:]], parallel=1)
        for gid in gids[3:]:
            await api.wait_status(gid, "succeed")
        assert len(second.calls_to("TransOut")) == before + 3
    finally:
        for publisher in publishers:
            await publisher.stop()
        await first.stop()
        await second.stop()


@pytest.mark.parametrize("url", [
    "127.0.0.1:5000",  # no method
    "127.0.0.1:5000/NoService",
    "etcd://127.0.0.1:2379/trans.rpc",  # a key but no method
    "ftp://127.0.0.1:5000/busi.Busi/Action",
])
async def test_a_bad_grpc_target_is_refused_at_submit(api: Api, url: str) -> None:
    body = {"gid": "g-bad", "trans_type": "saga", "protocol": "grpc",
            "steps": [{"action": url, "compensate": ""}], "payloads": [""]}
    status, reply = await api.post("submit", body)
    assert status == 400, reply
    assert (await api.query("g-bad"))["transaction"] is None
    # The same URL over HTTP is not a gRPC target and is not checked as one.
    body["protocol"] = "http"
    body["steps"] = [{"action": "http://127.0.0.1:1/x", "compensate": ""}]
    assert (await api.post("submit", body))[0] == 200
    # Metadata gRPC cannot send is refused too.
    good = {**body, "gid": "g-bad-header", "protocol": "grpc",
            "steps": [{"action": "127.0.0.1:5000/busi.Busi/Action", "compensate": ""}]}
    status, reply = await api.post("submit", {**good, "branch_headers": {"x-name": "Zoë"}})
    assert status == 400, reply
    assert "branch_headers" in str(reply)
    # A TCC branch registered with such a URL is refused as well.
    tcc = {"gid": "g-bad-tcc", "trans_type": "tcc", "protocol": "grpc"}
    assert (await api.post("prepare", tcc))[0] == 200
    status, reply = await api.post("registerBranch", {
        "gid": "g-bad-tcc", "branch_id": "01", "trans_type": "tcc", "confirm": url,
        "cancel": "127.0.0.1:5000/busi.Busi/Cancel"})
    assert status == 400, reply
    assert (await api.query("g-bad-tcc"))["branches"] == []


async def test_sigkill_with_grpc_branches_in_flight(redis_url: str, prefix: str) -> None:
    busi = await GrpcParticipant(delay=0.3).start()
    env = {"COORDINATOR_ENGINE_LEASE_SECONDS": "5", "COORDINATOR_SERVER_GRPC_PORT": free_port()}
    first = CoordinatorProcess(redis_url, prefix, **env)
    second = CoordinatorProcess(redis_url, prefix, **env)
    probe = StoreProbe(redis_url, prefix)
    gids = [f"g-kill-{i:02d}" for i in range(40)]
    failing = set(gids[::4])
    try:
        await first.start()
        bodies = []
        for gid in gids:
            body = grpc_saga(gid, busi, 3)
            if gid in failing:  # refused at step 2 by a method of its own
                body["steps"][1]["action"] = busi.url("Refuse")
            bodies.append(body)
        busi.plan("Refuse", FAILURE)
        async with aiohttp.ClientSession() as session:
            await submit_all(session, first.api, bodies)
        await asyncio.sleep(0.5)
        first.kill(signal.SIGKILL)
        at_kill = await probe.statuses(gids)
        assert any(s in ("submitted", "aborting") for s in at_kill.values()), at_kill
        await second.start()
        final = await probe.wait_final(gids, 60)
        assert {g for g, s in final.items() if s == "failed"} == failing
        for gid in gids:
            ops = {(c.metadata["dtm-branch_id"], c.op) for c in busi.calls
                   if c.metadata["dtm-gid"] == gid and c.code == grpc.StatusCode.OK}
            if gid in failing:
                assert ops == {("01", "action"), ("02", "compensate"), ("01", "compensate")}
            else:
                assert ops == {("01", "action"), ("02", "action"), ("03", "action")}
    finally:
        first.kill(signal.SIGKILL)
        await second.aclose()
        await probe.close()
        await busi.stop()


async def test_caller_follows_the_registry_and_closes_channels_of_endpoints_gone(
    etcd: EtcdServer,
) -> None:
    """In-process: the caller's view of an etcd key, without a coordinator around it."""
    resolvers = Resolvers()
    caller = GrpcBranchCaller(3, resolvers, "127.0.0.1:36790")
    trans = Trans("g-direct", "saga", Status.SUBMITTED, protocol="grpc")
    branch = Branch("01", Op.ACTION, f"etcd://{etcd.endpoint}/trans.rpc/busi.Busi/TransOut")
    first, second = await GrpcParticipant().start(), await GrpcParticipant().start()
    try:
        nobody = await caller.call(trans, branch, b"x")
        assert nobody.kind is OutcomeKind.ERROR
        assert "no endpoint registered" in nobody.message
        one = await register_service(etcd.target("trans.rpc"), first.address)
        two = await register_service(etcd.target("trans.rpc"), second.address)
        resolver = resolvers.get(f"etcd://{etcd.endpoint}/trans.rpc")
        assert await resolver.wait_for(lambda e: len(e) == 2, 5)
        for _ in range(4):
            assert (await caller.call(trans, branch, b"x")).kind is OutcomeKind.SUCCESS
        assert sorted(caller.addresses) == sorted([first.address, second.address])
        assert len(first.calls) == len(second.calls) == 2  # round-robin
        await one.stop()
        assert await resolver.wait_for(lambda e: e == (second.address,), 5)
        assert (await caller.call(trans, branch, b"x")).kind is OutcomeKind.SUCCESS
        assert caller.addresses == (second.address,)
        assert len(second.calls) == 3
        await two.stop()
    finally:
        await caller.close()
        await resolvers.close()
        await first.stop()
        await second.stop()
