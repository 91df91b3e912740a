"""Translation between `Trans`/`Branch` values and the strings kept in Redis hashes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from coordinator.keys import BRANCH_FIELD
from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def pairs_to_dict(flat: Sequence[bytes | str]) -> dict[str, str]:
    """HGETALL as returned inside a script reply: a flat [k, v, k, v, ...] list."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def split_hash(
    fields: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    """One HGETALL of a transaction hash as (transaction fields, branch records keyed
    "<branch_id>:<op>"): the branches are fields of the same hash (see keys.py)."""
    trans: dict[str, str] = {}
    branches: dict[str, str] = {}
    cut = len(BRANCH_FIELD)
    for name, value in fields.items():
        if name.startswith(BRANCH_FIELD):
            branches[name[cut:]] = value
        else:
            trans[name] = value
    return trans, branches


def options_to_json(options: Options) -> str:
    data: dict[str, Any] = {}
    for name in ("wait_result", "timeout_to_fail", "request_timeout", "retry_interval",
                 "retry_limit", "concurrent"):
        value = getattr(options, name)
        if value:
            data[name] = value
    if options.branch_headers:
        data["branch_headers"] = options.branch_headers
    return orjson.dumps(data).decode()


def _loads(raw: str | None, kind: type[Any]) -> Any:
    """Stored JSON of the expected kind, or an empty one: a damaged field must not make
    the whole record unreadable (reads would answer 500 for it forever)."""
    if not raw:
        return kind()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return kind()
    return value if isinstance(value, kind) else kind()


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def options_from_json(raw: str) -> Options:
    data = _loads(raw, dict)
    return Options(
        wait_result=bool(data.get("wait_result", False)),
        timeout_to_fail=_int(data.get("timeout_to_fail")),
        request_timeout=_int(data.get("request_timeout")),
        retry_interval=_int(data.get("retry_interval")),
        retry_limit=_int(data.get("retry_limit")),
        branch_headers=_str_map(data.get("branch_headers")),
        concurrent=bool(data.get("concurrent", False)),
    )


def trans_fields(trans: Trans) -> dict[str, str]:
    """The hash fields `create` stores besides gid, status and the times it sets itself."""
    fields = {
        "trans_type": trans.trans_type,
        "protocol": trans.protocol,
        "options": options_to_json(trans.options),
        "next_cron_interval": str(trans.next_cron_interval),
    }
    if trans.steps:
        fields["steps"] = orjson.dumps(list(trans.steps)).decode()
    if trans.payloads:
        fields["payloads"] = orjson.dumps(list(trans.payloads)).decode()
    for name in ("custom_data", "query_prepared", "rollback_reason", "result", "fingerprint"):
        value = getattr(trans, name)
        if value:
            fields[name] = value
    if trans.ext_headers:
        fields["ext"] = orjson.dumps({"headers": trans.ext_headers}).decode()
    return fields


def flat_pairs(fields: Mapping[str, str]) -> list[str]:
    """Fields as the flat field, value, field, value list the scripts take in ARGV."""
    return [text for pair in fields.items() for text in pair]


def branch_to_json(branch: Branch) -> dict[str, str]:
    out = {
        "branch_id": branch.branch_id,
        "op": branch.op.value,
        "url": branch.url,
        "status": branch.status.value,
    }
    if branch.data:
        out["data"] = branch.data
    return out


def branches_json(branches: Sequence[Branch]) -> str:
    return orjson.dumps([branch_to_json(b) for b in branches]).decode()


def branch_records(branches: Sequence[Branch]) -> list[str]:
    """The branch pairs of create.lua's ARGV: per branch, its field name and its JSON
    record cut off where the creation time goes.

    The script appends the time it reads from Redis to each, instead of decoding and
    re-encoding every record: that JSON work was about half of create's time in Redis.
    """
    out: list[str] = []
    for seq, branch in enumerate(branches, 1):
        record = {**branch_to_json(branch), "seq": seq, "create_time": ""}
        out.append(BRANCH_FIELD + branch.key)
        out.append(orjson.dumps(record)[:-2].decode())  # ends in "create_time":"
    return out


