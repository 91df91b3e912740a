"""Races between a worker holding a lease and API calls, driven step by step.

A worker (Run) claims a transaction, then an API call changes it before the worker's
next write. These used to go wrong: the worker adopted the status it had asked for
instead of the stored one, and branches registered after the claim were never
cancelled. A recording caller stands in for the HTTP participants.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from coordinator.engine.engine import Engine, Run
from coordinator.keys import KeySpace
from coordinator.machines.base import SUCCESS, Outcome
from coordinator.machines.tcc import TccMachine
from coordinator.model import Branch, Op, Options, Status, Trans
from coordinator.settings import EngineSettings
from coordinator.store.base import Transition
from coordinator.store.redis_store import RedisStore

PREPARED = frozenset({Status.PREPARED})


class RecordingCaller:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def call(self, trans: Trans, branch: Branch) -> Outcome:
        self.calls.append((branch.branch_id, branch.op.value))
        return SUCCESS


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(redis_url, KeySpace(prefix, 4))
    await s.start()
    yield s
    await s.close()


def tcc_branches(bid: str) -> list[Branch]:
    url = f"http://127.0.0.1:9/{bid}"
    return [Branch(bid, Op.CANCEL, url + "/cancel"), Branch(bid, Op.CONFIRM, url + "/confirm")]


async def claimed_tcc(store: RedisStore, gid: str) -> tuple[Engine, RecordingCaller, Run]:
    """A prepared TCC with branch 01, past its timeout, claimed by a worker."""
    trans = Trans(gid=gid, trans_type="tcc", status=Status.PREPARED,
                  options=Options(timeout_to_fail=1))
    await store.create(trans, due_in_ms=0)
    await store.register_branches(gid, tcc_branches("01"), expected=PREPARED, unique=False)
    caller = RecordingCaller()
    engine = Engine(store, caller, {"tcc": TccMachine()}, EngineSettings())  # type: ignore[arg-type]
    sent = time.monotonic()
    [item] = await store.claim(store.keys.partition(gid), 10, "w")
    # The worker sees a clock past the 1 s timeout, so its plan is to abort.
    run = Run(engine, item.trans, item.token, item.now + 5_000, sent)
    return engine, caller, run


async def test_submit_during_the_lease_wins_over_the_workers_timeout(
    store: RedisStore,
) -> None:
    _, caller, run = await claimed_tcc(store, "race-submit")
    # The client submits while the worker holds the lease: no lease for the API call.
    result = await store.transition("race-submit", Transition(
        expected=PREPARED, new_status=Status.SUBMITTED, next_due_ms=0, lease="acquire:api"))
    assert not result.acquired
    final = await run.drive()
    # The worker's abort conflicted; it must carry on from "submitted": confirm only.
    assert caller.calls == [("01", "confirm")]
    assert final.status is Status.SUCCEED
    stored = await store.load("race-submit")
    assert stored is not None
    assert stored.status is Status.SUCCEED


async def test_branch_registered_after_the_claim_is_cancelled_too(store: RedisStore) -> None:
    _, caller, run = await claimed_tcc(store, "race-register")
    # The client registers another branch between the claim and the worker's abort.
    await store.register_branches("race-register", tcc_branches("02"), expected=PREPARED,
                                  unique=False)
    final = await run.drive()
    assert final.status is Status.FAILED
    assert caller.calls == [("02", "cancel"), ("01", "cancel")]
    stored = await store.load("race-register")
    assert stored is not None
    assert {b.key: b.status.value for b in stored.branches if b.op is Op.CANCEL} == {
        "01:cancel": "succeed", "02:cancel": "succeed"}


async def test_a_poll_claims_a_bounded_batch_and_the_rest_on_the_next(
    store: RedisStore,
) -> None:
    """Hundreds of due transactions (a flash sale's orders) are claimed CLAIM_BATCH at a
    time, so that no single poll decodes and starts them all in one stretch of the loop;
    polling again takes the rest."""
    from coordinator.engine.engine import CLAIM_BATCH
    from coordinator.machines.msg import MsgMachine
    from coordinator.machines.msg import branches_for as msg_branches

    count = CLAIM_BATCH + 36
    for i in range(count):
        gid = f"{{1}}batch-{i:03d}"
        steps = [{"action": ""}]
        await store.create(Trans(gid=gid, trans_type="msg", status=Status.SUBMITTED,
                                 steps=tuple(steps), payloads=("{}",),
                                 branches=msg_branches(steps, {})), due_in_ms=0)
    engine = Engine(store, RecordingCaller(), {"msg": MsgMachine()},  # type: ignore[arg-type]
                    EngineSettings())
    assert await engine.poll_once() == CLAIM_BATCH
    assert await engine.poll_once() == count - CLAIM_BATCH
    await engine.stop()
