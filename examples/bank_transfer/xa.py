"""An XA branch on MariaDB, and the server's list of prepared XA branches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from coordinator.client import BranchInfo, TransactionFailed, xa_local_transaction, xa_phase2
from examples.bank_transfer.transfer import Transfer
from examples.common import Journal

Connect = Callable[[], Awaitable[Any]]
Business = Callable[[Any, Transfer], Awaitable[None]]


async def xa_branch(
    journal: Journal, name: str, connect: Connect, business: Business,
    request: web.Request, branch: BranchInfo,
) -> None:
    """One URL answers all three XA ops: ``action`` runs the business inside XA START …
    XA PREPARE and registers the branch; ``commit``/``rollback`` finish it."""
    if branch.op != "action":
        await xa_phase2(connect, branch)
        journal.add(branch.gid, f"{name} {branch.op}")
        return
    transfer = await Transfer.of(request)
    try:
        await xa_local_transaction(connect, branch, lambda conn: business(conn, transfer))
    except TransactionFailed:
        journal.add(branch.gid, f"{name} refused")
        raise
    journal.add(branch.gid, f"{name} prepared")


async def prepared_xids(connect: Connect, gid_prefix: str) -> list[tuple[str, str]]:
    """(gid, branch_id) of every prepared XA branch on the server whose gid starts with
    ``gid_prefix``; XA RECOVER lists them for all databases at once."""
    conn = await connect()
    try:
        async with conn.cursor() as cur:
            await cur.execute("XA RECOVER")
            rows = await cur.fetchall()
    finally:
        conn.close()
    found = []
    for _format, gtrid_length, _bqual_length, data in rows:
        gid, branch_id = data[:gtrid_length].decode(), data[gtrid_length:].decode()
        if gid.startswith(gid_prefix):
            found.append((gid, branch_id))
    return found


async def rollback_leftovers(connect: Connect, gid_prefix: str) -> None:
    """A run killed between prepare and commit leaves prepared branches holding row
    locks for ever (a DROP TABLE would wait on them): roll them back before a reset."""
    for gid, branch_id in await prepared_xids(connect, gid_prefix):
        await xa_phase2(connect, BranchInfo(gid, "xa", branch_id, "rollback"))
