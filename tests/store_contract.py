"""The store contract: one suite that every `Store` backend must pass.

A backend's test module provides a fixture ``store_factory`` — an async callable taking
keyword arguments ``lease_ms`` and ``finished_ttl_s`` and returning a started store —
and imports this module's tests and fixtures::

    from tests.store_contract import *  # noqa: F403

Every store the factory returns within one test shares one namespace (they see the
same transactions, like several coordinator instances on one database) and a small
partition count; the factory closes them and removes their data afterwards.

The suite speaks only the `Store` interface (plus `keys.partition_of`, which every
backend uses to place a gid). Backend-specific checks (key names, TTLs, scripts) live
in the backend's own module.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Protocol

import pytest

from coordinator.errors import AlreadyExists, LeaseLost, NotFound, StatusConflict
from coordinator.keys import partition_of
from coordinator.machines.saga import branches_for
from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans
from coordinator.store.base import ListFilter, Store, Transition

__all__ = [
    "StoreFactory",
    "make_trans",
    "store",
    "test_acquire_takes_only_a_free_lease",
    "test_claim_leases_only_due_entries",
    "test_create_then_load_round_trip",
    "test_create_twice_is_already_exists",
    "test_expired_lease_is_taken_over_and_the_old_owner_fenced",
    "test_finished_transaction_leaves_the_due_index",
    "test_list_filters",
    "test_list_pages_newest_first_without_loss_or_duplicates",
    "test_release_reschedules",
    "test_renew_extends_the_lease",
    "test_sweep_removes_listing_entries_of_expired_transactions",
    "test_transition_applies_results_fields_and_status",
    "test_transition_is_compare_and_set",
    "test_write_with_a_wrong_owner_is_lease_lost",
]

SUBMITTED = frozenset({Status.SUBMITTED})


class StoreFactory(Protocol):
    async def __call__(self, *, lease_ms: int = ..., finished_ttl_s: int = ...) -> Store: ...


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()


def make_trans(
    gid: str,
    status: Status = Status.SUBMITTED,
    *,
    trans_type: str = "saga",
    steps: int = 2,
    **extra: object,
) -> Trans:
    """A transaction as the API would build it (saga branches laid out per step)."""
    if trans_type == "saga":
        step_list = tuple(
            {"action": f"http://svc/a{i}", "compensate": f"http://svc/c{i}"}
            for i in range(steps)
        )
        trans = Trans(
            gid=gid, trans_type="saga", status=status, steps=step_list,
            payloads=tuple(f'{{"step":{i}}}' for i in range(steps)),
            branches=branches_for(step_list),
        )
    else:
        trans = Trans(gid=gid, trans_type=trans_type, status=status)
    return replace(trans, **extra)  # type: ignore[arg-type]


def in_partition(store: Store, partition: int, name: str) -> str:
    """A gid that lands in `partition` (the explicit `{N}` form)."""
    gid = f"{{{partition}}}{name}"
    assert partition_of(gid, store.partitions) == partition
    return gid


async def claim_all(store: Store, token_prefix: str, limit: int = 100) -> list[str]:
    """Claim due work in every partition; the gids claimed."""
    gids: list[str] = []
    for p in range(store.partitions):
        gids += [c.trans.gid for c in await store.claim(p, limit, token_prefix)]
    return gids


# -- create and load -----------------------------------------------------------------------


async def test_create_then_load_round_trip(store: Store) -> None:
    assert await store.load("nothing-here") is None
    tcc_branch = Branch("01", Op.TRY, "http://svc/try", data='{"amount":5}')
    trans = make_trans(
        "rt-1",
        Status.PREPARED,
        steps=3,
        custom_data='{"concurrent":true,"orders":{"2":[0,1]}}',
        query_prepared="http://svc/query",
        protocol="http",
        rollback_reason="none yet",
        options=Options(wait_result=True, timeout_to_fail=60, request_timeout=4,
                        retry_interval=7, retry_limit=3, concurrent=True,
                        branch_headers={"X-Tenant": "é/ü"}),
        ext_headers={"X-Ext": "1"},
        next_cron_interval=7,
    )
    trans = replace(trans, branches=(*trans.branches, tcc_branch))
    now = await store.create(trans, due_in_ms=5_000)
    loaded = await store.load("rt-1")
    assert loaded is not None
    for name in ("gid", "trans_type", "status", "steps", "payloads", "custom_data",
                 "query_prepared", "protocol", "rollback_reason", "options", "ext_headers",
                 "next_cron_interval"):
        assert getattr(loaded, name) == getattr(trans, name), name
    assert loaded.create_time == loaded.update_time == now
    assert loaded.next_cron_time == now + 5_000
    assert loaded.owner == ""
    assert loaded.retry_count == 0
    # Branches come back in layout order, with their own bodies.
    assert [(b.branch_id, b.op, b.url, b.status) for b in loaded.branches] == [
        (b.branch_id, b.op, b.url, b.status) for b in trans.branches
    ]
    assert loaded.branches[-1].data == '{"amount":5}'
    assert all(b.create_time == now for b in loaded.branches)
    assert loaded.payload_of(loaded.branches[1]) == '{"step":0}'


async def test_create_twice_is_already_exists(store: Store) -> None:
    await store.create(make_trans("dup", Status.PREPARED), due_in_ms=0)
    with pytest.raises(AlreadyExists) as info:
        await store.create(make_trans("dup", Status.SUBMITTED, steps=1), due_in_ms=0)
    assert info.value.status == "prepared"
    loaded = await store.load("dup")
    assert loaded is not None
    assert loaded.status is Status.PREPARED
    assert len(loaded.branches) == 4  # the first record, untouched


# -- transitions -------------------------------------------------------------------------


async def test_transition_is_compare_and_set(store: Store) -> None:
    await store.create(make_trans("cas", Status.PREPARED), due_in_ms=0)
    with pytest.raises(StatusConflict) as info:
        await store.transition("cas", Transition(SUBMITTED, Status.ABORTING))
    assert info.value.found == "prepared"
    loaded = await store.load("cas")
    assert loaded is not None
    assert loaded.status is Status.PREPARED
    result = await store.transition(
        "cas", Transition(frozenset({Status.PREPARED, Status.SUBMITTED}), Status.SUBMITTED)
    )
    assert result.status is Status.SUBMITTED
    assert result.now >= loaded.create_time
    with pytest.raises(StatusConflict) as info:
        await store.transition("cas", Transition(frozenset({Status.PREPARED}), Status.FAILED))
    assert info.value.found == "submitted"
    with pytest.raises(NotFound):
        await store.transition("no-such-gid", Transition(SUBMITTED, Status.ABORTING))


async def test_transition_applies_results_fields_and_status(store: Store) -> None:
    await store.create(make_trans("apply"), due_in_ms=0)
    result = await store.transition(
        "apply",
        Transition(
            SUBMITTED,
            Status.ABORTING,
            fields={"rollback_reason": "branch 02 said no", "retry_count": "2"},
            branch_updates={"01:action": BranchStatus.SUCCEED, "02:action": BranchStatus.FAILED},
        ),
    )
    assert result.status is Status.ABORTING
    loaded = await store.load("apply")
    assert loaded is not None
    assert loaded.status is Status.ABORTING
    assert loaded.rollback_reason == "branch 02 said no"
    assert loaded.retry_count == 2
    assert loaded.update_time == result.now
    statuses = {b.key: b.status for b in loaded.branches}
    assert statuses == {
        "01:compensate": BranchStatus.PREPARED, "01:action": BranchStatus.SUCCEED,
        "02:compensate": BranchStatus.PREPARED, "02:action": BranchStatus.FAILED,
    }
    finished = {b.key: b.finish_time for b in loaded.branches}
    assert finished["01:action"] == result.now
    assert finished["01:compensate"] == 0


async def test_write_with_a_wrong_owner_is_lease_lost(store: Store) -> None:
    await store.create(make_trans("fence"), due_in_ms=0, owner="worker-a:1", lease_ms=30_000)
    with pytest.raises(LeaseLost):
        await store.transition(
            "fence",
            Transition(SUBMITTED, Status.SUCCEED, owner="worker-b:1",
                       branch_updates={"01:action": BranchStatus.SUCCEED}, lease="renew"),
        )
    loaded = await store.load("fence")
    assert loaded is not None
    assert loaded.status is Status.SUBMITTED
    assert loaded.owner == "worker-a:1"
    assert all(b.status is BranchStatus.PREPARED for b in loaded.branches)
    result = await store.transition(
        "fence", Transition(SUBMITTED, owner="worker-a:1", lease="renew",
                            branch_updates={"01:action": BranchStatus.SUCCEED})
    )
    assert result.status is Status.SUBMITTED


# -- claims and leases ----------------------------------------------------------------------


async def test_claim_leases_only_due_entries(store: Store) -> None:
    p = 1
    due = [in_partition(store, p, f"due-{i}") for i in range(3)]
    later = in_partition(store, p, "later")
    for gid in due:
        await store.create(make_trans(gid), due_in_ms=0)
    await store.create(make_trans(later), due_in_ms=60_000)
    other = in_partition(store, 2, "elsewhere")
    await store.create(make_trans(other), due_in_ms=0)

    first = await store.claim(p, 2, "w1")
    second = await store.claim(p, 10, "w2")
    claimed = [c.trans.gid for c in first + second]
    assert sorted(claimed) == sorted(due)  # not `later`, not the other partition's
    assert len(first) == 2
    for c in first + second:
        assert c.trans.owner == c.token
        assert c.token.startswith(("w1", "w2"))
        assert len(c.trans.branches) == 4
        assert c.now >= c.trans.create_time
    assert len({c.token for c in first}) == 2
    # While the leases hold, nobody else gets them.
    assert await store.claim(p, 10, "w3") == []
    assert [c.trans.gid for c in await store.claim(2, 10, "w3")] == [other]


async def test_expired_lease_is_taken_over_and_the_old_owner_fenced(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory(lease_ms=250)
    gid = in_partition(store, 0, "lease")
    await store.create(make_trans(gid), due_in_ms=0)
    [old] = await store.claim(0, 10, "slow")
    assert await store.claim(0, 10, "other") == []
    await asyncio.sleep(0.35)
    [new] = await store.claim(0, 10, "fast")
    assert new.trans.gid == gid
    assert new.token != old.token
    assert new.trans.owner == new.token
    with pytest.raises(LeaseLost):
        await store.transition(
            gid, Transition(SUBMITTED, Status.SUCCEED, owner=old.token, lease="renew")
        )
    result = await store.transition(
        gid, Transition(SUBMITTED, Status.SUCCEED, owner=new.token, lease="renew")
    )
    assert result.status is Status.SUCCEED


async def test_renew_extends_the_lease(store_factory: StoreFactory) -> None:
    store = await store_factory(lease_ms=250)
    gid = in_partition(store, 3, "renew")
    await store.create(make_trans(gid), due_in_ms=0)
    [c] = await store.claim(3, 10, "w1")
    await store.transition(
        gid, Transition(SUBMITTED, owner=c.token, lease="renew", lease_ms=5_000)
    )
    await asyncio.sleep(0.35)
    assert await store.claim(3, 10, "w2") == []


async def test_release_reschedules(store: Store) -> None:
    gid = in_partition(store, 2, "rel")
    await store.create(make_trans(gid), due_in_ms=0)
    [c] = await store.claim(2, 10, "w1")
    result = await store.transition(
        gid, Transition(SUBMITTED, owner=c.token, lease="release", next_due_ms=300,
                        fields={"next_cron_interval": "1"})
    )
    loaded = await store.load(gid)
    assert loaded is not None
    assert loaded.owner == ""
    assert loaded.next_cron_time == result.now + 300
    assert loaded.next_cron_interval == 1
    assert await store.claim(2, 10, "w2") == []  # not before its time
    await asyncio.sleep(0.4)
    [again] = await store.claim(2, 10, "w3")
    assert again.trans.gid == gid
    assert again.now >= result.now + 300


async def test_acquire_takes_only_a_free_lease(store: Store) -> None:
    await store.create(make_trans("acq-free"), due_in_ms=60_000)
    got = await store.transition(
        "acq-free", Transition(SUBMITTED, lease="acquire:api-1", next_due_ms=0)
    )
    assert got.acquired
    loaded = await store.load("acq-free")
    assert loaded is not None
    assert loaded.owner == "api-1"

    await store.create(make_trans("acq-held"), due_in_ms=0, owner="worker:1", lease_ms=30_000)
    held = await store.transition(
        "acq-held", Transition(SUBMITTED, Status.ABORTING, lease="acquire:api-2", next_due_ms=0)
    )
    assert not held.acquired
    assert held.status is Status.ABORTING  # the status change still applies
    loaded = await store.load("acq-held")
    assert loaded is not None
    assert loaded.owner == "worker:1"


async def test_finished_transaction_leaves_the_due_index(store: Store) -> None:
    gid = in_partition(store, 1, "fin")
    await store.create(make_trans(gid), due_in_ms=0, owner="w:1", lease_ms=100)
    result = await store.transition(
        gid,
        Transition(SUBMITTED, Status.SUCCEED, owner="w:1", lease="renew",
                   branch_updates={"01:action": BranchStatus.SUCCEED}),
    )
    assert result.status is Status.SUCCEED
    loaded = await store.load(gid)
    assert loaded is not None
    assert loaded.status is Status.SUCCEED
    assert loaded.finish_time == result.now
    assert loaded.owner == ""
    await asyncio.sleep(0.15)  # past the creation lease: it would be due if still indexed
    assert await store.claim(1, 10, "w2") == []
    with pytest.raises(StatusConflict) as info:
        await store.transition(gid, Transition(SUBMITTED, Status.FAILED))
    assert info.value.found == "succeed"


# -- expiry ----------------------------------------------------------------------------------


async def test_sweep_removes_listing_entries_of_expired_transactions(
    store_factory: StoreFactory,
) -> None:
    short = await store_factory(finished_ttl_s=1)
    long = await store_factory(finished_ttl_s=3_600)
    await short.create(make_trans("exp-gone"), due_in_ms=60_000)
    await short.create(make_trans("exp-open"), due_in_ms=60_000)
    await long.create(make_trans("exp-kept"), due_in_ms=60_000)
    await short.transition("exp-gone", Transition(SUBMITTED, Status.FAILED))
    await long.transition("exp-kept", Transition(SUBMITTED, Status.SUCCEED))
    assert [await short.sweep(p) for p in range(short.partitions)] == [0] * short.partitions
    await asyncio.sleep(1.2)
    assert await short.load("exp-gone") is None
    assert sum([await short.sweep(p) for p in range(short.partitions)]) == 1
    assert sum([await short.sweep(p) for p in range(short.partitions)]) == 0
    page = await short.list("", 10, ListFilter())
    assert sorted(t.gid for t in page.transactions) == ["exp-kept", "exp-open"]
    # Unfinished transactions never expire.
    opened = await short.load("exp-open")
    assert opened is not None
    assert opened.status is Status.SUBMITTED


# -- listing ---------------------------------------------------------------------------------


async def list_all(store: Store, limit: int, where: ListFilter) -> list[Trans]:
    out: list[Trans] = []
    position = ""
    for _ in range(100):
        # A cursor that never advances must fail, not hang. (wait_for, not asyncio.timeout:
        # redis-py's pipeline can swallow the single cancellation asyncio.timeout sends.)
        page = await asyncio.wait_for(store.list(position, limit, where), 5)
        assert len(page.transactions) <= limit
        out += page.transactions
        if not page.next_position:
            return out
        position = page.next_position
    raise AssertionError("list did not end")


async def test_list_pages_newest_first_without_loss_or_duplicates(store: Store) -> None:
    gids = [f"page-{i:02d}" for i in range(17)] + [in_partition(store, 3, f"pg-{i}")
                                                     for i in range(6)]
    for i, gid in enumerate(gids):
        await store.create(make_trans(gid), due_in_ms=60_000)
        if i % 5 == 0:
            await asyncio.sleep(0.003)  # several distinct creation times, some shared
    assert len({partition_of(g, store.partitions) for g in gids}) > 1
    for limit in (1, 4, 7, 23, 50):
        listed = await list_all(store, limit, ListFilter())
        names = [t.gid for t in listed]
        assert len(names) == len(set(names)), f"duplicates with limit {limit}"
        assert sorted(names) == sorted(gids), f"lost entries with limit {limit}"
        times = [t.create_time for t in listed]
        assert times == sorted(times, reverse=True), f"not newest first with limit {limit}"
    assert names[0] == gids[-1]
    assert names[-1] == gids[0]


async def test_list_filters(store: Store) -> None:
    batches: list[list[Trans]] = [[], [], []]
    for b in range(3):
        for i in range(4):
            status = Status.PREPARED if i % 2 else Status.SUBMITTED
            trans_type = "msg" if i == 3 else "saga"
            t = make_trans(f"f{b}-{i}", status, trans_type=trans_type)
            now = await store.create(t, due_in_ms=60_000)
            batches[b].append(replace(t, create_time=now))
        await asyncio.sleep(0.01)
    await store.transition("f0-0", Transition(SUBMITTED, Status.SUCCEED))
    everything = [t for batch in batches for t in batch]

    def gids(ts: list[Trans]) -> list[str]:
        return sorted(t.gid for t in ts)

    prepared = await list_all(store, 2, ListFilter(status="prepared"))
    assert gids(prepared) == gids([t for t in everything if t.status is Status.PREPARED])
    succeeded = await list_all(store, 2, ListFilter(status="succeed"))
    assert gids(succeeded) == ["f0-0"]
    msgs = await list_all(store, 1, ListFilter(trans_type="msg"))
    assert gids(msgs) == ["f0-3", "f1-3", "f2-3"]
    assert all(t.trans_type == "msg" for t in msgs)
    # A time window strictly between the batches selects the middle one.
    start = max(t.create_time for t in batches[0]) + 1
    end = max(t.create_time for t in batches[1]) + 1
    assert start <= min(t.create_time for t in batches[1])
    assert end < min(t.create_time for t in batches[2])
    middle = await list_all(store, 3, ListFilter(create_from_ms=start, create_to_ms=end))
    assert gids(middle) == gids(batches[1])
    newer = await list_all(store, 3, ListFilter(create_from_ms=start))
    assert gids(newer) == gids(batches[1] + batches[2])
    older = await list_all(store, 3, ListFilter(create_to_ms=start))
    assert gids(older) == gids(batches[0])
    # The start of the window is inclusive: "created at or after".
    exact = batches[1][1].create_time
    from_exact = await list_all(store, 5, ListFilter(create_from_ms=exact))
    assert gids(from_exact) == gids([t for t in everything if t.create_time >= exact])
    assert "f1-1" in gids(from_exact)
    both = await list_all(
        store, 1, ListFilter(status="prepared", trans_type="msg", create_from_ms=start)
    )
    assert gids(both) == ["f1-3", "f2-3"]
