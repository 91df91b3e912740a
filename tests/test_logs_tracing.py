"""Structured logs (--log-format, per-module levels, transaction context) and
OpenTelemetry spans (submit → engine round → branch calls, traceparent to branches)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from coordinator.keys import KeySpace
from coordinator.ops.logs import ContextFilter, JsonFormatter, TextFormatter, bind, parse_levels
from coordinator.settings import RedisSettings, Settings
from tests.grpc_participant import GrpcParticipant
from tests.support import ERROR, OK, ONGOING, CoordinatorProcess, Participant, free_port, wait_for

MARKER = "PAYLOAD-MARKER-7731"


def test_parse_levels() -> None:
    assert parse_levels("coordinator.engine=DEBUG,INFO") == (
        logging.INFO, {"coordinator.engine": logging.DEBUG})
    assert parse_levels("warning") == (logging.WARNING, {})
    with pytest.raises(ValueError, match="LOUD"):
        parse_levels("coordinator=LOUD")


def _record(msg: str) -> logging.LogRecord:
    record = logging.LogRecord("coordinator.engine", logging.INFO, __file__, 1, msg, (), None)
    ContextFilter().filter(record)
    return record


def test_formatters_carry_the_transaction_context() -> None:
    token = bind(gid="g-1", trans_type="saga")
    try:
        line = json.loads(JsonFormatter().format(_record("moved on")))
        assert line["gid"] == "g-1"
        assert line["trans_type"] == "saga"
        assert line["message"] == "moved on"
        assert line["level"] == "INFO"
        assert TextFormatter().format(_record("moved on")).endswith(
            "moved on [gid=g-1 trans_type=saga]")
    finally:
        from coordinator.ops.logs import log_context

        log_context.reset(token)
    assert "gid" not in json.loads(JsonFormatter().format(_record("no context")))


async def test_json_logs_of_a_live_coordinator(
    redis_url: str, prefix: str, participant: Participant, session: aiohttp.ClientSession
) -> None:
    coord = CoordinatorProcess(redis_url, prefix)
    coord.extra_args = ["--log-format", "json", "--log-level", "coordinator.calls=DEBUG,INFO"]
    await coord.start()
    try:
        gid = f"{prefix}-logged"
        participant.plan_for(gid, "a1", ERROR, OK)
        body = {"gid": gid, "trans_type": "saga", "retry_interval": 1,
                "steps": [{"action": participant.url("a1"), "compensate": ""}],
                "payloads": [json.dumps({"secret": MARKER})]}
        async with session.post(f"{coord.api}/submit", json=body) as r:
            assert r.status == 200
        async def done() -> bool:
            async with session.get(f"{coord.api}/query", params={"gid": gid}) as r:
                return (await r.json())["transaction"]["status"] == "succeed"

        await wait_for(done, 10, 0.1, "the saga to succeed")
        await coord.aclose()
        lines = [json.loads(ln) for ln in coord.log_path.read_text().splitlines()
                 if ln.startswith("{")]
        assert lines, coord.log_tail()
        assert any(ln["logger"] == "coordinator" and ln["level"] == "INFO" for ln in lines)
        calls = [ln for ln in lines if ln["logger"] == "coordinator.calls"]
        assert len(calls) == 2  # the error, then the success
        for ln in calls:
            assert ln["level"] == "DEBUG"
            assert (ln["gid"], ln["trans_type"], ln["branch_id"], ln["op"]) == (
                gid, "saga", "01", "action")
        assert "error" in calls[0]["message"]
        for ln in lines:  # no payload at INFO or above
            if ln["level"] != "DEBUG":
                assert MARKER not in json.dumps(ln)
    finally:
        await coord.aclose()


# -- tracing --------------------------------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def spans() -> Any:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
    except ImportError:
        pytest.fail("the dev extra installs opentelemetry-sdk")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
async def traced_app(redis_url: str, prefix: str) -> AsyncIterator[str]:
    from coordinator.api.app import create_app

    settings = Settings.load(env={}, overrides={
        "redis.url": redis_url, "redis.key_prefix": prefix, "server.tracing": True,
        "engine.retry_interval": 1, "engine.poll_interval": 0.1, "server.grpc_port": 0,
    })
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/api/dtmsvr"
    await runner.cleanup()


async def test_one_submit_one_trace(
    spans: Any, traced_app: str, participant: Participant, session: aiohttp.ClientSession,
    redis_url: str, prefix: str,
) -> None:
    spans.clear()
    gid = f"{prefix}-traced"
    # Step 2 answers ONGOING once: its retry is a later round, claimed from Redis, which
    # must continue the same trace from the traceparent stored with the transaction.
    participant.plan_for(gid, "a2", ONGOING, OK)
    body = {"gid": gid, "trans_type": "saga",
            "steps": [{"action": participant.url("a1"), "compensate": ""},
                      {"action": participant.url("a2"), "compensate": ""}],
            "payloads": ["{}", "{}"]}
    async with session.post(f"{traced_app}/submit", json=body,
                            headers={"traceparent": PARENT}) as r:
        assert r.status == 200

    async def done() -> bool:
        async with session.get(f"{traced_app}/query", params={"gid": gid}) as r:
            return (await r.json())["transaction"]["status"] == "succeed"

    await wait_for(done, 10, 0.1, "the saga to succeed")
    await wait_for(lambda: len([s for s in spans.get_finished_spans()
                                if s.name == "engine round"]) >= 2, 5, 0.05, "two rounds")
    # Every API request has a span; the polling `query`s are traces of their own.
    finished = [s for s in spans.get_finished_spans()
                if s.name != "GET query" and s.attributes.get("dtm.gid", gid) == gid]
    by_name: dict[str, list[Any]] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    assert {f"{s.context.trace_id:032x}" for s in finished} == {TRACE_ID}
    submit = by_name["POST submit"][0]
    assert f"{submit.parent.span_id:016x}" == PARENT.split("-")[2]
    rounds = by_name["engine round"]
    assert len(rounds) == 2
    # The first round runs inside the submit; the retry round, claimed later from Redis,
    # finds its parent in the stored traceparent.
    assert [r.parent.span_id for r in rounds] == [submit.context.span_id] * 2
    branch_spans = by_name["branch action"]
    assert len(branch_spans) == 3  # a1, a2 (ongoing), a2 again
    # Each participant call carried its own branch span as the parent.
    sent = [c.headers.get("traceparent", "") for c in participant.calls
            if c.query.get("gid") == gid]
    assert len(sent) == 3
    assert {h.split("-")[1] for h in sent} == {TRACE_ID}
    assert {h.split("-")[2] for h in sent} == {f"{s.context.span_id:016x}"
                                               for s in branch_spans}
    # The trace context is stored with the transaction, for rounds in other processes.
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = KeySpace(prefix, RedisSettings().partitions)
        spec = await client.hget(keys.for_gid(gid).trans, "spec")
    finally:
        await client.aclose()
    assert TRACE_ID in json.loads(spec or "{}")["ext"]["headers"]["traceparent"]


async def test_grpc_branches_get_the_traceparent_as_metadata(
    spans: Any, traced_app: str, session: aiohttp.ClientSession, prefix: str,
) -> None:
    """A gRPC branch call is a client span too; the participant finds it in metadata."""
    grpc_participant = await GrpcParticipant().start()
    try:
        spans.clear()
        gid = f"{prefix}-traced-grpc"
        body = {"gid": gid, "trans_type": "saga", "protocol": "grpc",
                "steps": [{"action": grpc_participant.url("TransOut"), "compensate": ""}],
                "payloads": ["x"], "wait_result": True}
        async with session.post(f"{traced_app}/submit", json=body,
                                headers={"traceparent": PARENT}) as r:
            assert r.status == 200, await r.text()
        (call,) = grpc_participant.calls_to("TransOut", gid)
        branch_span = next(s for s in spans.get_finished_spans() if s.name == "branch action")
        _, trace, span, _ = call.metadata["traceparent"].split("-")
        assert trace == TRACE_ID
        assert span == f"{branch_span.context.span_id:016x}"
    finally:
        await grpc_participant.stop()
