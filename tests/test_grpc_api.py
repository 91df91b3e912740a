"""dtm's gRPC API (dtmgimp.Dtm) against a real `coordinator serve`, over loopback gRPC."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import empty_pb2

from coordinator.dtmgpb import dtmgimp_pb2 as pb
from coordinator.dtmgpb import dtmgimp_pb2_grpc as pb_grpc
from tests.support import ONGOING, Api, CoordinatorProcess, Participant, drop_keys, wait_for

FAIL_409 = (409, '{"dtm_result":"FAILURE","message":"no stock"}')


@pytest.fixture(scope="module")
def grpc_coordinator(redis_url: str) -> Iterator[CoordinatorProcess]:
    name = "g" + uuid.uuid4().hex[:10]
    # A short wait_result limit, so an ongoing saga answers within the test.
    proc = asyncio.run(CoordinatorProcess(
        redis_url, name, COORDINATOR_SERVER_WAIT_RESULT_TIMEOUT=1
    ).start())
    yield proc
    proc.stop()
    drop_keys(redis_url, name)


@pytest.fixture
async def stub(grpc_coordinator: CoordinatorProcess) -> AsyncIterator[pb_grpc.DtmStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_coordinator.grpc_port}") as ch:
        yield pb_grpc.DtmStub(ch)


@pytest.fixture
def http(session: Any, grpc_coordinator: CoordinatorProcess) -> Api:
    return Api(session, grpc_coordinator.api)


def gid() -> str:
    return "grpc-" + uuid.uuid4().hex[:12]


def saga(g: str, participant: Participant, *paths: str, wait: bool = False,
         payload: bytes = b'{"amount":30}') -> pb.DtmRequest:
    steps = [{"action": participant.url(p), "compensate": participant.url(p + "-undo")}
             for p in paths]
    return pb.DtmRequest(
        Gid=g, TransType="saga", Steps=orjson.dumps(steps).decode(),
        BinPayloads=[payload] * len(paths),
        TransOptions=pb.DtmTransOptions(WaitResult=wait, RetryInterval=1),
    )


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), str(info.value.details())


async def query(http: Api, g: str) -> dict[str, Any]:
    return await http.query(g)


async def status_of(http: Api, g: str) -> str:
    trans = (await query(http, g))["transaction"]
    return str(trans["status"]) if trans else ""


async def test_new_gid(stub: pb_grpc.DtmStub) -> None:
    a = await stub.NewGid(empty_pb2.Empty())
    b = await stub.NewGid(empty_pb2.Empty())
    assert len(a.Gid) == 22
    assert a.Gid != b.Gid


async def test_saga_with_http_branches_finishes_and_shows_protocol_grpc(
    stub: pb_grpc.DtmStub, participant: Participant, http: Api
) -> None:
    g = gid()
    await stub.Submit(saga(g, participant, "out", "in", wait=True))
    assert await status_of(http, g) == "succeed"
    assert [c.path for c in participant.calls if c.query.get("gid") == g] == ["/out", "/in"]
    assert participant.calls_to("out", g)[0].body == '{"amount":30}'
    result = await query(http, g)
    assert result["transaction"]["protocol"] == "grpc"
    _, listed = await http.get("all", gid=g)
    assert listed["transactions"][0]["protocol"] == "grpc"


async def test_wait_result_failure_is_aborted_with_the_reason(
    stub: pb_grpc.DtmStub, participant: Participant, http: Api
) -> None:
    g = gid()
    participant.plan_for(g, "in", FAIL_409)
    code, details = await code_of(stub.Submit(saga(g, participant, "out", "in", wait=True)))
    assert code == grpc.StatusCode.ABORTED
    assert "no stock" in details
    assert await status_of(http, g) == "failed"
    # The failed step's compensation is called too, then the earlier one's.
    undo = [c.path for c in participant.calls if c.query.get("gid") == g and "undo" in c.path]
    assert undo == ["/in-undo", "/out-undo"]


async def test_wait_result_ongoing_is_failed_precondition(
    stub: pb_grpc.DtmStub, participant: Participant
) -> None:
    g = gid()
    participant.plan_for(g, "slow", ONGOING)
    code, _ = await code_of(stub.Submit(saga(g, participant, "slow", wait=True)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_bin_payloads_are_kept_byte_exact(stub: pb_grpc.DtmStub, http: Api) -> None:
    """Raw bytes that are not UTF-8 come back unchanged (query shows them as base64)."""
    g = gid()
    raw = bytes(range(256))
    await stub.Prepare(pb.DtmRequest(
        Gid=g, TransType="msg", Steps='[{"action":"127.0.0.1:1/pb.Svc/Do"}]',
        BinPayloads=[raw], QueryPrepared="127.0.0.1:1/pb.Svc/Query",
    ))
    branches = (await query(http, g))["branches"]
    assert base64.b64decode(branches[0]["bin_data"]) == raw
    await stub.Abort(pb.DtmRequest(Gid=g, TransType="msg"))
    assert await status_of(http, g) == "failed"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.DtmRequest(Gid="", TransType="saga", Steps="[]"), "gid"),
        (pb.DtmRequest(Gid="has space", TransType="saga"), "gid"),
        (pb.DtmRequest(Gid="g-bad-type", TransType="nope"), "trans_type"),
        (pb.DtmRequest(Gid="g-bad-steps", TransType="saga", Steps="[{"), "Steps"),
        (pb.DtmRequest(Gid="g-bad-count", TransType="saga",
                       Steps='[{"action":"a:1/p.S/M","compensate":""}]'), "payloads"),
        (pb.DtmRequest(Gid="g-neg", TransType="saga", Steps="null",
                       TransOptions=pb.DtmTransOptions(TimeoutToFail=-1)), "timeout_to_fail"),
        (pb.DtmRequest(Gid="g-empty-saga", TransType="saga", Steps="null"), "steps"),
    ],
)
async def test_bad_input_is_invalid_argument(
    stub: pb_grpc.DtmStub, request_: pb.DtmRequest, field: str
) -> None:
    request_.BinPayloads.extend([] if field != "payloads" else [b"a", b"b"])
    code, details = await code_of(stub.Submit(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details


@pytest.mark.parametrize("method", ["NewGid", "Submit", "RegisterBranch", "DeleteTopic"])
async def test_corrupt_message_is_invalid_argument(
    grpc_coordinator: CoordinatorProcess, stub: pb_grpc.DtmStub, method: str
) -> None:
    # Bytes that are no protobuf at all (a field tag with wire type 7) are the caller's
    # mistake: INVALID_ARGUMENT, as any other bad input, not grpcio's UNKNOWN.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_coordinator.grpc_port}") as ch:
        raw = ch.unary_unary(f"/dtmgimp.Dtm/{method}")
        code, details = await code_of(raw(b"\x8f\xff"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid" in details
    assert (await stub.NewGid(empty_pb2.Empty())).Gid


async def test_unknown_gid_is_not_found(stub: pb_grpc.DtmStub) -> None:
    code, _ = await code_of(stub.Abort(pb.DtmRequest(Gid=gid(), TransType="tcc")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await code_of(stub.DeleteTopic(pb.DtmTopicRequest(Topic="no-" + gid())))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_tcc_with_steps_null_confirm_and_cancel(
    stub: pb_grpc.DtmStub, participant: Participant, http: Api
) -> None:
    """dtm's Go client sends Steps "null" on prepare, submit and abort of a TCC."""
    for end in ("submit", "abort"):
        g = gid()
        await stub.Prepare(pb.DtmRequest(Gid=g, TransType="tcc", Steps="null"))
        await stub.RegisterBranch(pb.DtmBranchRequest(
            Gid=g, TransType="tcc", BranchID="01", Op="try", BusiPayload=b'{"n":1}',
            Data={"confirm": participant.url("confirm"), "cancel": participant.url("cancel")},
        ))
        request = pb.DtmRequest(Gid=g, TransType="tcc", Steps="null",
                                TransOptions=pb.DtmTransOptions(WaitResult=True))
        if end == "submit":
            await stub.Submit(request)
            assert await status_of(http, g) == "succeed"
            assert participant.calls_to("confirm", g)[0].body == '{"n":1}'
        else:
            await stub.Abort(request)
            await wait_for(lambda g=g: _is(http, g, "failed"), 10, what="cancelled")
            assert len(participant.calls_to("cancel", g)) == 1


