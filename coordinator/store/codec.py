"""Translation between `Trans`/`Branch` values and the strings kept in Redis hashes."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson

from coordinator.keys import BRANCH_FIELD, SPEC_FIELD
from coordinator.model import (
    FINISHED,
    Branch,
    BranchStatus,
    Op,
    Options,
    Status,
    Trans,
    record_of,
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def split_hash(
    fields: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    """One HGETALL of a transaction hash as (transaction fields, branch records keyed
    "<branch_id>:<op>"): the branches are fields of the same hash (see keys.py)."""
    return _split(fields.items())


def _split(pairs: Iterable[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    trans: dict[str, str] = {}
    branches: dict[str, str] = {}
    cut = len(BRANCH_FIELD)
    for name, value in pairs:
        if name.startswith(BRANCH_FIELD):
            branches[name[cut:]] = value
        else:
            trans[name] = value
    return trans, branches


def options_to_json(options: Options, *, wait_result: bool = True) -> str:
    """The stored options: only those set. wait_result=False leaves that one out (the
    fingerprint's view) without copying the record to clear it."""
    return orjson.dumps(options_dict(options, wait_result=wait_result)).decode()


def options_dict(options: Options, *, wait_result: bool = True) -> dict[str, Any]:
    """The options that are set, as `options_to_json` writes them."""
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
    return data


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
    return _shared(raw, _options_from_json, raw)


def _shared(key: Hashable, make: Callable[[_A], Options], arg: _A) -> Options:
    """The Options kept for `key`, made by make(arg) the first time."""
    found = _options_seen.get(key)
    if found is None:
        found = make(arg)
        if len(_options_seen) >= _OPTIONS_KEPT:
            _options_seen.clear()
        _options_seen[key] = found
    return found


# Keyed by stored text (layout 4) or by the spec's items: the two never collide.
_options_seen: dict[Hashable, Options] = {}
_OPTIONS_KEPT = 256
_A = TypeVar("_A")


def _options_from_json(raw: str) -> Options:
    return _options_from_dict(_loads(raw, dict))


def _options_from_dict(data: dict[str, Any]) -> Options:
    return Options(
        wait_result=bool(data.get("wait_result", False)),
        timeout_to_fail=_int(data.get("timeout_to_fail")),
        request_timeout=_int(data.get("request_timeout")),
        retry_interval=_int(data.get("retry_interval")),
        retry_limit=_int(data.get("retry_limit")),
        branch_headers=_str_map(data.get("branch_headers")),
        concurrent=bool(data.get("concurrent", False)),
    )


def trans_field_pairs(trans: Trans) -> list[str | bytes]:
    """The hash fields `create` stores besides gid, status and the times it sets itself,
    as the flat name, value, name, value list of create.lua's ARGV: the spec (the
    transaction as sent, branches included, in one JSON object; see keys.SPEC_FIELD),
    and the fields a later write may change, when a create already sets them."""
    spec: dict[str, Any] = {"trans_type": trans.trans_type, "protocol": trans.protocol}
    options = options_dict(trans.options)
    if options:
        spec["options"] = options
    if trans.next_cron_interval:
        spec["next_cron_interval"] = trans.next_cron_interval
    if trans.steps:
        spec["steps"] = trans.steps
    if trans.payloads:
        spec["payloads"] = trans.payloads
    for name in ("custom_data", "query_prepared", "fingerprint"):
        value = getattr(trans, name)
        if value:
            spec[name] = value
    if trans.ext_headers:
        spec["ext"] = {"headers": trans.ext_headers}
    if trans.branches:
        spec["branches"] = [_spec_branch(b) for b in trans.branches]
    # Bytes: the command packer takes them as they are.
    out: list[str | bytes] = [SPEC_FIELD, orjson.dumps(spec)]
    for name in ("rollback_reason", "result"):
        value = getattr(trans, name)
        if value:
            out += (name, value)
    return out


def _spec_branch(branch: Branch) -> dict[str, Any]:
    # A branch's place in the spec is its seq, and its creation time the transaction's.
    out: dict[str, Any] = {"branch_id": branch.branch_id, "op": branch.op, "url": branch.url}
    if branch.status is not BranchStatus.PREPARED:
        out["status"] = branch.status
    if branch.data:
        out["data"] = branch.data
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


def branch_update_args(
    updates: Mapping[str, BranchStatus], records: Mapping[str, Branch]
) -> list[str | bytes]:
    """The branch triples of transition.lua's ARGV: per result, its field name, its new
    status and, for a branch with a record of its own, that record cut off where the
    update time goes; "" for a branch of the spec (the script stores only its state) or
    when the caller's copy cannot reproduce the stored record (the script then edits the
    stored one).

    The record is the one register stored (or an older layout's create) with the new
    status; the script appends update_time, and finish_time unless still prepared.
    """
    out: list[str | bytes] = []
    for key, status in updates.items():
        out += (BRANCH_FIELD + key, status, _record_head(records.get(key), status))
    return out


def _record_head(branch: Branch | None, status: BranchStatus) -> str | bytes:
    # A copy without its seq or creation time (never read back) cannot say what is
    # stored, nor can one that stays prepared with a finish time the script would drop.
    if branch is None or branch.in_spec or not branch.seq or not branch.create_time or (
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
        "in_spec": False,
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
    # One iterator zipped with itself pairs names with values without copying the
    # reply twice into slices (a claim decodes dozens of these); strict still refuses
    # an odd count.
    items = iter(texts)
    fields, branches = _split(zip(items, items, strict=True))
    return _checked(fields, branches, True)


def trans_from_hash(
    fields: Mapping[str, str], branch_fields: Mapping[str, str], *, with_branches: bool = True
) -> Trans:
    """Raises CorruptRecord for a record whose status or branches cannot be read; the
    other fields fall back to their empty values. A field set to "" reads as absent
    (an ended lease leaves its fields empty rather than deleted). `branch_fields` are
    keyed "<branch_id>:<op>" (see `split_hash`); with_branches=False leaves the
    branches out (a listing shows none)."""
    return _checked(fields, branch_fields, with_branches)


def _checked(
    fields: Mapping[str, str], branch_fields: Mapping[str, str], with_branches: bool
) -> Trans:
    try:
        return _trans_from_hash(fields, branch_fields, with_branches)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptRecord(fields, f"{type(exc).__name__}: {exc}"[:200]) from exc


def _seq(branch: Branch) -> int:
    return branch.seq


def spec_as_stored(raw: str | None) -> dict[str, Any] | None:
    """The spec of a record the codec cannot read, for showing it: None if there is
    none or it is not a JSON object."""
    if raw is None:
        return None
    try:
        spec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return spec if isinstance(spec, dict) else None


def _spec_of(fields: Mapping[str, str]) -> dict[str, Any] | None:
    """The decoded spec, or None for a record of layout 4 (a field per value). A spec
    that cannot be read makes the record unreadable: it holds the branches."""
    raw = fields.get(SPEC_FIELD)
    if raw is None:
        return None
    spec = orjson.loads(raw)
    if not isinstance(spec, dict):
        raise ValueError(f"spec is a {type(spec).__name__}, not an object")
    return spec


def _branches(
    spec: dict[str, Any] | None, created: int, records: Mapping[str, str]
) -> tuple[Branch, ...]:
    """The branches of the spec, in its order, each with the state its field holds, if
    any; then the branches with records of their own (registered at run time, or any of
    a record of layout 4), by seq. A record of its own under a spec branch's name takes
    its place; a state record that names no branch of the spec is no branch."""
    out: list[Branch] = []
    placed: set[str] = set()
    for seq, item in enumerate((spec or {}).get("branches") or (), 1):
        op = _member(_OPS, Op, item["op"])
        key = f"{item['branch_id']}:{op}"
        placed.add(key)
        raw = records.get(key)
        if raw is not None and '"branch_id"' in raw:
            out.append(branch_from_json(raw))
            continue
        state = orjson.loads(raw) if raw is not None else _NO_STATE
        out.append(record_of(Branch, {
            "branch_id": item["branch_id"],
            "op": op,
            "url": item.get("url", ""),
            "status": _member(_BRANCH_STATUSES, BranchStatus,
                              state.get("status") or item.get("status", "prepared")),
            "data": item.get("data", ""),
            "seq": seq,
            "create_time": created,
            "update_time": _int(state.get("update_time")) or created,
            "finish_time": _int(state.get("finish_time")),
            "wire_op": "",
            "in_spec": True,
        }))
    own = [branch_from_json(raw) for key, raw in records.items()
           if key not in placed and '"branch_id"' in raw]
    if own:
        out += sorted(own, key=_seq)
    return tuple(out)


_NO_STATE: dict[str, Any] = {}


def _trans_from_hash(
    fields: Mapping[str, str], branch_fields: Mapping[str, str], with_branches: bool
) -> Trans:
    get = fields.get
    spec = _spec_of(fields)
    if spec is not None:
        # A field written after the create wins over the spec's value: a submit's
        # fingerprint after a prepare, a retry's next_cron_interval.
        static: Mapping[str, Any] = {**spec, **fields}
        steps = spec.get("steps") or ()
        payloads = spec.get("payloads") or ()
        options = _options_of(spec.get("options"))
        ext = spec.get("ext") or {}
    else:  # layout 4: a field per value, JSON ones as text
        static = fields
        steps = _loads(get("steps"), list)
        payloads = _loads(get("payloads"), list)
        options = options_from_json(get("options", ""))
        ext = _loads(get("ext"), dict)
    created = _int(get("create_time"))
    status = status_of(fields["status"])
    return record_of(Trans, {
        "gid": fields["gid"],
        "trans_type": static.get("trans_type", ""),
        "status": status,
        "steps": tuple(steps),
        "payloads": tuple(payloads),
        "branches": _branches(spec, created, branch_fields) if with_branches else (),
        "custom_data": static.get("custom_data", ""),
        "query_prepared": static.get("query_prepared", ""),
        "protocol": static.get("protocol", "http"),
        "rollback_reason": get("rollback_reason", ""),
        "result": get("result", ""),
        "options": options,
        "ext_headers": _str_map(ext.get("headers") if isinstance(ext, dict) else None),
        "create_time": created,
        # A create leaves update_time out: it is create_time until a write sets it.
        "update_time": _int(get("update_time")) or created,
        "finish_time": _int(get("finish_time")),
        "rollback_time": _int(get("rollback_time")),
        "next_cron_interval": _int(static.get("next_cron_interval")),
        # The finishing write leaves the last schedule in place; a finished one has none.
        "next_cron_time": 0 if status in FINISHED else _int(get("next_cron_time")),
        "retry_count": _int(get("retry_count")),
        "owner": get("owner", ""),
        "fingerprint": static.get("fingerprint", ""),
    })


def _options_of(data: Any) -> Options:
    """Options from the spec's object. The usual few ({}, wait_result alone) are made
    once and shared, as `options_from_json` shares them by their text."""
    if not data or not isinstance(data, dict):
        return _NO_OPTIONS
    if "branch_headers" in data:  # a dict: the items cannot be a key
        return _options_from_dict(data)
    try:
        return _shared(tuple(data.items()), _options_from_dict, data)
    except TypeError:  # another value that cannot be a key (a hand-edited record)
        return _options_from_dict(data)


_NO_OPTIONS = Options()
