"""The per-host limit of the HTTP/1.1 client's requests: at most the limit at a time,
the others served in order, and a cancelled waiter neither keeps nor loses a slot."""

from __future__ import annotations

import asyncio

from coordinator.engine.http1 import _Slots


async def take(slots: _Slots) -> None:
    # As Http1Pool.request takes a slot.
    if not slots.try_take():
        await slots.wait()


async def test_slots_limit_and_order() -> None:
    slots = _Slots(2)
    await take(slots)
    await take(slots)
    assert slots.free == 0
    order: list[int] = []

    async def waiter(i: int) -> None:
        await take(slots)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == []
    assert len(slots.waiters) == 3
    slots.release()
    await asyncio.sleep(0)
    assert order == [0]
    slots.release()
    slots.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert slots.free == 0
    slots.release()
    slots.release()
    assert slots.free == 2


async def test_cancelled_waiter_gives_no_slot_away_and_keeps_none() -> None:
    slots = _Slots(1)
    await take(slots)
    queued = asyncio.create_task(take(slots))
    await asyncio.sleep(0)
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert not slots.waiters
    slots.release()
    assert slots.free == 1


async def test_waiter_cancelled_after_the_handover_passes_the_slot_on() -> None:
    slots = _Slots(1)
    await take(slots)
    first = asyncio.create_task(take(slots))
    second = asyncio.create_task(take(slots))
    await asyncio.sleep(0)
    slots.release()  # the slot goes to `first`, which is cancelled before it runs
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert slots.free == 0
    assert not slots.waiters
    slots.release()
    assert slots.free == 1
