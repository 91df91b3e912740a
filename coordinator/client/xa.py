"""XA over HTTP: each participant runs its part as a local XA transaction and prepares
it; the coordinator then commits or rolls back every registered branch.

Global side:

    async with xa_global(dtm, gid) as xa:
        await xa.call_branch({"amount": 30}, f"{out}/xa")
        await xa.call_branch({"amount": 30}, f"{inn}/xa")

Participant side (one URL answers all three ops; see `participant.py` and
`coordinator.client.xa_mysql` for a MySQL/MariaDB helper): on op ``action`` run the
business inside ``XA START … XA PREPARE`` and register the branch with
`register_xa_branch` (url = the ``phase2_url`` query parameter); on ``commit`` /
``rollback`` finish the prepared XA transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from coordinator.client.base import BranchIds, PhasedTrans, encode_payload, phased_scope
from coordinator.client.http import BranchReply, DtmClient, borrow
from coordinator.client.options import TransOptions


class Xa(PhasedTrans):
    trans_type = "xa"

    def __init__(
        self, dtm: str | DtmClient, gid: str, options: TransOptions | None = None
    ) -> None:
        super().__init__(dtm, gid, options)
        self.ids = BranchIds()

    async def call_branch(self, payload: object, url: str) -> BranchReply:
        """POST the branch's action; it registers itself once its XA part is prepared."""
        branch_id = self.ids.next()
        async with borrow(self.dtm) as client:
            return await client.call_branch(
                url,
                body=encode_payload(payload),
                params={"dtm": client.url, "gid": self.gid, "trans_type": self.trans_type,
                        "branch_id": branch_id, "op": "action", "phase2_url": url},
                headers=self.options.branch_headers,
                timeout=self.options.request_timeout or None,
            )


async def register_xa_branch(
    dtm: str | DtmClient, gid: str, branch_id: str, url: str, payload: object = None
) -> None:
    """Participant side: tell the coordinator to commit/rollback this branch at ``url``."""
    async with borrow(dtm) as client:
        await client.post("registerBranch", {
            "gid": gid, "trans_type": "xa", "branch_id": branch_id, "url": url,
            "data": encode_payload(payload),
        })


@contextlib.asynccontextmanager
async def xa_global(
    dtm: str | DtmClient, gid: str, options: TransOptions | None = None
) -> AsyncIterator[Xa]:
    """Prepare an XA transaction; submit (commit all) when the block ends, abort
    (rollback all) if it raises."""
    async with borrow(dtm) as client, phased_scope(Xa(client, gid, options)) as xa:
        yield xa
