"""What every global transaction shares: its wire JSON and the calls to the coordinator."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar, TypeVar

import orjson

from coordinator.client.http import DtmClient, borrow
from coordinator.client.options import TransOptions


def encode_payload(payload: object) -> str:
    """A branch body: ``str``/``bytes`` are sent as they are (already serialised),
    ``None`` as no body (the coordinator then calls with GET), anything else as JSON."""
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload).decode()
    return orjson.dumps(payload).decode()


class BranchIds:
    """Branch ids ``01``…``99`` under an optional parent id (nested TCC/XA branches)."""

    def __init__(self, parent: str = "") -> None:
        if len(parent) > 20:
            raise ValueError("a parent branch id may have at most 20 characters")
        self.parent = parent
        self._last = 0

    def next(self) -> str:
        if self._last >= 99:
            raise ValueError("a global transaction may register at most 99 branches per level")
        self._last += 1
        return f"{self.parent}{self._last:02d}"


class TransBase:
    """A global transaction being built by a client.

    ``dtm`` is a `DtmClient` (one session for many transactions) or the coordinator's
    URL (each call then opens a short-lived session).
    """

    trans_type: ClassVar[str]

    def __init__(
        self, dtm: str | DtmClient, gid: str, options: TransOptions | None = None
    ) -> None:
        if not gid:
            raise ValueError("gid must not be empty")
        self.dtm = dtm
        self.gid = gid
        self.options = options or TransOptions()
        self.steps: list[dict[str, str]] = []
        self.payloads: list[str] = []
        self.custom_data = ""
        self.query_prepared = ""
        self.rollback_reason = ""

    def to_wire(self) -> dict[str, Any]:
        """The transaction JSON of dtm's protocol (DESIGN §4)."""
        body: dict[str, Any] = {
            "gid": self.gid,
            "trans_type": self.trans_type,
            "steps": self.steps,
            "payloads": self.payloads,
            "custom_data": self.custom_data,
            "query_prepared": self.query_prepared,
            **self.options.to_wire(),
        }
        if self.rollback_reason:
            body["rollback_reason"] = self.rollback_reason
        return body

    async def _call(self, op: str) -> None:
        async with borrow(self.dtm) as client:
            await client.post(op, self.to_wire())


class PhasedTrans(TransBase):
    """TCC and XA: prepared first, branches registered while it runs, then submitted
    (confirm/commit every branch) or aborted (cancel/rollback every branch)."""

    async def prepare(self) -> None:
        await self._call("prepare")

    async def submit(self) -> None:
        await self._call("submit")

    async def abort(self, reason: str = "") -> None:
        self.rollback_reason = reason[:1000]
        await self._call("abort")


_P = TypeVar("_P", bound=PhasedTrans)


@contextlib.asynccontextmanager
async def phased_scope(trans: _P) -> AsyncIterator[_P]:
    """Prepare; submit when the block ends, abort if it raises (and re-raise)."""
    await trans.prepare()
    try:
        yield trans
    except GeneratorExit:
        raise
    except BaseException as exc:
        # Also on cancellation: the branches that ran must be undone. If the abort
        # itself fails, the prepared transaction times out and is aborted anyway.
        try:
            await trans.abort(f"{type(exc).__name__}: {exc}")
        except Exception as abort_exc:
            exc.add_note(f"abort of {trans.trans_type} {trans.gid} failed too: {abort_exc!r}")
        raise
    await trans.submit()
