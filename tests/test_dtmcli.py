"""dtm's own Python client (dtmcli, from PyPI, unmodified) against our coordinator.

dtmcli is blocking (requests), while the participant answers from this test's event
loop, so every dtmcli call runs in a thread.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from dtmcli import saga, utils

from tests.support import FAIL, Api, Participant


async def _gid(api: Api) -> str:
    gid = await asyncio.to_thread(utils.gen_gid, api.api)
    assert isinstance(gid, str)
    assert gid
    return gid


def _saga(api: Api, participant: Participant, gid: str) -> saga.Saga:
    s = saga.Saga(api.api, gid)
    s.add({"amount": 30}, participant.url("TransOut"), participant.url("TransOutRevert"))
    s.add({"amount": 30}, participant.url("TransIn"), participant.url("TransInRevert"))
    return s


def _seen(participant: Participant, gid: str) -> list[tuple[str, str, str]]:
    return [
        (c.path, c.query.get("branch_id", ""), c.query.get("op", ""))
        for c in participant.calls
        if c.query.get("gid") == gid
    ]


async def test_gen_gid_gives_distinct_gids(api: Api) -> None:
    gids = {await _gid(api) for _ in range(5)}
    assert len(gids) == 5


async def test_saga_succeeds(api: Api, participant: Participant) -> None:
    gid = await _gid(api)
    await asyncio.to_thread(_saga(api, participant, gid).submit)
    assert await api.wait_status(gid, "succeed", "failed") == "succeed"
    assert _seen(participant, gid) == [
        ("/TransOut", "01", "action"),
        ("/TransIn", "02", "action"),
    ]
    for call in participant.calls:
        assert call.method == "POST"
        assert json.loads(call.body) == {"amount": 30}
        assert call.query["trans_type"] == "saga"
    body = await api.query(gid)
    assert [(b["branch_id"], b["op"], b["status"]) for b in body["branches"]] == [
        ("01", "compensate", "prepared"),
        ("01", "action", "succeed"),
        ("02", "compensate", "prepared"),
        ("02", "action", "succeed"),
    ]


async def test_saga_rolls_back(api: Api, participant: Participant) -> None:
    gid = await _gid(api)
    participant.plan_for(gid, "TransIn", FAIL)
    # The submit itself succeeds: the failure is found later, while the saga runs.
    await asyncio.to_thread(_saga(api, participant, gid).submit)
    assert await api.wait_status(gid, "succeed", "failed") == "failed"
    assert _seen(participant, gid) == [
        ("/TransOut", "01", "action"),
        ("/TransIn", "02", "action"),
        ("/TransInRevert", "02", "compensate"),
        ("/TransOutRevert", "01", "compensate"),
    ]
    trans = (await api.query(gid))["transaction"]
    assert "TransIn" in trans["rollback_reason"]


async def test_wait_result_success(api: Api, participant: Participant) -> None:
    gid = await _gid(api)
    s = _saga(api, participant, gid)
    s.trans_base.wait_result = True
    await asyncio.to_thread(s.submit)
    # With wait_result the submit returns only once the saga has finished.
    assert await api.status(gid) == "succeed"
    assert [p for p, _, _ in _seen(participant, gid)] == ["/TransOut", "/TransIn"]


async def test_wait_result_failure_raises(api: Api, participant: Participant) -> None:
    gid = await _gid(api)
    participant.plan_for(gid, "TransIn", FAIL)
    s = _saga(api, participant, gid)
    s.trans_base.wait_result = True
    with pytest.raises(utils.DTMFailureError):
        await asyncio.to_thread(s.submit)
    assert await api.status(gid) == "failed"
    assert [p for p, _, _ in _seen(participant, gid)] == [
        "/TransOut",
        "/TransIn",
        "/TransInRevert",
        "/TransOutRevert",
    ]


async def test_resubmitting_a_finished_saga_fails(api: Api, participant: Participant) -> None:
    gid = await _gid(api)
    s = _saga(api, participant, gid)
    s.trans_base.wait_result = True
    await asyncio.to_thread(s.submit)
    # dtm answers 409 to a submit of a finished transaction; dtmcli raises on it.
    with pytest.raises(utils.DTMFailureError):
        await asyncio.to_thread(_saga(api, participant, gid).submit)
    assert len(participant.calls) == 2
