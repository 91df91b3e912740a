"""Rendering transactions and branches as dtm's JSON (field names, omitempty, times)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from coordinator.keys import SPEC_FIELD
from coordinator.model import Branch, Trans
from coordinator.requests import WorkflowState
from coordinator.store.base import Page
from coordinator.store.codec import options_to_json, spec_as_stored


def rfc3339(ms: int) -> str | None:
    """A stored time as dtm writes it; None (left out) for zero and for any value no
    calendar holds: rendering must not fail on what a read finds in Redis, or one bad
    record turns `query` and every `all` page holding it into a 500."""
    if not ms or not 0 < ms < _MAX_MS:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# 9999-12-31T23:59:59.999Z, the last moment datetime can hold.
_MAX_MS = 253_402_300_800_000


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    """dtm marks these fields omitempty: leave out zero values."""
    if value:
        out[name] = value


def trans_json(t: Trans) -> dict[str, Any]:
    out: dict[str, Any] = {
        "create_time": rfc3339(t.create_time),
        "update_time": rfc3339(t.update_time),
    }
    _put(out, "gid", t.gid)
    _put(out, "trans_type", t.trans_type)
    _put(out, "steps", list(t.steps))
    _put(out, "payloads", list(t.payloads))
    _put(out, "status", t.status.value)
    _put(out, "query_prepared", t.query_prepared)
    _put(out, "protocol", t.protocol)
    _put(out, "finish_time", rfc3339(t.finish_time))
    _put(out, "rollback_time", rfc3339(t.rollback_time))
    _put(out, "result", t.result)
    _put(out, "rollback_reason", t.rollback_reason)
    options = options_to_json(t.options)
    _put(out, "options", "" if options == "{}" else options)
    _put(out, "custom_data", t.custom_data)
    _put(out, "next_cron_interval", t.next_cron_interval)
    _put(out, "next_cron_time", rfc3339(t.next_cron_time))
    _put(out, "owner", t.owner)
    o = t.options
    _put(out, "wait_result", o.wait_result)
    _put(out, "timeout_to_fail", o.timeout_to_fail)
    _put(out, "request_timeout", o.request_timeout)
    _put(out, "retry_interval", o.retry_interval)
    _put(out, "branch_headers", o.branch_headers)
    out["concurrent"] = o.concurrent
    _put(out, "retry_limit", o.retry_limit)
    _put(out, "retry_count", t.retry_count)
    return out


def raw_trans_json(fields: Mapping[str, str]) -> dict[str, Any]:
    """A record the codec could not read, shown as stored: what a read can still say."""
    created = _whole(fields.get("create_time"))
    out: dict[str, Any] = {
        "create_time": rfc3339(created),
        "update_time": rfc3339(_whole(fields.get("update_time")) or created),
    }
    spec = spec_as_stored(fields.get(SPEC_FIELD)) or {}
    for name in ("gid", "trans_type", "status", "protocol", "custom_data", "rollback_reason"):
        value = fields.get(name) or spec.get(name, "")
        _put(out, name, value if isinstance(value, str) else "")
    out["concurrent"] = False
    return out


def _whole(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def branch_json(t: Trans, b: Branch) -> dict[str, Any]:
    out: dict[str, Any] = {
        "create_time": rfc3339(b.create_time),
        "update_time": rfc3339(b.update_time),
    }
    _put(out, "gid", t.gid)
    _put(out, "url", b.url)
    body = t.payload_bytes(b)
    # dtm stores the body as bytes, which Go's JSON encoder writes as base64.
    _put(out, "bin_data", base64.b64encode(body).decode() if body else "")
    _put(out, "branch_id", b.branch_id)
    _put(out, "op", b.op.value)
    _put(out, "status", b.status.value)
    _put(out, "finish_time", rfc3339(b.finish_time))
    return out


def query_json(t: Trans | None) -> dict[str, Any]:
    if t is None:
        return {"transaction": None, "branches": []}
    return {"transaction": trans_json(t), "branches": [branch_json(t, b) for b in t.branches]}


def page_json(page: Page) -> dict[str, Any]:
    return {"transactions": [trans_json(t) for t in page.transactions],
            "next_position": page.next_position}


def workflow_json(state: WorkflowState) -> dict[str, Any]:
    t = state.trans
    return {"transaction": trans_json(t),
            "progresses": [branch_json(t, b) for b in state.progresses]}
