"""The store contract: what the engine and the API need from persistent state.

Every write is a compare-and-set: it names the statuses it expects to find and fails
with a typed error (`StatusConflict`, `LeaseLost`, `NotFound`, `AlreadyExists`) when the
stored transaction disagrees. A second backend passes by implementing this class and
running `tests/store_contract.py` against it.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.model import Branch, BranchStatus, Status, Trans
from coordinator.observer import NULL_OBSERVER, Observer


@dataclass(frozen=True)
class Transition:
    """One compare-and-set change of a transaction.

    lease: ``"renew"`` (the owner keeps working), ``"release"`` (the owner is done until
    ``next_due_ms``), ``"acquire:<token>"`` (take the lease if it is free) or ``""``.
    """

    expected: frozenset[Status]
    new_status: Status | None = None
    owner: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)
    branch_updates: Mapping[str, BranchStatus] = field(default_factory=dict)
    # The caller's copies of the changed branches (keys as in branch_updates): the store
    # writes a record from its copy instead of reading and re-encoding the stored one.
    records: Mapping[str, Branch] = field(default_factory=dict)
    next_due_ms: int | None = None
    lease: str = ""
    lease_ms: int = 0


@dataclass(frozen=True)
class TransitionResult:
    status: Status
    now: int
    acquired: bool


@dataclass(frozen=True)
class Claimed:
    """A transaction leased to a worker; every write it makes must carry `token`."""

    trans: Trans
    token: str
    now: int
    # Another worker held it before and its lease ran out (it crashed or stalled).
    taken_over: bool = False


@dataclass(frozen=True)
class Page:
    transactions: list[Trans]
    next_position: str


@dataclass(frozen=True)
class Topic:
    name: str
    subscribers: list[dict[str, str]]  # [{"url": ..., "remark": ...}]
    version: int


@dataclass(frozen=True)
class ListFilter:
    status: str = ""
    trans_type: str = ""
    create_from_ms: int = 0
    create_to_ms: int = 0


class Store(abc.ABC):
    """Persistent transaction state. Implementations must be safe for many processes."""

    partitions: int
    # Script latencies are reported here (coordinator/observer.py); a no-op by default.
    observer: Observer = NULL_OBSERVER

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare the backend (load scripts, check the layout)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def create(
        self, trans: Trans, *, due_in_ms: int, owner: str = "", lease_ms: int = 0
    ) -> int:
        """Store a new transaction; return the store's clock (ms). Raises AlreadyExists."""

    @abc.abstractmethod
    async def transition(self, gid: str, change: Transition) -> TransitionResult:
        """Apply one compare-and-set change."""

    @abc.abstractmethod
    async def load(self, gid: str) -> Trans | None:
        """A consistent snapshot of one transaction with its branches."""

    @abc.abstractmethod
    async def claim(self, partition: int, limit: int, token_prefix: str) -> list[Claimed]:
        """Lease up to `limit` due transactions of one partition."""

    @abc.abstractmethod
    async def list(self, position: str, limit: int, where: ListFilter) -> Page:
        """Transactions newest first, `limit` at a time, resuming after `position`."""

    @abc.abstractmethod
    async def sweep(self, partition: int) -> int:
        """Drop index entries of expired transactions; return how many."""

    @abc.abstractmethod
    async def register_branches(
        self, gid: str, branches: Sequence[Branch], *, expected: frozenset[Status], unique: bool
    ) -> int:
        """Add run-time branches (tcc, xa, workflow); return how many were new.

        A branch already there is kept as it is: skipped (a retried registration), or
        with `unique` (workflow steps) the whole call is refused with TransactionFailure.
        """

    @abc.abstractmethod
    async def reset_due(self, partition: int, wait_ms: int, limit: int) -> tuple[int, bool]:
        """Make entries due later than now + wait_ms due now; (count, more remain)."""

    @abc.abstractmethod
    async def change_topic(self, subscribe: bool, topic: str, url: str, remark: str) -> None:
        """Subscribe or unsubscribe a URL. Raises AlreadyExists / NotFound."""

    @abc.abstractmethod
    async def topics(self) -> dict[str, Topic]:
        """Every topic with its subscribers."""

    @abc.abstractmethod
    async def delete_topic(self, topic: str) -> bool: ...

    async def ping(self) -> bool:
        return True

    async def health(self) -> dict[str, Any]:
        """Reachability of the backend's servers: ``{"ok": bool, ...}``."""
        return {"ok": await self.ping()}

    async def due_partitions(self) -> builtins.list[int]:
        """Partitions that may hold due work (a backend that cannot tell: all of them)."""
        return list(range(self.partitions))
