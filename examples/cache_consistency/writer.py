"""The price writer: one local transaction changes the price and records the message
whose action deletes the cache entry.

``crash`` stands in for the writer's process dying at the two moments that matter:
``"after-commit"`` (the price and the barrier row are committed, the submit is never
sent) and ``"before-commit"`` (inside the local transaction, so nothing is committed).
"""

from __future__ import annotations

from typing import Any, Literal

from coordinator.client import BranchBarrier, DtmClient, Msg, PostgresBarrier, TransOptions
from examples.cache_consistency.catalog import TABLE
from examples.common import Server

# Unsubmitted messages are back-checked after 1 s rather than the default 35 s, so the
# crash cases finish within seconds.
OPTIONS = TransOptions(wait_result=True, timeout_to_fail=1)

Crash = Literal["", "after-commit", "before-commit"]


class WriterDied(Exception):
    """Raised where the writer's process would have died: nothing after it is sent."""


async def update_price(
    dtm: DtmClient, catalog: Server, barrier: PostgresBarrier, gid: str, product: str,
    price: int, crash: Crash = "",
) -> None:
    msg = Msg(dtm, gid, OPTIONS).add(catalog.url("invalidate"), {"product": product})
    query_prepared = catalog.url("queryPrepared")

    async def write(conn: Any) -> None:
        await conn.execute(f"UPDATE {TABLE} SET price = $1 WHERE id = $2", price, product)
        if crash == "before-commit":
            raise WriterDied("the writer died inside its local transaction")

    if crash != "after-commit":
        # Prepare, UPDATE + barrier row in one local transaction, submit.
        await msg.do_and_submit(query_prepared, barrier, write)
        return

    # do_and_submit_with is the same call with the local step spelled out, which lets
    # the crash fall between the local commit and the submit.
    async def commit_then_die(msg_barrier: BranchBarrier) -> None:
        await msg_barrier.call(barrier, write)
        raise WriterDied("the writer died after its local commit, before the submit")

    await msg.do_and_submit_with(query_prepared, commit_then_die)
