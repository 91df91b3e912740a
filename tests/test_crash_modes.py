"""Crash recovery for msg and TCC: SIGKILL a coordinator mid-flight, start another.

Messages (two actions each) and TCC transactions (two registered branches each, then
submitted, or aborted for every fourth one) are in phase two when the coordinator dies.
A new coordinator on the same Redis and prefix must finish every one of them: each
message succeeds with each action called at least once and, after one crash, at most
twice; each submitted TCC succeeds with its confirms called and nothing cancelled; each
aborted TCC fails with its cancels called and nothing confirmed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp

from tests.support import Call, CoordinatorProcess, Participant, StoreProbe, calls_by_gid

MSGS = 150
TCCS = 100
WAVES = 10
DELAY = 0.4  # every participant call takes this long, so work is mid-flight at the kill
ENV = {"COORDINATOR_ENGINE_LEASE_SECONDS": "5"}  # request timeout stays at 3 s


def _aborts(i: int) -> bool:
    return i % 4 == 0


async def _run_msg(
    session: aiohttp.ClientSession, api: str, participant: Participant, gid: str, prepare: bool
) -> None:
    """Submit a message; some are prepared first (the prepared → submitted take-over)."""
    body = _msg_body(gid, participant)
    if prepare:
        await _post(session, api, "prepare", {**body, "query_prepared": participant.url("qp")})
    await _post(session, api, "submit", body)


def _msg_body(gid: str, participant: Participant) -> dict[str, Any]:
    return {
        "gid": gid,
        "trans_type": "msg",
        "steps": [{"action": participant.url("m1")}, {"action": participant.url("m2")}],
        "payloads": ['{"n":1}', '{"n":2}'],
    }


async def _post(session: aiohttp.ClientSession, api: str, op: str, body: dict[str, Any]) -> None:
    async with session.post(f"{api}/{op}", json=body) as r:
        text = await r.text()
        assert r.status == 200, f"{op} {body['gid']}: {r.status} {text}"


async def _run_tcc(
    session: aiohttp.ClientSession, api: str, participant: Participant, gid: str, abort: bool
) -> None:
    """Phase one through the HTTP API as a client would (prepare, register), then finish."""
    await _post(session, api, "prepare", {"gid": gid, "trans_type": "tcc"})
    for n in (1, 2):
        await _post(session, api, "registerBranch", {
            "gid": gid, "branch_id": f"0{n}", "trans_type": "tcc", "status": "prepared",
            "data": f'{{"n":{n}}}', "confirm": participant.url(f"confirm{n}"),
            "cancel": participant.url(f"cancel{n}"),
        })
    await _post(session, api, "abort" if abort else "submit", {"gid": gid, "trans_type": "tcc"})


def _of(calls: list[Call], path: str) -> list[Call]:
    return [c for c in calls if c.path == f"/{path}"]


def _check_branch(gid: str, calls: list[Call], path: str, not_before: float = 0.0) -> float:
    """Called once or twice (one crash), its last answer a success; when it first
    succeeded."""
    got = _of(calls, path)
    assert got, f"{gid}: {path} never called"
    assert len(got) <= 2, f"{gid}: {path} called {len(got)} times"
    assert got[-1].status == 200, f"{gid}: {path}'s last call did not succeed"
    assert min(c.started for c in got) >= not_before, f"{gid}: {path} ran too early"
    return min(c.ended for c in got if c.status == 200)


async def test_sigkill_msg_and_tcc_mid_flight_then_recovery(redis_url: str, prefix: str) -> None:
    participant = await Participant(delay=DELAY).start()
    probe = StoreProbe(redis_url, prefix)
    first = CoordinatorProcess(redis_url, prefix, **ENV)
    second = CoordinatorProcess(redis_url, prefix, **ENV)
    msgs = [f"cmsg-{i:03d}" for i in range(MSGS)]
    tccs = [f"ctcc-{i:03d}" for i in range(TCCS)]
    aborted = {gid for i, gid in enumerate(tccs) if _aborts(i)}
    gids = msgs + tccs
    started = time.monotonic()
    try:
        await first.start()
        api = first.api
        async with aiohttp.ClientSession() as session:
            # In waves, so that at the kill transactions are spread over every stage.
            m_step, t_step = MSGS // WAVES, TCCS // WAVES
            for wave in range(WAVES):
                await asyncio.gather(
                    *(_run_msg(session, api, participant, gid, int(gid[-3:]) % 3 == 0)
                      for gid in msgs[wave * m_step:(wave + 1) * m_step]),
                    *(_run_tcc(session, api, participant, gid, gid in aborted)
                      for gid in tccs[wave * t_step:(wave + 1) * t_step]),
                )
                await asyncio.sleep(0.15)

        first.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        in_flight = {c.key for c in participant.calls if c.ended == 0}
        at_kill = await probe.statuses(gids)
        assert all(at_kill[g] in ("submitted", "succeed") for g in msgs), at_kill
        assert all(at_kill[g] in ("submitted", "succeed") for g in tccs if g not in aborted)
        assert all(at_kill[g] in ("aborting", "failed") for g in aborted)
        # The kill must have interrupted real work of every kind, or this proves nothing.
        open_msgs = [g for g in msgs if at_kill[g] == "submitted"]
        open_confirms = [g for g in tccs if at_kill[g] == "submitted"]
        open_cancels = [g for g in tccs if at_kill[g] == "aborting"]
        assert len(open_msgs) >= 25, f"only {len(open_msgs)} messages were unfinished"
        assert len(open_confirms) >= 10, f"only {len(open_confirms)} TCC confirms unfinished"
        assert len(open_cancels) >= 3, f"only {len(open_cancels)} TCC cancels unfinished"
        assert len(in_flight) >= 20, f"only {len(in_flight)} calls were in flight"
        unfinished = len(open_msgs) + len(open_confirms) + len(open_cancels)

        await second.start()
        final = await probe.wait_final(gids, timeout=40)
        elapsed = time.monotonic() - started
    finally:
        first.kill(signal.SIGKILL)
        second.stop()
        await probe.close()
        await participant.stop()

    by_gid = calls_by_gid(participant, gids)
    assert not participant.calls_to("qp"), "a submitted message was checked back"
    for gid in msgs:
        assert final[gid] == "succeed", (gid, final[gid])
        calls = by_gid[gid]
        # Actions run in order: m2 only after m1 succeeded.
        _check_branch(gid, calls, "m2", _check_branch(gid, calls, "m1"))
        assert {c.path for c in calls} == {"/m1", "/m2"}, gid
    for gid in tccs:
        calls = by_gid[gid]
        done, other = ("cancel", "confirm") if gid in aborted else ("confirm", "cancel")
        assert final[gid] == ("failed" if gid in aborted else "succeed"), (gid, final[gid])
        first_done = _check_branch(gid, calls, f"{done}2")
        # Cancels go newest first; confirms have no order to keep.
        _check_branch(gid, calls, f"{done}1", first_done if done == "cancel" else 0.0)
        for n in (1, 2):
            assert not _of(calls, f"{other}{n}"), f"{gid}: {other}{n} was called"
        assert all(c.body == f'{{"n":{c.path[-1]}}}' for c in calls), gid

    # Nothing was called concurrently, and what the kill interrupted was called again
    # after it (its result was lost with the process).
    assert participant.overlaps == 0
    # Repeats come only from the one call per unfinished transaction that the crash
    # interrupted (in flight, or answered but not yet written): two branches each.
    repeated = sum(len(calls) for calls in by_gid.values()) - 2 * len(gids)
    assert repeated <= unfinished, (repeated, unfinished)
    for key in in_flight:
        again = [c for c in by_gid[key[0]] if c.key == key and c.started > killed_at]
        assert again, f"{key} was in flight at the kill and never retried"
    assert elapsed < 60, f"took {elapsed:.1f}s"
