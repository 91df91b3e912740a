"""Calls branch URLs over one shared keep-alive session and classifies the answer."""

from __future__ import annotations

import aiohttp

from coordinator.machines.base import SUCCESS, Outcome, OutcomeKind
from coordinator.model import Branch, Trans

_MAX_MESSAGE = 300


class BranchCaller:
    """dtm's branch protocol over HTTP.

    POST when there is a body (always for xa), else GET; query gid, trans_type,
    branch_id and op; 200 is success, 409 or FAILURE in the body is failure, 425 or
    ONGOING in the body is ongoing, anything else (or no answer) is an error.
    """

    def __init__(self, session: aiohttp.ClientSession, default_timeout: float) -> None:
        self.session = session
        self.default_timeout = default_timeout

    async def call(self, trans: Trans, branch: Branch) -> Outcome:
        if not branch.url:
            return SUCCESS
        if not branch.url.startswith(("http://", "https://")):
            return Outcome(OutcomeKind.ERROR, f"unsupported branch URL {branch.url!r}")
        body = trans.payload_of(branch)
        method = "POST" if body or trans.trans_type == "xa" else "GET"
        headers = {"Content-Type": "application/json"}
        headers.update(trans.ext_headers)
        headers.update(trans.options.branch_headers)
        params = {
            "gid": trans.gid,
            "trans_type": trans.trans_type,
            "branch_id": branch.branch_id,
            "op": branch.op.value,
        }
        timeout = aiohttp.ClientTimeout(
            total=trans.options.request_timeout or self.default_timeout
        )
        try:
            async with self.session.request(
                method,
                branch.url,
                params=params,
                data=body.encode() if body else None,
                headers=headers,
                timeout=timeout,
            ) as resp:
                text = await resp.text(errors="replace")
                return classify(resp.status, text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Outcome(OutcomeKind.ERROR, f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE])


def classify(status: int, text: str) -> Outcome:
    if status == 425 or "ONGOING" in text:
        return Outcome(OutcomeKind.ONGOING, text[:_MAX_MESSAGE])
    if status == 409 or "FAILURE" in text:
        return Outcome(OutcomeKind.FAILURE, text[:_MAX_MESSAGE])
    if status == 200:
        return SUCCESS
    return Outcome(OutcomeKind.ERROR, f"HTTP {status}: {text[:_MAX_MESSAGE]}")
