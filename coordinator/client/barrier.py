"""The sub-transaction barrier (DESIGN §5): exactly-once branch effects over at-least-once
delivery, for branches that keep their data in a database of their own.

The coordinator retries until it gets an answer, so a branch may be called twice
(duplicate), a compensation may arrive for an action that never ran (null compensation),
and a late action may arrive after its compensation (hanging). The barrier handles all
three with two insert-ignores into ``dtm_barrier.barrier`` inside the business's own
local transaction:

1. the *origin* row (cancel → try, compensate → action, rollback → action) with
   ``reason`` = the current op: if it was inserted now, the forward op never ran;
2. the *current* row: if it was already there, this is a duplicate, or a forward op
   arriving after its compensation wrote that row in step 1 (hanging).

Only when the current row is new and (for a compensation) the origin row already
existed does the business run; it commits or rolls back together with both rows.
Two concurrent identical calls serialise on the unique key: the second insert waits for
the first transaction and then finds the row.

    async def trans_out(request):             # a saga action on PostgreSQL
        barrier = BranchBarrier.from_query(request.query)
        await barrier.call(pg_barrier, lambda conn: conn.execute(
            "UPDATE account SET balance = balance - $1 WHERE id = $2", 30, "alice"))

`barrier_id` numbers the barrier calls of one handler call (``01``, ``02``…), so a
handler that protects two pieces of work with two `call`s gets two rows per op.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from coordinator.client.errors import DtmError, DuplicatedRequest, TransactionFailed

DEFAULT_TABLE = "dtm_barrier.barrier"

# Compensating op → the forward op it undoes (tcc, saga, workflow).
ORIGIN_OP: Mapping[str, str] = {"cancel": "try", "compensate": "action", "rollback": "action"}

MSG_BRANCH, MSG_OP, MSG_BARRIER = "00", "msg", "01"
ROLLBACK_REASON = "rollback"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?\Z")

Business = Callable[[Any], Awaitable[Any]]


class BarrierResult(enum.StrEnum):
    """What one barrier call did."""

    APPLIED = "applied"  # the business ran and committed with the barrier rows
    DUPLICATE = "duplicate"  # seen before, or hanging (its compensation came first): skipped
    NULL_COMPENSATION = "null_compensation"  # the forward op never ran: nothing to undo


def decide(op: str, origin_inserted: bool, current_inserted: bool) -> BarrierResult:
    """The barrier's rule, from what the two insert-ignores did (pure)."""
    if not current_inserted:
        if op == MSG_OP:
            # A msg's local transaction must run at most once, and never after the
            # back-check recorded a rollback: the caller must learn that it did not run.
            raise DuplicatedRequest("the msg barrier row exists: rolled back or already done")
        return BarrierResult.DUPLICATE
    if op in ORIGIN_OP and origin_inserted:
        return BarrierResult.NULL_COMPENSATION
    return BarrierResult.APPLIED


class BarrierRow(NamedTuple):
    """One row of the barrier table, in the column order of every INSERT."""

    trans_type: str
    gid: str
    branch_id: str
    op: str
    barrier_id: str
    reason: str


@dataclass
class BranchBarrier:
    """The barrier of one handler call, built from the branch request's query string."""

    trans_type: str
    gid: str
    branch_id: str
    op: str
    _calls: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.trans_type and self.gid and self.branch_id and self.op):
            raise ValueError(f"incomplete branch info: {self!r}")

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> BranchBarrier:
        return cls(query.get("trans_type", ""), query.get("gid", ""),
                   query.get("branch_id", ""), query.get("op", ""))

    @property
    def origin_op(self) -> str:
        return ORIGIN_OP.get(self.op, "")

    def next_barrier_id(self) -> str:
        self._calls += 1
        return f"{self._calls:02d}"

    def rows(self, barrier_id: str) -> tuple[BarrierRow | None, BarrierRow]:
        """The origin row (None when the op has no origin) and the current row."""
        origin = None
        if self.origin_op:
            origin = BarrierRow(self.trans_type, self.gid, self.branch_id, self.origin_op,
                                barrier_id, self.op)
        current = BarrierRow(self.trans_type, self.gid, self.branch_id, self.op,
                             barrier_id, self.op)
        return origin, current

    async def call(self, backend: SqlBarrier, business: Business) -> BarrierResult:
        """Run ``business(conn)`` behind this barrier in a local transaction of
        ``backend``; see `SqlBarrier.call`."""
        return await backend.call(self, business)


def check_table_name(table: str) -> str:
    """The table is an identifier, which SQL cannot take as a parameter, so it is
    checked against a strict pattern instead (values are always parameters)."""
    if not _IDENTIFIER.match(table):
        raise ValueError(f"not a plain [schema.]table name: {table!r}")
    return table


class SqlBarrier(abc.ABC):
    """The barrier over one SQL database; backends supply the driver calls."""

    def __init__(self, table: str = DEFAULT_TABLE) -> None:
        self.table = check_table_name(table)

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A local transaction: yields a driver connection, commits on normal exit and
        rolls back on any exception."""

    @abc.abstractmethod
    async def _insert_ignore(self, conn: Any, row: BarrierRow) -> bool:
        """Insert the row unless its unique key exists; whether it was inserted."""

    @abc.abstractmethod
    async def _reason(self, conn: Any, gid: str) -> str | None:
        """The reason of the msg back-check row ``(gid, '00', 'msg', '01')``."""

    async def call(self, barrier: BranchBarrier, business: Business) -> BarrierResult:
        """Write the barrier rows and, unless they say skip, run ``business(conn)``, all in
        one local transaction. An exception from ``business`` (TransactionFailed for a
        business "no") rolls everything back and propagates; a msg barrier whose row
        exists raises DuplicatedRequest."""
        origin, current = barrier.rows(barrier.next_barrier_id())
        async with self._transaction() as conn:
            origin_inserted = await self._insert_ignore(conn, origin) if origin else False
            current_inserted = await self._insert_ignore(conn, current)
            result = decide(barrier.op, origin_inserted, current_inserted)
            if result is BarrierResult.APPLIED:
                await business(conn)
        return result

    async def query_prepared(self, gid: str, trans_type: str = "msg") -> None:
        """The msg back-check: returns if the message's local transaction committed,
        raises TransactionFailed if it did not (and now never will)."""
        row = BarrierRow(trans_type, gid, MSG_BRANCH, MSG_OP, MSG_BARRIER, ROLLBACK_REASON)
        # Inserting first blocks on a local transaction still holding the row, and once
        # "rollback" is written a late local commit fails on the unique key instead.
        async with self._transaction() as conn:
            await self._insert_ignore(conn, row)
        async with self._transaction() as conn:
            reason = await self._reason(conn, gid)
        if reason is None:
            raise DtmError(f"the msg barrier row of {gid} is missing after its insert")
        if reason == ROLLBACK_REASON:
            raise TransactionFailed(f"the local transaction of msg {gid} did not commit")

