"""TCC: the client calls each Try itself; the coordinator then confirms or cancels all.

    async with tcc_global(dtm, gid) as tcc:
        await tcc.call_branch({"amount": 30}, f"{out}/try", f"{out}/confirm", f"{out}/cancel")
        await tcc.call_branch({"amount": 30}, f"{inn}/try", f"{inn}/confirm", f"{inn}/cancel")

Leaving the block normally submits (every Confirm is called); any exception, including a
Try answering FAILURE or a cancellation, aborts (every registered branch's Cancel is
called) and is re-raised. A branch is registered *before* its Try is sent, so a Try that
ran but whose answer was lost is still cancelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from coordinator.client.base import BranchIds, PhasedTrans, encode_payload, phased_scope
from coordinator.client.http import BranchReply, DtmClient, borrow
from coordinator.client.options import TransOptions


class Tcc(PhasedTrans):
    trans_type = "tcc"

    def __init__(
        self, dtm: str | DtmClient, gid: str, options: TransOptions | None = None, *,
        parent_branch: str = "",
    ) -> None:
        super().__init__(dtm, gid, options)
        self.ids = BranchIds(parent_branch)

    @classmethod
    def from_query(cls, dtm: str | DtmClient, query: Mapping[str, str]) -> Tcc:
        """Inside a Try handler: the same global transaction, for nested branches."""
        gid, branch = query.get("gid", ""), query.get("branch_id", "")
        if not gid or not branch:
            raise ValueError(f"not a tcc branch request: gid={gid!r} branch_id={branch!r}")
        return cls(dtm, gid, parent_branch=branch)

    async def call_branch(
        self, payload: object, try_url: str, confirm_url: str, cancel_url: str
    ) -> BranchReply:
        """Register a branch, then POST its Try; the Try's answer, or TransactionFailed /
        TransactionOngoing / BranchCallError."""
        branch_id = self.ids.next()
        body = encode_payload(payload)
        async with borrow(self.dtm) as client:
            await client.post("registerBranch", {
                "gid": self.gid, "trans_type": self.trans_type, "branch_id": branch_id,
                "data": body, "confirm": confirm_url, "cancel": cancel_url,
            })
            return await client.call_branch(
                try_url,
                body=body,
                params={"dtm": client.url, "gid": self.gid, "trans_type": self.trans_type,
                        "branch_id": branch_id, "op": "try"},
                headers=self.options.branch_headers,
                timeout=self.options.request_timeout or None,
            )


@contextlib.asynccontextmanager
async def tcc_global(
    dtm: str | DtmClient, gid: str, options: TransOptions | None = None
) -> AsyncIterator[Tcc]:
    """Prepare a TCC transaction; submit it when the block ends, abort it if it raises."""
    async with borrow(dtm) as client, phased_scope(Tcc(client, gid, options)) as tcc:
        yield tcc
