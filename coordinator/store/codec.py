"""Translation between `Trans`/`Branch` values and the strings kept in Redis hashes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson

from coordinator.keys import BRANCH_FIELD
from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans, record_of


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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


def options_to_json(options: Options, *, wait_result: bool = True) -> str:
    """The stored options: only those set. wait_result=False leaves that one out (the
    fingerprint's view) without copying the record to clear it."""
    data: dict[str, Any] = {}
    if wait_result and options.wait_result:
        data["wait_result"] = options.wait_result
    for name in ("timeout_to_fail", "request_timeout", "retry_interval", "retry_limit",
                 "concurrent"):
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
    """Options of a stored transaction. Most transactions store one of a few spellings
    ("{}", '{"wait_result":true}'), so decoded ones are kept by their text and shared:
    Options are frozen, and nothing changes their headers in place."""
    found = _options_seen.get(raw)
    if found is None:
        found = _options_from_json(raw)
        if len(_options_seen) >= _OPTIONS_KEPT:
            _options_seen.clear()
        _options_seen[raw] = found
    return found


_options_seen: dict[str, Options] = {}
_OPTIONS_KEPT = 256


def _options_from_json(raw: str) -> Options:
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


def trans_field_pairs(trans: Trans) -> list[str]:
    """The hash fields `create` stores besides gid, status and the times it sets itself,
    as the flat name, value, name, value list of create.lua's ARGV."""
    out = [
        "trans_type", trans.trans_type,
        "protocol", trans.protocol,
        "options", options_to_json(trans.options),
        "next_cron_interval", str(trans.next_cron_interval),
    ]
    if trans.steps:
        out += ("steps", orjson.dumps(trans.steps).decode())
    if trans.payloads:
        out += ("payloads", orjson.dumps(trans.payloads).decode())
    for name in ("custom_data", "query_prepared", "rollback_reason", "result", "fingerprint"):
        value = getattr(trans, name)
        if value:
            out += (name, value)
    if trans.ext_headers:
        out += ("ext", orjson.dumps({"headers": trans.ext_headers}).decode())
    return out


def flat_pairs(fields: Mapping[str, str]) -> list[str]:
    """Fields as the flat field, value, field, value list the scripts take in ARGV."""
    return [text for pair in fields.items() for text in pair]


def branch_to_json(branch: Branch) -> dict[str, Any]:
    # The enum members themselves: they are strs, which orjson and the command packer
    # write as their values, and Enum.value is a Python-level property in 3.11 (a
    # tenth of a µs a read, a dozen reads per transaction).
    out: dict[str, Any] = {
        "branch_id": branch.branch_id,
        "op": branch.op,
        "url": branch.url,
        "status": branch.status,
    }
    if branch.data:
        out["data"] = branch.data
    return out


def branches_json(branches: Sequence[Branch]) -> str:
    return orjson.dumps([branch_to_json(b) for b in branches]).decode()


def branch_records(branches: Sequence[Branch]) -> list[str | bytes]:
    """The branch pairs of create.lua's ARGV: per branch, its field name and its JSON
    record cut off where the creation time goes.

    The script appends the time it reads from Redis to each, instead of decoding and
    re-encoding every record: that JSON work was about half of create's time in Redis.
    The records stay bytes: the command packer takes them as they are.
    """
    out: list[str | bytes] = []
    for seq, branch in enumerate(branches, 1):
        record = branch_to_json(branch)
        record["seq"] = seq
        record["create_time"] = ""
        out.append(BRANCH_FIELD + branch.key)
        out.append(orjson.dumps(record)[:-2])  # ends in "create_time":"
    return out


def branch_update_args(
    updates: Mapping[str, BranchStatus], records: Mapping[str, Branch]
) -> list[str | bytes]:
    """The branch triples of transition.lua's ARGV: per result, its field name, its new
    status and its record cut off where the update time goes, or "" when the caller's
    copy cannot reproduce the stored record (the script then edits the stored one).

    The record is the one create or register stored (see `branch_records`) with the new
    status; the script appends update_time, and finish_time unless still prepared.
    """
    out: list[str | bytes] = []
    for key, status in updates.items():
        out += (BRANCH_FIELD + key, status, _record_head(records.get(key), status))
    return out


def _record_head(branch: Branch | None, status: BranchStatus) -> str | bytes:
    # A copy without its seq or creation time (never read back) cannot say what is
    # stored, nor can one that stays prepared with a finish time the script would drop.
    if branch is None or not branch.seq or not branch.create_time or (
        status is BranchStatus.PREPARED and branch.finish_time
    ):
        return ""
    record = branch_to_json(branch)
    record["status"] = status
    record["seq"] = branch.seq
    record["create_time"] = str(branch.create_time)
    record["update_time"] = ""
    return orjson.dumps(record)[:-2]  # ends in "update_time":"


def _int(value: Any) -> int:
    if not value:  # most time fields of a live record are absent: no int() call
        return 0
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


# Enum members by value: a dict lookup costs a tenth of calling the class. The class
# is still called for a value the table does not hold, so an unknown one fails as it
# always did (ValueError, naming the value).
_OPS = {m.value: m for m in Op}
_BRANCH_STATUSES = {m.value: m for m in BranchStatus}
_STATUSES = {m.value: m for m in Status}
_E = TypeVar("_E", Op, BranchStatus, Status)


def _member(table: dict[str, _E], kind: type[_E], value: Any) -> _E:
    try:
        return table[value]
    except (KeyError, TypeError):
        return kind(value)


def status_of(value: Any) -> Status:
    """`Status(value)`, for a tenth of the cost."""
    return _member(_STATUSES, Status, value)


# The decoders below build records from the values of every field, without __init__
# (a claim decodes a hundred at once); tests/test_codec.py checks that they name every
# field.
def branch_from_json(raw: str) -> Branch:
    data = orjson.loads(raw)
    return record_of(Branch, {
        "branch_id": data["branch_id"],
        "op": _member(_OPS, Op, data["op"]),
        "url": data.get("url", ""),
        "status": _member(_BRANCH_STATUSES, BranchStatus, data.get("status", "prepared")),
        "data": data.get("data", ""),
        "seq": _int(data.get("seq")),
        "create_time": _int(data.get("create_time")),
        "update_time": _int(data.get("update_time")),
        "finish_time": _int(data.get("finish_time")),
        "wire_op": "",
    })


class CorruptRecord(ValueError):
    """A stored transaction the codec cannot read (damaged or edited by hand): an
    unknown status, a branch record that is not JSON. The engine must not guess at it;
    readers show its raw fields instead of failing."""

    def __init__(self, fields: Mapping[str, str], detail: str) -> None:
        super().__init__(f"transaction {fields.get('gid', '?')!r} cannot be read: {detail}")
        self.fields = dict(fields)


def trans_from_pairs(flat: Sequence[bytes | str]) -> Trans:
    """A transaction from one HGETALL as returned inside a script reply: a flat
    [name, value, name, value, ...] list, split into transaction and branch fields in
    one pass."""
    # A reply is all str or, from a client that does not decode replies, all bytes.
    texts = cast("Sequence[str]", flat)
    if flat and not isinstance(flat[0], str):
        texts = [_text(x) for x in flat]
    fields: dict[str, str] = {}
    branches: list[str] = []
    # One iterator zipped with itself pairs names with values without copying the
    # reply twice into slices (a claim decodes dozens of these); strict still refuses
    # an odd count.
    items = iter(texts)
    for name, value in zip(items, items, strict=True):
        if name.startswith(BRANCH_FIELD):
            branches.append(value)
        else:
            fields[name] = value
    return _checked(fields, branches)


def trans_from_hash(fields: Mapping[str, str], branch_fields: Mapping[str, str]) -> Trans:
    """Raises CorruptRecord for a record whose status or branches cannot be read; the
    other fields fall back to their empty values. A field set to "" reads as absent
    (a finished transaction keeps its lease fields empty rather than deleted)."""
    return _checked(fields, branch_fields.values())


def _checked(fields: Mapping[str, str], branch_records: Iterable[str]) -> Trans:
    try:
        return _trans_from_hash(fields, branch_records)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecord(fields, f"{type(exc).__name__}: {exc}"[:200]) from exc


def _seq(branch: Branch) -> int:
    return branch.seq


def _trans_from_hash(fields: Mapping[str, str], branch_records: Iterable[str]) -> Trans:
    branches = sorted(map(branch_from_json, branch_records), key=_seq)
    get = fields.get
    ext = _loads(get("ext"), dict)
    return record_of(Trans, {
        "gid": fields["gid"],
        "trans_type": get("trans_type", ""),
        "status": status_of(fields["status"]),
        "steps": tuple(_loads(get("steps"), list)),
        "payloads": tuple(_loads(get("payloads"), list)),
        "branches": tuple(branches),
        "custom_data": get("custom_data", ""),
        "query_prepared": get("query_prepared", ""),
        "protocol": get("protocol", "http"),
        "rollback_reason": get("rollback_reason", ""),
        "result": get("result", ""),
        "options": options_from_json(get("options", "")),
        "ext_headers": _str_map(ext.get("headers")),
        "create_time": _int(get("create_time")),
        "update_time": _int(get("update_time")),
        "finish_time": _int(get("finish_time")),
        "rollback_time": _int(get("rollback_time")),
        "next_cron_interval": _int(get("next_cron_interval")),
        "next_cron_time": _int(get("next_cron_time")),
        "retry_count": _int(get("retry_count")),
        "owner": get("owner", ""),
        "fingerprint": get("fingerprint", ""),
    })
