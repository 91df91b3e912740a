"""Two coordinator processes on one Redis and one prefix: leases keep them apart.

Sagas bounce through the due index (their first action answers ONGOING twice), so either
process may claim them on each round. A branch of one transaction must never be called
by both at once, no branch answer may be lost or repeated, and when one process dies the
other takes over its work once the leases run out.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter

import aiohttp

from tests.cluster_support import CLUSTER_TOO
from tests.support import (
    OK,
    ONGOING,
    Call,
    CoordinatorProcess,
    Participant,
    StoreProbe,
    calls_by_gid,
    saga_body,
    submit_all,
    wait_for,
)

ENV = {"COORDINATOR_ENGINE_LEASE_SECONDS": "5"}


def _program(participant: Participant, gids: list[str]) -> dict[str, int]:
    """Plan every saga; returns how many times each gid's a1 will be called."""
    a1_calls = {}
    for i, gid in enumerate(gids):
        bounces = 2 if i % 3 else 1
        participant.plan_for(gid, "a1", *([ONGOING] * bounces), OK)
        a1_calls[gid] = bounces + 1
        if i % 5 == 0:
            participant.delay_for(gid, "a2", 0.3)
        if i % 7 == 0:
            participant.delay_for(gid, "a1", 0.2)
    return a1_calls


def _assert_one_driver_at_a_time(calls: list[Call], gid: str) -> None:
    """A sequential saga has one holder at a time: none of its calls overlap at all."""
    ordered = sorted(calls, key=lambda c: c.started)
    for before, after in itertools.pairwise(ordered):
        assert after.started >= before.ended, (
            f"{gid}: {after.path} started while {before.path} was still running"
        )


class OwnerWatcher:
    """Samples every transaction's lease owner until stopped.

    `seen[gid]` lists the instance ids (an owner token's first part) that held it, in the
    order first seen. The loop ends on a flag rather than by cancel(): on Python 3.11 a
    cancel racing a redis-py command can be lost (asyncio.wait_for returns the result and
    drops the cancel), which would leave the loop running.
    """

    def __init__(self, probe: StoreProbe, gids: list[str]) -> None:
        self.seen: dict[str, list[str]] = {gid: [] for gid in gids}
        self._done = asyncio.Event()
        self._task = asyncio.create_task(self._run(probe, gids))

    async def _run(self, probe: StoreProbe, gids: list[str]) -> None:
        while not self._done.is_set():
            for gid, (owner,) in (await probe.fields(gids, "owner")).items():
                instance = (owner or "").split(":")[0]
                if instance and instance not in self.seen[gid]:
                    self.seen[gid].append(instance)
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._done.set()
        await asyncio.wait_for(self._task, 10)


async def test_two_processes_share_due_work_without_overlap(
    redis_url: str, prefix: str
) -> None:
    participant = await Participant(delay=0.05).start()
    probe = StoreProbe(redis_url, prefix)
    one = CoordinatorProcess(redis_url, prefix, **ENV)
    two = CoordinatorProcess(redis_url, prefix, **ENV)
    gids = [f"lease-{i:03d}" for i in range(300)]
    a1_calls = _program(participant, gids)
    started = time.monotonic()
    watcher: OwnerWatcher | None = None
    try:
        await asyncio.gather(one.start(), two.start())
        watcher = OwnerWatcher(probe, gids)
        bodies = [saga_body(gid, participant, 2) for gid in gids]
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                submit_all(session, one.api, bodies[0::2]),
                submit_all(session, two.api, bodies[1::2]),
            )
        final = await probe.wait_final(gids, timeout=40)
        elapsed = time.monotonic() - started
    finally:
        await one.aclose()
        await two.aclose()
        if watcher is not None:
            await watcher.stop()
        await probe.close()
        await participant.stop()

    assert participant.overlaps == 0
    assert all(s == "succeed" for s in final.values()), final
    by_gid = calls_by_gid(participant, gids)
    for gid in gids:
        calls = by_gid[gid]
        # No crash, and leases far longer than any call: every answer was recorded once,
        # so nothing ran twice.
        assert [c.path for c in calls] == ["/a1"] * a1_calls[gid] + ["/a2"], (gid, calls)
        assert [c.status for c in calls][-2:] == [200, 200]
        _assert_one_driver_at_a_time(calls, gid)

    # Both processes held leases, and transactions moved between them on re-claims.
    assert watcher is not None
    instances = {i for seen in watcher.seen.values() for i in seen}
    assert len(instances) == 2, instances
    moved = [gid for gid, seen in watcher.seen.items() if len(seen) == 2]
    assert len(moved) >= 10, f"only {len(moved)} transactions changed hands"
    assert elapsed < 60


