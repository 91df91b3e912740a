"""Two-phase message: commit a local transaction and the intent to call actions, atomically.

    msg = Msg(dtm, gid).add(f"{inn}/TransIn", {"amount": 30})
    await msg.do_and_submit(f"{me}/queryPrepared", PostgresBarrier(pool), transfer_out)

``do_and_submit`` prepares the message, runs ``transfer_out(conn)`` and the barrier row
``(gid, '00', 'msg', '01')`` in one local transaction, then submits. If the process dies
after the local commit and before the submit, the coordinator's back-check calls
``queryPrepared`` (whose handler is ``backend.query_prepared(gid)``), which finds the row
and answers success; if it died before the commit, the back-check writes a ``rollback``
row first (so a late commit can no longer happen) and answers FAILURE.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from coordinator.client.barrier import BarrierResult, BranchBarrier, SqlBarrier
from coordinator.client.base import TransBase, encode_payload
from coordinator.client.errors import TransactionFailed

MSG_BRANCH = "00"
MSG_OP = "msg"
TOPIC_PREFIX = "topic://"


class Msg(TransBase):
    trans_type = "msg"
    _delay = 0

    def add(self, action: str, payload: object = None) -> Msg:
        self.steps.append({"action": action})
        self.payloads.append(encode_payload(payload))
        return self

    def add_topic(self, topic: str, payload: object = None) -> Msg:
        """An action fanned out to every URL subscribed to ``topic``."""
        return self.add(TOPIC_PREFIX + topic, payload)

    def set_delay(self, seconds: int) -> Msg:
        """Hold the first action call back by ``seconds`` after the submit."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._delay = seconds
        return self

    def _prepare_wire(self) -> None:
        self.custom_data = (
            orjson.dumps({"delay": self._delay}).decode() if self._delay else ""
        )

    async def prepare(self, query_prepared: str) -> None:
        """Record the message as prepared; the coordinator back-checks ``query_prepared``
        if no submit or abort arrives within timeout_to_fail."""
        self.query_prepared = query_prepared or self.query_prepared
        self._prepare_wire()
        await self._call("prepare")

    async def submit(self) -> None:
        if not self.steps:
            raise ValueError("a msg needs at least one action")
        self._prepare_wire()
        await self._call("submit")

    async def abort(self) -> None:
        await self._call("abort")

    def barrier(self) -> BranchBarrier:
        """The barrier of the local transaction: branch ``00``, op ``msg``."""
        return BranchBarrier(self.trans_type, self.gid, MSG_BRANCH, MSG_OP)

    async def do_and_submit_with(
        self, query_prepared: str, local: Callable[[BranchBarrier], Awaitable[Any]]
    ) -> None:
        """Prepare, run ``local(barrier)``, then submit; the general form.

        ``local`` must write the msg barrier row in the same local transaction as the
        business (``backend.call(barrier, business)`` or the Redis
        ``adjust_amount(barrier, …)`` do). If it raises TransactionFailed the business
        said no: the message is aborted and the error re-raised. Any other exception
        (including a failed submit) leaves the outcome unknown from here, so nothing
        more is sent: the coordinator back-checks ``query_prepared`` once the message
        times out, and the barrier row decides.
        """
        if not self.steps:
            raise ValueError("a msg needs at least one action")
        await self.prepare(query_prepared)
        try:
            await local(self.barrier())
        except TransactionFailed:
            await self.abort()
            raise
        await self.submit()

    async def do_and_submit(
        self,
        query_prepared: str,
        backend: SqlBarrier,
        business: Callable[[Any], Awaitable[Any]],
    ) -> BarrierResult:
        """Prepare, run ``business(conn)`` with the msg barrier row in one local
        transaction of ``backend``, then submit (see `do_and_submit_with`)."""
        result = BarrierResult.APPLIED

        async def local(barrier: BranchBarrier) -> None:
            nonlocal result
            result = await backend.call(barrier, business)

        await self.do_and_submit_with(query_prepared, local)
        return result
