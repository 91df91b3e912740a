"""Shared vocabulary of the state machines.

A state machine is a pair of pure functions over plain values: `plan` looks at a
transaction (with its branches) and the current time and says what to do next;
`absorb` turns the outcomes of branch calls into branch statuses and, perhaps, a new
global status. Neither performs I/O nor reads a clock; the engine supplies `now_ms`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Protocol

from coordinator.model import Branch, BranchStatus, Status, Trans


class OutcomeKind(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # the business said no (409 or FAILURE in the body)
    ONGOING = "ongoing"  # not yet (425 or ONGOING in the body): retry, same interval
    ERROR = "error"  # anything else: retry with a doubled interval


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    message: str = ""
    status: int = 0  # the HTTP status, when there was an answer (for logs)


SUCCESS = Outcome(OutcomeKind.SUCCESS)


class Retry(enum.IntEnum):
    """How the next attempt is scheduled; the strongest wins within one round."""

    NONE = 0
    KEEP = 1
    BACKOFF = 2


@dataclass(frozen=True)
class Defaults:
    """Server-wide defaults that a transaction's own options override."""

    retry_interval: int = 10
    max_retry_interval: int = 3600
    timeout_to_fail: int = 35  # tcc, xa and msg in prepared; sagas have none unless set
    request_timeout: int = 3


# Plan and Verdict are named tuples rather than frozen dataclasses: the engine makes a
# few of each per transaction, and a frozen dataclass's __init__ (one object.__setattr__
# per field) cost three times as much.
_NO_UPDATES: Mapping[str, BranchStatus] = MappingProxyType({})
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})


class Plan(NamedTuple):
    """The next step: change the global status, or call these branches, or wait."""

    new_status: Status | None = None
    reason: str = ""
    calls: tuple[Branch, ...] = ()
    # With nothing to do now: the time to look again (None: only when poked).
    wake_at_ms: int | None = None


class Verdict(NamedTuple):
    """What a round of branch outcomes means."""

    branch_updates: Mapping[str, BranchStatus] = _NO_UPDATES
    new_status: Status | None = None
    reason: str = ""
    retry: Retry = Retry.NONE
    fields: Mapping[str, str] = _NO_FIELDS
    # The unfinished branches are to be called again at once (retry_limit, as in dtm);
    # the engine bounds how long such a burst may last.
    retry_at_once: bool = False


class Machine(Protocol):
    def plan(self, trans: Trans, now_ms: int, defaults: Defaults) -> Plan: ...

    def absorb(
        self, trans: Trans, outcomes: Mapping[str, Outcome], now_ms: int, defaults: Defaults
    ) -> Verdict: ...


def base_interval(trans: Trans, defaults: Defaults) -> int:
    return trans.options.retry_interval or defaults.retry_interval


def next_interval(trans: Trans, retry: Retry, defaults: Defaults) -> int:
    """Seconds until the next attempt: kept on ongoing, doubled on error."""
    base = base_interval(trans, defaults)
    current = trans.next_cron_interval or base
    if retry is Retry.BACKOFF:
        # 0 means no retry was scheduled since the creation or the last success: the
        # first error waits the base interval, each further one doubles it (1, 2, 4 s).
        # Doubling from the base at once made the first wait 2x retry_interval.
        if not trans.next_cron_interval:
            return base
        return min(max(current * 2, base), max(defaults.max_retry_interval, base))
    if retry is Retry.KEEP:
        return current
    return base


def timeout_of(trans: Trans, defaults: Defaults) -> int:
    """Seconds after creation at which the transaction gives up (0: never)."""
    if trans.options.timeout_to_fail:
        return trans.options.timeout_to_fail
    return 0 if trans.trans_type == "saga" else defaults.timeout_to_fail


def deadline_ms(trans: Trans, defaults: Defaults) -> int | None:
    timeout = timeout_of(trans, defaults)
    return trans.create_time + timeout * 1000 if timeout else None


def is_timed_out(trans: Trans, now_ms: int, defaults: Defaults) -> bool:
    deadline = deadline_ms(trans, defaults)
    return deadline is not None and now_ms >= deadline