def branch_update_args(
    updates: Mapping[str, BranchStatus], records: Mapping[str, Branch]
) -> list[str]:
    """The branch triples of transition.lua's ARGV: per result, its field name, its new
    status and its record cut off where the update time goes, or "" when the caller's
    copy cannot reproduce the stored record (the script then edits the stored one).

    The record is the one create or register stored (see `branch_records`) with the new
    status; the script appends update_time, and finish_time unless still prepared.
    """
    out: list[str] = []
    for key, status in updates.items():
        out += [f"{BRANCH_FIELD}{key}", status.value, _record_head(records.get(key), status)]
    return out


def _record_head(branch: Branch | None, status: BranchStatus) -> str:
    # A copy without its seq or creation time (never read back) cannot say what is
    # stored, nor can one that stays prepared with a finish time the script would drop.
    if branch is None or not branch.seq or not branch.create_time or (
        status is BranchStatus.PREPARED and branch.finish_time
    ):
        return ""
    record = {
        **branch_to_json(branch), "status": status.value, "seq": branch.seq,
        "create_time": str(branch.create_time), "update_time": "",
    }
    return orjson.dumps(record)[:-2].decode()  # ends in "update_time":"


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def branch_from_json(raw: str) -> Branch:
    data = orjson.loads(raw)
    return Branch(
        branch_id=data["branch_id"],
        op=Op(data["op"]),
        url=data.get("url", ""),
        status=BranchStatus(data.get("status", "prepared")),
        data=data.get("data", ""),
        seq=_int(data.get("seq")),
        create_time=_int(data.get("create_time")),
        update_time=_int(data.get("update_time")),
        finish_time=_int(data.get("finish_time")),
    )


class CorruptRecord(ValueError):
    """A stored transaction the codec cannot read (damaged or edited by hand): an
    unknown status, a branch record that is not JSON. The engine must not guess at it;
    readers show its raw fields instead of failing."""

    def __init__(self, fields: Mapping[str, str], detail: str) -> None:
        super().__init__(f"transaction {fields.get('gid', '?')!r} cannot be read: {detail}")
        self.fields = dict(fields)


def trans_from_record(record: Mapping[str, str]) -> Trans:
    """A transaction from one HGETALL of its hash (transaction and branch fields)."""
    return trans_from_hash(*split_hash(record))


def trans_from_hash(fields: Mapping[str, str], branch_fields: Mapping[str, str]) -> Trans:
    """Raises CorruptRecord for a record whose status or branches cannot be read; the
    other fields fall back to their empty values. A field set to "" reads as absent
    (a finished transaction keeps its lease fields empty rather than deleted)."""
    try:
        return _trans_from_hash(fields, branch_fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecord(fields, f"{type(exc).__name__}: {exc}"[:200]) from exc


def _trans_from_hash(fields: Mapping[str, str], branch_fields: Mapping[str, str]) -> Trans:
    branches = sorted((branch_from_json(v) for v in branch_fields.values()), key=lambda b: b.seq)
    ext = _loads(fields.get("ext"), dict)
    return Trans(
        gid=fields["gid"],
        trans_type=fields.get("trans_type", ""),
        status=Status(fields["status"]),
        steps=tuple(_loads(fields.get("steps"), list)),
        payloads=tuple(_loads(fields.get("payloads"), list)),
        branches=tuple(branches),
        custom_data=fields.get("custom_data", ""),
        query_prepared=fields.get("query_prepared", ""),
        protocol=fields.get("protocol", "http"),
        rollback_reason=fields.get("rollback_reason", ""),
        result=fields.get("result", ""),
        options=options_from_json(fields.get("options", "")),
        ext_headers=_str_map(ext.get("headers")),
        create_time=_int(fields.get("create_time")),
        update_time=_int(fields.get("update_time")),
        finish_time=_int(fields.get("finish_time")),
        rollback_time=_int(fields.get("rollback_time")),
        next_cron_interval=_int(fields.get("next_cron_interval")),
        next_cron_time=_int(fields.get("next_cron_time")),
        retry_count=_int(fields.get("retry_count")),
        owner=fields.get("owner", ""),
        fingerprint=fields.get("fingerprint", ""),
    )