@CLUSTER_TOO
async def test_survivor_takes_over_after_sigkill(
    backend_url: str, redis_url: str, prefix: str
) -> None:
    participant = await Participant(delay=0.2).start()
    probe = StoreProbe(backend_url, prefix, cluster=backend_url != redis_url)
    victim = CoordinatorProcess(backend_url, prefix, **ENV)
    survivor = CoordinatorProcess(backend_url, prefix, **ENV)
    gids = [f"takeover-{i:03d}" for i in range(200)]
    a1_calls = _program(participant, gids)
    started = time.monotonic()
    watcher: OwnerWatcher | None = None
    try:
        await asyncio.gather(victim.start(), survivor.start())
        # Connected before the submits: a cluster client first reads the slot map, and
        # the watcher must see the owners the submits create.
        await probe.fields(gids[:1], "owner")
        watcher = OwnerWatcher(probe, gids)
        bodies = [saga_body(gid, participant, 2) for gid in gids]
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                submit_all(session, victim.api, bodies[0::2]),
                submit_all(session, survivor.api, bodies[1::2]),
            )
        # The victim's instance id: the owner its own submits were created with.
        created_by = Counter(watcher.seen[g][0] for g in gids[0::2] if watcher.seen[g])
        victim_id = created_by.most_common(1)[0][0]
        victim_held: list[str] = []

        async def victim_busy() -> bool:
            # Kill it while it holds many leases after re-claims, not just its creations.
            nonlocal victim_held
            rows = await probe.fields(gids, "owner")
            victim_held = [
                gid for gid, (owner,) in rows.items()
                if owner and owner.split(":")[0] == victim_id
            ]
            return len(victim_held) >= 15 and time.monotonic() - started > 2.5

        await wait_for(victim_busy, 15, 0.01, "the victim to hold leases")
        victim.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        in_flight = {c.key for c in participant.calls if c.ended == 0}
        at_kill = await probe.statuses(gids)
        unfinished = [g for g, s in at_kill.items() if s == "submitted"]
        assert len(unfinished) >= 50, f"only {len(unfinished)} sagas were unfinished"

        final = await probe.wait_final(gids, timeout=40)
        elapsed = time.monotonic() - started
    finally:
        victim.kill(signal.SIGKILL)
        await survivor.aclose()
        if watcher is not None:
            await watcher.stop()
        await probe.close()
        await participant.stop()

    assert participant.overlaps == 0
    assert all(s == "succeed" for s in final.values()), final
    by_gid = calls_by_gid(participant, gids)
    for gid in gids:
        calls = by_gid[gid]
        a1 = [c for c in calls if c.path == "/a1"]
        a2 = [c for c in calls if c.path == "/a2"]
        assert [c.path for c in calls] == ["/a1"] * len(a1) + ["/a2"] * len(a2), gid
        # At least once; the kill repeats at most the one call whose answer it lost.
        assert a1_calls[gid] <= len(a1) <= a1_calls[gid] + 1, (gid, len(a1))
        assert 1 <= len(a2) <= 2, (gid, len(a2))
        assert len(a1) + len(a2) <= a1_calls[gid] + 2
        assert a1[-1].status == 200
        assert a2[-1].status == 200
        _assert_one_driver_at_a_time(calls, gid)
    for gid in victim_held:
        if at_kill[gid] != "submitted":
            continue  # the victim finished it between the owner sample and the kill
        # Work the victim held unfinished was finished by the survivor, after the kill.
        assert by_gid[gid][-1].started > killed_at, gid
    for key in in_flight:
        if key[0] not in victim_held:
            continue  # the survivor's own calls completed normally
        again = [c for c in by_gid[key[0]] if c.key == key and c.started > killed_at]
        assert again, f"{key} was in flight at the kill and never retried"
    assert elapsed < 60
