"""Logs each branch outcome that is not a success, once, rate-limited per URL.

An operator needs to see that a participant refuses, errs or keeps answering "not yet",
with enough to find the call (gid, branch, op, URL, answer, duration, next retry). A
participant that is down for everyone would otherwise write one line per transaction and
per retry, so each URL gets a small token bucket; what it drops is counted and reported
with that URL's next line as "N similar suppressed".

The context goes into the record's extras (gid, trans_type, branch_id, op, url, outcome,
http_status, duration_ms, next_retry_s) for a structured formatter.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.machines.base import Outcome, OutcomeKind
from coordinator.model import Branch, Trans

log = logging.getLogger("coordinator.branches")

BURST = 5  # lines a URL may log at once
REFILL_SECONDS = 2.0  # then one more line per this many seconds
MAX_URLS = 4096  # buckets kept (least recently used dropped): bounded memory


@dataclass
class _Bucket:
    tokens: float
    at: float
    suppressed: int = 0


class BranchLog:
    def __init__(
        self, logger: logging.Logger = log, *, burst: int = BURST,
        refill_seconds: float = REFILL_SECONDS, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _take(self, url: str) -> int | None:
        """None when this line is suppressed, else how many were suppressed before it."""
        now = self.clock()
        bucket = self._buckets.pop(url, None) or _Bucket(float(self.burst), now)
        self._buckets[url] = bucket  # most recently used last
        if len(self._buckets) > MAX_URLS:
            self._buckets.popitem(last=False)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) / self.refill_seconds)
        bucket.at = now
        if bucket.tokens < 1:
            bucket.suppressed += 1
            return None
        bucket.tokens -= 1
        suppressed, bucket.suppressed = bucket.suppressed, 0
        return suppressed

    def report(
        self, trans: Trans, branch: Branch, outcome: Outcome, duration_s: float,
        next_retry_s: float | None,
    ) -> None:
        """`next_retry_s`: seconds until the branch is called again (0: at once), or
        None when it is not called again (the action failed for good)."""
        if outcome.kind is OutcomeKind.SUCCESS:
            return
        level = logging.WARNING if outcome.kind is OutcomeKind.ERROR else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        suppressed = self._take(branch.url)
        if suppressed is None:
            return
        if next_retry_s is None:
            retry = "not retried"
        elif next_retry_s <= 0:
            retry = "retried at once"
        else:
            retry = f"next retry in {next_retry_s:g} s"
        answer = f"HTTP {outcome.status}" if outcome.status else "no answer"
        detail = outcome.message.removeprefix(f"HTTP {outcome.status}: ")[:200]
        self.logger.log(
            level,
            "%s %s branch %s %s %s: %s (%s) %s after %.0f ms; %s%s",
            trans.trans_type, trans.gid, branch.branch_id, branch.op_name, branch.url,
            outcome.kind.value, answer, detail, duration_s * 1000, retry,
            f" ({suppressed} similar suppressed)" if suppressed else "",
            extra={
                "gid": trans.gid, "trans_type": trans.trans_type,
                "branch_id": branch.branch_id, "op": branch.op_name, "url": branch.url,
                "outcome": outcome.kind.value, "http_status": outcome.status,
                "duration_ms": round(duration_s * 1000), "next_retry_s": next_retry_s,
            },
        )