async def _is(http: Api, g: str, status: str) -> bool:
    return await status_of(http, g) == status


async def test_register_branch_on_unknown_gid_is_aborted(stub: pb_grpc.DtmStub) -> None:
    code, _ = await code_of(stub.RegisterBranch(pb.DtmBranchRequest(
        Gid=gid(), TransType="tcc", BranchID="01", Op="try",
    )))
    assert code == grpc.StatusCode.ABORTED


async def test_prepare_workflow_register_and_submit(stub: pb_grpc.DtmStub, http: Api) -> None:
    g = gid()
    request = pb.DtmRequest(Gid=g, TransType="workflow", QueryPrepared="http://127.0.0.1:1/wf",
                            CustomedData='{"name":"wf"}')
    first = await stub.PrepareWorkflow(request)
    assert (first.Transaction.Gid, first.Transaction.Status) == (g, "prepared")
    assert list(first.Progresses) == []
    await stub.RegisterBranch(pb.DtmBranchRequest(
        Gid=g, TransType="workflow", BranchID="01", BusiPayload=b"\x00\xffout",
        Data={"op": "action", "status": "succeed"},
    ))
    again = await stub.PrepareWorkflow(request)
    [progress] = again.Progresses
    assert (progress.BranchID, progress.Op, progress.Status) == ("01", "action", "succeed")
    assert progress.BinData == b"\x00\xffout"
    await stub.Submit(pb.DtmRequest(Gid=g, TransType="workflow", ReqExtra={"status": "succeed"}))
    assert await status_of(http, g) == "succeed"
    code, _ = await code_of(stub.PrepareWorkflow(pb.DtmRequest(Gid=gid(), TransType="saga")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_topics(stub: pb_grpc.DtmStub, participant: Participant, http: Api) -> None:
    topic = "t-" + gid()
    url = participant.url("sub")
    await stub.Subscribe(pb.DtmTopicRequest(Topic=topic, URL=url, Remark="r"))
    code, _ = await code_of(stub.Subscribe(pb.DtmTopicRequest(Topic=topic, URL=url)))
    assert code == grpc.StatusCode.ABORTED  # already subscribed, as over HTTP
    g = gid()
    await stub.Submit(pb.DtmRequest(Gid=g, TransType="msg", BinPayloads=[b'{"x":1}'],
                                    Steps=orjson.dumps([{"action": "topic://" + topic}]).decode(),
                                    TransOptions=pb.DtmTransOptions(WaitResult=True)))
    assert participant.calls_to("sub", g)[0].body == '{"x":1}'
    await stub.Unsubscribe(pb.DtmTopicRequest(Topic=topic, URL=url))
    code, _ = await code_of(stub.Subscribe(pb.DtmTopicRequest(Topic="", URL=url)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await stub.Subscribe(pb.DtmTopicRequest(Topic=topic, URL=url))
    await stub.DeleteTopic(pb.DtmTopicRequest(Topic=topic))
    _, kv = await http.get("queryKV", cat="topics", key=topic)
    assert kv["kv"] == []


async def test_token_is_required_as_metadata(redis_url: str, prefix: str) -> None:
    proc = await CoordinatorProcess(
        redis_url, prefix, COORDINATOR_SERVER_API_TOKEN="s3cret",
        COORDINATOR_SERVER_PROTECT_TRANSACTION_ROUTES="true",
    ).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as ch:
            stub = pb_grpc.DtmStub(ch)
            code, _ = await code_of(stub.NewGid(empty_pb2.Empty()))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = await code_of(stub.NewGid(
                empty_pb2.Empty(), metadata=(("authorization", "Bearer wrong"),)))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.NewGid(empty_pb2.Empty(),
                                      metadata=(("authorization", "Bearer s3cret"),))
            assert reply.Gid
    finally:
        await proc.aclose()


async def test_topic_rpcs_need_the_token_like_the_operator_routes(
    redis_url: str, prefix: str
) -> None:
    """Transaction RPCs stay open (dtm's clients send no token); the topic RPCs are the
    HTTP API's operator routes and need the token once one is set."""
    proc = await CoordinatorProcess(
        redis_url, prefix, COORDINATOR_SERVER_API_TOKEN="s3cret"
    ).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as ch:
            stub = pb_grpc.DtmStub(ch)
            assert (await stub.NewGid(empty_pb2.Empty())).Gid
            topic = pb.DtmTopicRequest(Topic=f"{prefix}-t", URL="http://127.0.0.1:9/s")
            for call in (stub.Subscribe, stub.Unsubscribe, stub.DeleteTopic):
                code, _ = await code_of(call(topic))
                assert code == grpc.StatusCode.UNAUTHENTICATED, call
            await stub.Subscribe(topic, metadata=(("authorization", "Bearer s3cret"),))
            await stub.DeleteTopic(topic, metadata=(("authorization", "Bearer s3cret"),))
    finally:
        await proc.aclose()


def _listeners(port: int) -> int:
    """Listening TCP sockets on `port` (each SO_REUSEPORT process has its own)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


async def test_every_worker_process_serves_grpc(redis_url: str, prefix: str) -> None:
    proc = await CoordinatorProcess(redis_url, prefix, COORDINATOR_SERVER_WORKERS=2).start()
    try:
        await wait_for(lambda: _listeners(proc.grpc_port) == 2, 15, what="two gRPC listeners")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as ch:
            assert (await pb_grpc.DtmStub(ch).NewGid(empty_pb2.Empty())).Gid
    finally:
        await proc.aclose()
    assert _listeners(proc.grpc_port) == 0


async def test_store_down_is_unavailable(tmp_path: Path) -> None:
    from coordinator.embedded_redis import EmbeddedRedis

    store = EmbeddedRedis(tmp_path / "r")
    url = await store.start()
    proc = await CoordinatorProcess(url, "down").start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as ch:
            stub = pb_grpc.DtmStub(ch)
            await stub.Prepare(pb.DtmRequest(Gid=gid(), TransType="tcc", Steps="null"))
            await store.stop()
            code, _ = await code_of(
                stub.Prepare(pb.DtmRequest(Gid=gid(), TransType="tcc", Steps="null"),
                             timeout=20))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await proc.aclose()
        await store.stop()


def _listening_sockets_of(pid: int) -> int:
    """Listening TCP sockets held by process `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                count += 1
    return count


async def test_grpc_port_zero_turns_it_off(redis_url: str, prefix: str) -> None:
    on = await CoordinatorProcess(redis_url, prefix).start()
    off = CoordinatorProcess(redis_url, prefix)
    off.grpc_port = 0  # passed as --grpc-port 0
    await off.start()
    try:
        assert on.proc is not None
        assert off.proc is not None
        assert _listening_sockets_of(on.proc.pid) == 2  # HTTP and gRPC
        assert _listening_sockets_of(off.proc.pid) == 1  # HTTP only
    finally:
        await on.aclose()
        await off.aclose()


def test_grpc_port_setting() -> None:
    from coordinator.cli import main
    from coordinator.settings import Settings, SettingsError

    assert Settings.load(env={}).server.grpc_port == 36790
    assert Settings.load(env={"COORDINATOR_SERVER_GRPC_PORT": "0"}).server.grpc_port == 0
    with pytest.raises(SettingsError, match=r"server\.grpc_port"):
        Settings.load(env={"COORDINATOR_SERVER_GRPC_PORT": "70000"})
    with pytest.raises(SystemExit) as info:
        main(["serve", "--grpc-port", "70000"])
    assert info.value.code == 2
