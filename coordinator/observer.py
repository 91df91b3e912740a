"""What the engine and the store report as they work, for metrics (and nothing else).

The engine calls these hooks at a handful of points; the base class does nothing, so
with metrics turned off a hook costs one method call. `coordinator.ops.metrics` fills
them in with Prometheus counters. Keeping the hooks in one small interface means the
engine does not import prometheus-client, and tests can count calls with a subclass.
"""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.machines.base import Outcome
from coordinator.model import Status, Trans


class Observer:
    def finished(self, trans: Trans, status: Status, now_ms: int) -> None:
        """A transaction reached succeed or failed under this engine."""

    def branches_done(self, trans: Trans, outcomes: Mapping[str, Outcome]) -> None:
        """One round of branch operations got its outcomes, keyed by `Branch.key`
        ("01:action"); empty URLs included."""

    def retried(self, trans: Trans) -> None:
        """A round ended in a retry later (ongoing or error)."""

    def lease_takeover(self) -> None:
        """A claim took over a transaction whose previous owner's lease had run out."""

    def script(self, name: str, seconds: float) -> None:
        """A Redis script call took this long (as its caller waited for it)."""


NULL_OBSERVER = Observer()
