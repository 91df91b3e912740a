"""The workflow state machine (pure).

A workflow runs in the client: it records each step's result with registerBranch and
finishes with submit. The coordinator's part is recovery: an unfinished workflow past its
timeout is handed back to the client by POSTing the workflow's data to
``query_prepared`` (branch ``00``, op = the workflow's name), so the client replays it,
skipping the steps already recorded. That call repeats with back-off until the client
finishes the workflow.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import orjson

from coordinator.machines.base import (
    Defaults,
    Outcome,
    OutcomeKind,
    Plan,
    Retry,
    Verdict,
    deadline_ms,
    is_timed_out,
)
from coordinator.model import Branch, Op, Status, Trans


def recovery_call(trans: Trans) -> Branch:
    """The call that hands the workflow back to its client.

    custom_data is ``{"name": ..., "data": <base64>}`` (dtm encodes the bytes as base64).
    """
    name, data = "", ""
    try:
        custom = orjson.loads(trans.custom_data) if trans.custom_data else {}
        if isinstance(custom, dict):
            name = str(custom.get("name") or "")
            raw = custom.get("data") or ""
            data = base64.b64decode(raw).decode() if isinstance(raw, str) else ""
    except (orjson.JSONDecodeError, binascii.Error, UnicodeDecodeError):
        pass
    return Branch("00", Op.MSG, trans.query_prepared, data=data or "{}", wire_op=name)


class WorkflowMachine:
    def plan(self, trans: Trans, now_ms: int, defaults: Defaults) -> Plan:
        if trans.status in (Status.SUCCEED, Status.FAILED):
            return Plan()
        if not is_timed_out(trans, now_ms, defaults):
            return Plan(wake_at_ms=deadline_ms(trans, defaults))
        if not trans.query_prepared:
            return Plan(wake_at_ms=None)
        return Plan(calls=(recovery_call(trans),))

    def absorb(
        self, trans: Trans, outcomes: Mapping[str, Outcome], now_ms: int, defaults: Defaults
    ) -> Verdict:
        # Whatever the client answered, the workflow is finished only by its own submit;
        # look again after the interval (kept on success/ongoing, doubled on errors).
        retry = Retry.KEEP
        for outcome in outcomes.values():
            if outcome.kind in (OutcomeKind.ERROR, OutcomeKind.FAILURE):
                retry = Retry.BACKOFF
        return Verdict(retry=retry)
