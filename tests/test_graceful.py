"""SIGTERM with branch calls in flight: a clean exit within the grace period, no lost work.

Calls that were in flight when the signal came must complete and have their answers
recorded, so that a coordinator started afterwards does not call those branches again.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.support import (
    FAIL,
    Call,
    CoordinatorProcess,
    Participant,
    StoreProbe,
    calls_by_gid,
    check_saga_calls,
    saga_body,
    submit_all,
    wait_for,
)

DELAY = 1.0  # each participant call takes a second: work is in flight at the signal


async def _terminate_mid_flight(
    participant: Participant, proc: CoordinatorProcess, expected: int, grace: float
) -> tuple[set[tuple[str, str, str]], float, int | None]:
    """Wait until `expected` calls are in flight, SIGTERM; (their keys, exit s, exit code)."""

    def in_flight() -> list[Call]:
        return [c for c in participant.calls if c.ended == 0]

    await wait_for(lambda: len(in_flight()) >= expected, 15, 0.01, "calls in flight")
    keys = {c.key for c in in_flight()}
    sent = time.monotonic()
    # Wait without blocking this loop: the participant answers the in-flight calls.
    code = await proc.signal_and_wait(signal.SIGTERM, grace + 10)
    return keys, time.monotonic() - sent, code


def _assert_clean_log(proc: CoordinatorProcess) -> None:
    log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


async def test_sigterm_finishes_in_flight_calls(redis_url: str, prefix: str) -> None:
    grace = 5.0
    participant = await Participant(delay=DELAY).start()
    probe = StoreProbe(redis_url, prefix)
    env = {"COORDINATOR_ENGINE_LEASE_SECONDS": "5", "COORDINATOR_ENGINE_SHUTDOWN_GRACE": grace}
    first = CoordinatorProcess(redis_url, prefix, **env)
    second = CoordinatorProcess(redis_url, prefix, **env)
    gids = [f"term-{i:02d}" for i in range(40)]
    try:
        await first.start()
        async with aiohttp.ClientSession() as session:
            await submit_all(session, first.api, [saga_body(g, participant, 2) for g in gids])
        in_flight, took, code = await _terminate_mid_flight(participant, first, len(gids), grace)
        assert code == 0, f"exit code {code} after {took:.1f}s:\n{first.log_tail()}"
        assert took < grace + 1.5, f"took {took:.1f}s to exit (grace {grace}s)"
        _assert_clean_log(first)
        # Every call in flight at the signal was answered before the process exited.
        assert all(c.status == 200 for c in participant.calls)
        calls_before_restart = len(participant.calls)

        await second.start()
        final = await probe.wait_final(gids, timeout=30)
        # Give the new process time to (wrongly) repeat a call whose answer was lost.
        await asyncio.sleep(1.5)
    finally:
        first.kill(signal.SIGKILL)
        await second.aclose()
        await probe.close()
        await participant.stop()

    assert len(in_flight) == len(gids)
    assert all(s == "succeed" for s in final.values()), final
    by_gid = calls_by_gid(participant, gids)
    for gid in gids:
        # Nothing lost and nothing repeated: each action exactly once, in order.
        check_saga_calls(gid, by_gid[gid], 2, None, most=1)
    recalled = [c.key for c in participant.calls[calls_before_restart:] if c.key in in_flight]
    assert not recalled, f"called again after the restart: {recalled[:5]}"
    assert participant.overlaps == 0


async def test_sigterm_past_grace_cancels_and_recovers(redis_url: str, prefix: str) -> None:
    # Six one-second steps cannot finish in a two-second grace: the rest is cancelled and
    # picked up after the restart, once the leases ran out. Clients blocked in a
    # wait_result submit get an answer and do not stretch the shutdown.
    grace, steps = 2.0, 6
    participant = await Participant(delay=DELAY).start()
    probe = StoreProbe(redis_url, prefix)
    env = {"COORDINATOR_ENGINE_LEASE_SECONDS": "5", "COORDINATOR_ENGINE_SHUTDOWN_GRACE": grace}
    first = CoordinatorProcess(redis_url, prefix, **env)
    second = CoordinatorProcess(redis_url, prefix, **env)
    gids = [f"grace-{i:02d}" for i in range(30)]
    waiters = gids[:6]
    failing = set(gids[::3])
    for gid in failing:
        participant.plan_for(gid, "a2", FAIL)
    started = time.monotonic()
    try:
        await first.start()
        async with aiohttp.ClientSession() as session:

            async def wait_result(gid: str) -> tuple[int, str]:
                body = saga_body(gid, participant, steps, wait_result=True)
                try:
                    async with session.post(f"{first.api}/submit", json=body) as r:
                        return r.status, await r.text()
                except aiohttp.ClientError as exc:
                    return 0, repr(exc)

            waiting = [asyncio.create_task(wait_result(gid)) for gid in waiters]
            await submit_all(
                session, first.api, [saga_body(g, participant, steps) for g in gids[6:]]
            )
            in_flight, took, code = await _terminate_mid_flight(
                participant, first, len(gids), grace
            )
            answers = await asyncio.gather(*waiting)
        assert code == 0, f"exit code {code} after {took:.1f}s:\n{first.log_tail()}"
        assert took < grace + 1.5, f"took {took:.1f}s to exit (grace {grace}s)"
        _assert_clean_log(first)
        for status, text in answers:
            # No saga can have finished yet: the answer is "still ongoing", not a
            # dropped connection.
            assert status == 425, (status, text)
            assert '"dtm_result":"ONGOING"' in text, text
        at_exit = await probe.statuses(gids)
        assert any(s == "submitted" for s in at_exit.values()), "nothing left to recover"
        calls_before_restart = len(participant.calls)

        await second.start()
        final = await probe.wait_final(gids, timeout=40)
        elapsed = time.monotonic() - started
    finally:
        first.kill(signal.SIGKILL)
        await second.aclose()
        await probe.close()
        await participant.stop()

    for gid in gids:
        assert final[gid] == ("failed" if gid in failing else "succeed"), (gid, final[gid])
    by_gid = calls_by_gid(participant, gids)
    for gid in gids:
        check_saga_calls(gid, by_gid[gid], steps, 2 if gid in failing else None, most=2)
    # The calls in flight at the signal completed within the grace and were recorded.
    recalled = [c.key for c in participant.calls[calls_before_restart:] if c.key in in_flight]
    assert not recalled, f"called again after the restart: {recalled[:5]}"
    assert participant.overlaps == 0
    assert elapsed < 60

