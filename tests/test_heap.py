"""The serving process's garbage-collector settings (coordinator/heap.py)."""

from __future__ import annotations

import gc

from coordinator.heap import GEN0_THRESHOLD, settle


def test_settle_freezes_what_start_up_left_and_widens_the_young_generation() -> None:
    before = gc.get_threshold()
    start_up = [{"record": i} for i in range(1000)]  # long-lived, like the app's objects
    try:
        settle()
        # Everything alive at settle() is out of the collector's reach from now on, so
        # a full collection no longer walks it (the 20-130 ms pauses under load).
        assert gc.get_freeze_count() >= len(start_up)
        oldest = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(x) in oldest for x in start_up)
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
