"""The shortest end-to-end path: a real coordinator process, a real participant."""

from __future__ import annotations

from tests.support import FAIL, Api, Participant


async def test_saga_succeeds(api: Api, participant: Participant) -> None:
    body = {
        "gid": "smoke-ok",
        "trans_type": "saga",
        "steps": [
            {"action": participant.url("a1"), "compensate": participant.url("c1")},
            {"action": participant.url("a2"), "compensate": participant.url("c2")},
        ],
        "payloads": ['{"amount":30}', '{"amount":30}'],
        "wait_result": True,
    }
    status, reply = await api.post("submit", body)
    assert (status, reply) == (200, {"dtm_result": "SUCCESS"})
    assert [c.path for c in participant.calls] == ["/a1", "/a2"]
    first = participant.calls[0]
    assert first.method == "POST"
    assert first.body == '{"amount":30}'
    assert first.query == {"gid": "smoke-ok", "trans_type": "saga", "branch_id": "01",
                           "op": "action"}
    assert await api.status("smoke-ok") == "succeed"


async def test_saga_rolls_back(api: Api, participant: Participant) -> None:
    participant.plan("a2", FAIL)
    body = {
        "gid": "smoke-fail",
        "trans_type": "saga",
        "steps": [
            {"action": participant.url("a1"), "compensate": participant.url("c1")},
            {"action": participant.url("a2"), "compensate": participant.url("c2")},
        ],
        "payloads": ["{}", "{}"],
        "wait_result": True,
    }
    status, reply = await api.post("submit", body)
    assert status == 409
    assert reply["dtm_result"] == "FAILURE"
    assert "a2" in reply["message"]
    assert [c.path for c in participant.calls] == ["/a1", "/a2", "/c2", "/c1"]
    assert await api.status("smoke-fail") == "failed"
