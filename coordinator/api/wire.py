"""Parsing and validating dtm's transaction JSON.

Clients send nulls for absent strings and obsolete fields; those are tolerated. Every
other problem is a `BadRequest` naming the field, raised before anything is stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from coordinator.errors import BadRequest
from coordinator.machines import msg, saga
from coordinator.model import TRANS_TYPES, Branch, Options, Status, Trans, evolve
from coordinator.requests import GidRequest, RegisterRequest, TransRequest

# fullmatch, not match: "$" also matches before a final newline, and a gid or branch id
# ending in one passed, then broke every gRPC metadata value and log line it went into.
GID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
MAX_STEPS = 1000
# Upper bound of the integer options (seconds, or a count for retry_limit): 100 years.
# Larger values overflowed the Lua scripts' integer formatting and made the stored times
# unrenderable, so `query` of such a transaction answered 500.
MAX_OPTION = 100 * 365 * 86_400


def load_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def check_gid(value: Any) -> str:
    if value is None or value == "":
        raise BadRequest("gid is required", "gid")
    if not isinstance(value, str):
        raise BadRequest("gid must be a string", "gid")
    if not GID_PATTERN.fullmatch(value):
        raise BadRequest("gid must be 1-128 printable ASCII characters without spaces", "gid")
    return value


def _string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string", name)
    return value


def _integer(data: Mapping[str, Any], name: str, minimum: int = 0) -> int:
    value = data.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be a whole number", name)
    if value != 0 and value < minimum:
        raise BadRequest(f"{name} must be 0 or at least {minimum}", name)
    if value < 0:
        raise BadRequest(f"{name} must not be negative", name)
    if value > MAX_OPTION:
        raise BadRequest(f"{name} must be at most {MAX_OPTION}", name)
    return value


def _boolean(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false", name)
    return value


def _string_map(data: Mapping[str, Any], name: str) -> dict[str, str]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name} must be an object of strings", name)
    return dict(value)


# RFC 7230 token characters: what a header name may consist of.
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}\Z")
# Framing and routing headers the branch caller writes itself; a second copy from a
# client would let it split or redirect the request (request smuggling).
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                              "upgrade", "te", "trailer", "keep-alive"})
MAX_HEADER_VALUE = 8192


def _headers(data: Mapping[str, Any], name: str) -> dict[str, str]:
    """branch_headers: token names, values without CR, LF, NUL or other controls."""
    headers = _string_map(data, name)
    for key, value in headers.items():
        if not HEADER_NAME.match(key):
            raise BadRequest(f"{name}: {key[:40]!r} is not a valid header name", name)
        if key.lower() in RESERVED_HEADERS:
            raise BadRequest(f"{name}: {key!r} is set by the coordinator itself", name)
        if len(value) > MAX_HEADER_VALUE or any(
            (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value
        ):
            raise BadRequest(
                f"{name}[{key!r}] holds control characters (CR, LF, NUL …) or is too long",
                name,
            )
    return headers


def _steps(data: Mapping[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    raw = data.get("steps")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise BadRequest("steps must be a list", "steps")
    if len(raw) > MAX_STEPS:
        raise BadRequest(f"steps has more than {MAX_STEPS} items", "steps")
    steps: list[dict[str, str]] = []
    old_payloads: list[str] = []
    for i, step in enumerate(raw):
        if not isinstance(step, dict):
            raise BadRequest(f"steps[{i}] must be an object", f"steps[{i}]")
        clean: dict[str, str] = {}
        for key, value in step.items():
            if value is None:
                continue
            if not isinstance(value, str):
                raise BadRequest(f"steps[{i}].{key} must be a string", f"steps[{i}].{key}")
            if key == "data":
                old_payloads.append(value)  # the old form carried the body in the step
            else:
                clean[key] = value
        steps.append(clean)
    payloads_raw = data.get("payloads")
    if payloads_raw is None:
        payloads_raw = []
    if not isinstance(payloads_raw, list) or not all(
        p is None or isinstance(p, str) for p in payloads_raw
    ):
        raise BadRequest("payloads must be a list of strings", "payloads")
    payloads = [p or "" for p in payloads_raw]
    if not payloads and old_payloads:
        if len(old_payloads) != len(steps):
            raise BadRequest("either every step or no step may carry data", "steps")
        payloads = old_payloads
    if payloads and len(payloads) != len(steps):
        raise BadRequest(
            f"payloads has {len(payloads)} items but steps has {len(steps)}", "payloads"
        )
    return steps, payloads


def parse_gid_only(body: bytes | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    data = load_object(body) if isinstance(body, bytes) else dict(body)
    return check_gid(data.get("gid")), data


def parse_gid_request(body: bytes | Mapping[str, Any]) -> GidRequest:
    """abort, forceStop, resetNextCronTime; abort also reads rollback_reason and
    wait_result (values of another type are ignored, as they always were)."""
    gid, data = parse_gid_only(body)
    reason = data.get("rollback_reason")
    return GidRequest(gid, reason if isinstance(reason, str) else "",
                      data.get("wait_result") is True)


def parse_trans(body: bytes | Mapping[str, Any], status: Status) -> TransRequest:
    """Validate a prepare/submit body and build the transaction it describes.

    Message branches depend on topic subscriptions, so the service adds them. Whether
    the URLs may be called is the service's check (`coordinator.urls`): it is a policy
    of the server, the same for every front end.
    """
    data = load_object(body) if isinstance(body, bytes) else body
    gid = check_gid(data.get("gid"))
    trans_type = data.get("trans_type")
    if trans_type is None or trans_type == "":
        raise BadRequest("trans_type is required", "trans_type")
    # The isinstance check first: an unhashable value (list, object) made the set
    # membership test raise TypeError, which reached the client as a 500.
    if not isinstance(trans_type, str) or trans_type not in TRANS_TYPES:
        allowed = ", ".join(sorted(TRANS_TYPES))
        raise BadRequest(f"trans_type {trans_type!r} is not one of {allowed}", "trans_type")
    steps, payloads = _steps(data)
    options = evolve(  # a copy of a blank, as for the Trans below
        _BLANK_OPTIONS,
        wait_result=_boolean(data, "wait_result"),
        timeout_to_fail=_integer(data, "timeout_to_fail"),
        request_timeout=_integer(data, "request_timeout"),
        retry_interval=_integer(data, "retry_interval", minimum=1),
        retry_limit=_integer(data, "retry_limit"),
        branch_headers=_headers(data, "branch_headers"),
        concurrent=_boolean(data, "concurrent"),
    )
    custom_data = _string(data, "custom_data")
    protocol = _string(data, "protocol") or "http"
    if protocol not in ("http", "grpc", "json-rpc"):
        raise BadRequest(f"protocol {protocol!r} is not supported", "protocol")
    if protocol == "grpc":
        _check_metadata(options.branch_headers)
    branches: tuple[Branch, ...] = ()
    if trans_type == "saga":
        for i, step in enumerate(steps):
            for key in step:
                if key not in ("action", "compensate"):
                    raise BadRequest(f"steps[{i}] has unknown key {key!r}", f"steps[{i}]")
        try:
            saga.parse_ordering(custom_data, options.concurrent, len(steps))
        except ValueError as exc:
            raise BadRequest(str(exc), "custom_data") from None
        branches = saga.branches_for(steps)
    elif trans_type == "msg":
        for i, step in enumerate(steps):
            if set(step) - {"action"}:
                raise BadRequest(f"steps[{i}] of a msg may only have an action", f"steps[{i}]")
        try:
            delay = msg.delay_of(custom_data)
        except ValueError as exc:
            raise BadRequest(str(exc), "custom_data") from None
        # Bounded like the other time options: a huge delay overflowed the scripts'
        # integer formatting and left a due time no reader could render.
        if delay > MAX_OPTION:
            raise BadRequest(f"custom_data.delay must be at most {MAX_OPTION}", "custom_data")
    req_extra = _string_map(data, "req_extra")
    query_prepared = _string(data, "query_prepared")
    # A copy of a blank record rather than Trans(...): the dataclass __init__ was a tenth
    # of the parse. ext_headers is the one field whose default is made per record.
    trans = evolve(
        _BLANK,
        ext_headers={},
        gid=gid,
        trans_type=trans_type,
        status=status,
        steps=tuple(steps),
        payloads=tuple(payloads),
        branches=branches,
        custom_data=custom_data,
        query_prepared=query_prepared,
        protocol=protocol,
        rollback_reason=_string(data, "rollback_reason"),
        options=options,
    )
    return TransRequest(trans, req_extra)


_BLANK = Trans(gid="", trans_type="", status=Status.PREPARED)
_BLANK_OPTIONS = Options()


GRPC_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*\Z")


def _check_metadata(headers: Mapping[str, str]) -> None:
    """gRPC sends only printable ASCII in metadata: anything else would fail every call."""
    for key, value in headers.items():
        if not GRPC_METADATA_VALUE.match(key) or not GRPC_METADATA_VALUE.match(value):
            raise BadRequest(f"branch_headers[{key!r}] must be printable ASCII for gRPC",
                             "branch_headers")


BRANCH_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def parse_register(body: bytes | Mapping[str, Any]) -> RegisterRequest:
    """registerBranch takes a flat object of strings (gid, branch_id, trans_type, ...)."""
    data = load_object(body) if isinstance(body, bytes) else dict(body)
    out: dict[str, str] = {}
    for key, value in data.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"{key} must be a string", key)
        out[key] = value
    check_gid(out.get("gid"))
    if not BRANCH_ID.fullmatch(out.get("branch_id", "")):
        raise BadRequest("branch_id must be 1-64 letters, digits, '-' or '_'", "branch_id")
    if out.get("trans_type") not in ("tcc", "xa", "workflow"):
        raise BadRequest("trans_type must be tcc, xa or workflow", "trans_type")
    return RegisterRequest(out["gid"], out["branch_id"], out["trans_type"], out)
