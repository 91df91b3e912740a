"""A submit sent again: same content answers like the first, other content is refused.

Clients resend a submit when the first answer was lost (a coordinator restart, a network
error). With `wait_result` the resend must report the real outcome, never a SUCCESS
before the outcome is known; a gid reused with other content is a 409.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support import FAIL, Api, CoordinatorProcess, Participant, saga_body


@pytest.fixture
def api(session: aiohttp.ClientSession, shared_coordinator: CoordinatorProcess) -> Api:
    return Api(session, shared_coordinator.api)


def new_gid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def test_resend_while_running_waits_for_the_rollback(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("resend-fail")
    participant.plan_for(gid, "a2", FAIL)
    participant.delay_for(gid, "a2", 1.0)
    body = saga_body(gid, participant, 2, wait_result=True)
    first = asyncio.create_task(api.post("submit", body))
    await asyncio.sleep(0.3)
    status, reply = await api.post("submit", body)
    # Not SUCCESS at once: the saga rolls back, and the resend says so like the first.
    assert status == 409, reply
    assert reply["dtm_result"] == "FAILURE"
    assert "business refused" in reply["message"]
    assert await first == (status, reply)
    assert await api.status(gid) == "failed"


async def test_resend_while_running_answers_success_only_at_the_end(
    api: Api, participant: Participant
) -> None:
    gid = new_gid("resend-ok")
    participant.delay_for(gid, "a1", 1.0)
    body = saga_body(gid, participant, 1, wait_result=True)
    first = asyncio.create_task(api.post("submit", body))
    await asyncio.sleep(0.3)
    sent = time.monotonic()
    assert await api.post("submit", body) == (200, {"dtm_result": "SUCCESS"})
    assert time.monotonic() - sent > 0.5
    assert await api.status(gid) == "succeed"
    assert await first == (200, {"dtm_result": "SUCCESS"})
    assert len(participant.calls_to("a1", gid)) == 1


async def test_resend_after_the_end_reports_the_outcome(
    api: Api, participant: Participant
) -> None:
    ok_gid, failed_gid = new_gid("resend-done"), new_gid("resend-failed")
    participant.plan_for(failed_gid, "a1", FAIL)
    for gid, want in ((ok_gid, 200), (failed_gid, 409)):
        body = saga_body(gid, participant, 1, wait_result=True)
        first = await api.post("submit", body)
        assert first[0] == want
        assert await api.post("submit", body) == first
    assert len(participant.calls_to("a1", ok_gid)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"payloads": ['{"step":99}']},
        {"steps": [{"action": "http://127.0.0.1:9/other", "compensate": ""}]},
        {"retry_limit": 3},
        {"branch_headers": {"x-tenant": "b"}},
    ],
    ids=["payloads", "steps", "retry_limit", "branch_headers"],
)
async def test_gid_reused_with_other_content_is_refused(
    api: Api, participant: Participant, change: dict[str, Any]
) -> None:
    gid = new_gid("reuse")
    participant.delay_for(gid, "a1", 0.5)
    body = saga_body(gid, participant, 1, branch_headers={"x-tenant": "a"})
    assert (await api.post("submit", body))[0] == 200
    # Still running, and the same once it finished: other content is never a success.
    for _ in range(2):
        status, reply = await api.post("submit", {**body, **change})
        assert status == 409, reply
        assert "reused with other content" in reply["message"]
        assert "idempotency key" in reply["message"]
        await api.wait_status(gid, "succeed")
    assert len(participant.calls_to("a1", gid)) == 1
    # The identical resend stays idempotent (without wait_result a finished one is
    # refused, as dtm does, but not as a reuse).
    status, reply = await api.post("submit", {**body, "wait_result": True})
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})


async def test_a_msg_submitted_after_its_prepare_refuses_other_content(
    api: Api, participant: Participant
) -> None:
    """The prepare stores the message; its submit's content is what a resend is compared
    with, kept beside what the prepare stored."""
    gid = new_gid("prepared-msg")
    body = {"gid": gid, "trans_type": "msg", "steps": [{"action": participant.url("a1")}],
            "payloads": ['{"n":1}'], "query_prepared": participant.url("qp")}
    assert (await api.post("prepare", body))[0] == 200
    assert (await api.post("submit", body))[0] == 200
    await api.wait_status(gid, "succeed")
    status, reply = await api.post("submit", {**body, "payloads": ['{"n":2}']})
    assert status == 409, reply
    assert "reused with other content" in reply["message"]
    status, reply = await api.post("submit", {**body, "wait_result": True})
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    assert len(participant.calls_to("a1", gid)) == 1


async def test_json_rpc_refuses_a_reused_gid(
    api: Api, session: aiohttp.ClientSession, shared_coordinator: CoordinatorProcess,
    participant: Participant,
) -> None:
    gid = new_gid("rpc-reuse")
    body = saga_body(gid, participant, 1, wait_result=True)
    assert (await api.post("submit", body))[0] == 200

    async def rpc(params: dict[str, Any]) -> dict[str, Any]:
        payload = {"jsonrpc": "2.0", "id": 1, "method": "submit", "params": params}
        async with session.post(f"{shared_coordinator.base}/api/json-rpc",
                                data=orjson.dumps(payload)) as r:
            reply: dict[str, Any] = await r.json(content_type=None)
            return reply

    assert (await rpc(body))["result"] == {"dtm_result": "SUCCESS"}
    reused = await rpc({**body, "payloads": ["{}"]})
    assert reused["error"]["code"] == -32901
    assert "reused with other content" in reused["error"]["message"]


async def test_resend_to_another_coordinator_after_a_crash_reports_the_rollback(
    redis_url: str, prefix: str, session: aiohttp.ClientSession, participant: Participant
) -> None:
    # The client's first coordinator dies mid-saga; it resends to another one, which
    # must not answer SUCCESS while the saga is in fact going to roll back.
    env = {"COORDINATOR_ENGINE_LEASE_SECONDS": "3", "COORDINATOR_ENGINE_REQUEST_TIMEOUT": "1"}
    first = await CoordinatorProcess(redis_url, prefix, **env).start()
    second = await CoordinatorProcess(redis_url, prefix, **env).start()
    try:
        gid = new_gid("resend-crash")
        participant.plan_for(gid, "a2", FAIL)
        participant.delay_for(gid, "a2", 0.5)
        body = saga_body(gid, participant, 2, request_timeout=1)
        assert (await Api(session, first.api).post("submit", body))[0] == 200
        await asyncio.sleep(0.3)  # a2 is being called
        first.kill()
        status, reply = await Api(session, second.api).post(
            "submit", {**body, "wait_result": True})
        assert status == 409, reply
        assert "business refused" in reply["message"]
        assert await Api(session, second.api).status(gid) == "failed"
    finally:
        first.kill()
        await second.aclose()
