"""The participant side of XA on MySQL/MariaDB (aiomysql).

    connect = functools.partial(aiomysql.connect, host=…, user=…, db="bank")

    @branch_handler
    async def xa_branch(request, branch):
        if branch.op == "action":
            amount = (await request.json())["amount"]
            await xa_local_transaction(connect, branch, lambda conn: withdraw(conn, amount))
        else:                                     # "commit" or "rollback"
            await xa_phase2(connect, branch)

Each step uses a connection of its own and closes it: MariaDB keeps a prepared XA
transaction private to its session while that session lives (another session's XA
COMMIT answers "unknown XID"), so it must be detached before anyone can finish it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from coordinator.client.barrier_mysql import quiet_cursor
from coordinator.client.http import DtmClient
from coordinator.client.participant import BranchInfo
from coordinator.client.xa import register_xa_branch

Connect = Callable[[], Awaitable[Any]]
_XAER_NOTA = 1397  # unknown XID: already committed/rolled back, or never prepared


def xid_sql(gid: str, branch_id: str) -> str:
    """The XA id as SQL: XA statements take no parameters, so gtrid (the gid) and bqual
    (the branch id) are written as hex literals, which no character can escape."""
    gtrid, bqual = gid.encode(), branch_id.encode()
    if not (0 < len(gtrid) <= 64 and 0 < len(bqual) <= 64):
        raise ValueError("XA needs a gid and a branch id of 1-64 bytes each")
    return f"X'{gtrid.hex()}', X'{bqual.hex()}'"


async def _execute(connect: Connect, statement: str) -> None:
    conn = await connect()
    try:
        await conn.autocommit(True)
        async with conn.cursor(quiet_cursor()) as cur:
            await cur.execute(statement)
    finally:
        conn.close()


async def xa_local_transaction(
    connect: Connect,
    branch: BranchInfo,
    business: Callable[[Any], Awaitable[Any]],
    dtm: str | DtmClient | None = None,
) -> None:
    """Phase one of an XA branch (op ``action``): ``business(conn)`` inside XA START …
    XA PREPARE, then register the branch so the coordinator commits or rolls it back.

    ``business`` must not commit. If it raises, the XA transaction is dropped with its
    session (the server rolls back an unprepared one). The branch is registered only
    after the prepared transaction left its session, so a phase-two call can never
    arrive while the prepare is still in flight; a failed registration rolls the
    prepared transaction back, since no coordinator would ever finish it.
    """
    if branch.op != "action":
        raise ValueError(f"xa_local_transaction handles op 'action', not {branch.op!r}")
    target = dtm or branch.dtm
    if not target or not branch.phase2_url:
        raise ValueError("an XA action call needs the dtm and phase2_url query parameters")
    xid = xid_sql(branch.gid, branch.branch_id)
    conn = await connect()
    try:
        await conn.autocommit(True)
        async with conn.cursor(quiet_cursor()) as cur:
            await cur.execute(f"XA START {xid}")
            await business(conn)
            await cur.execute(f"XA END {xid}")
            await cur.execute(f"XA PREPARE {xid}")
    finally:
        conn.close()
    try:
        await register_xa_branch(target, branch.gid, branch.branch_id, branch.phase2_url)
    except BaseException:
        await _execute(connect, f"XA ROLLBACK {xid}")
        raise


async def xa_phase2(connect: Connect, branch: BranchInfo) -> None:
    """Phase two (op ``commit`` or ``rollback``); a repeat of a finished one succeeds."""
    verbs = {"commit": "COMMIT", "rollback": "ROLLBACK"}
    if branch.op not in verbs:
        raise ValueError(f"xa_phase2 handles commit and rollback, not {branch.op!r}")
    import pymysql

    try:
        await _execute(connect, f"XA {verbs[branch.op]} {xid_sql(branch.gid, branch.branch_id)}")
    except pymysql.err.OperationalError as exc:
        if exc.args and exc.args[0] == _XAER_NOTA:
            return
        raise
