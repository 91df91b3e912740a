"""The transaction and branch records, as the engine and the state machines see them.

These are plain frozen values. The store builds them from Redis hashes and the state
machines read them; neither side reaches into the other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

_T = TypeVar("_T")


_new = object.__new__
_set = object.__setattr__


def evolve(obj: _T, **changes: Any) -> _T:
    """A copy of a frozen record with some fields changed.

    dataclasses.replace re-runs __init__ with every field; on the engine's hot path that
    was a tenth of the CPU per transaction. These records have no __post_init__ and no
    slots, so copying the instance dict is equivalent and several times cheaper (a dict
    copy, not an update into a new object's empty dict: that re-inserted every field).
    """
    fields = obj.__dict__.copy()
    fields.update(changes)
    if "branch_id" in changes or "op" in changes:
        fields.pop("key", None)  # derived from them (Branch.key)
    return record_of(type(obj), fields)


def record_of(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of a frozen record made of its instance dict (the values of ALL its
    fields), without __init__, which sets each field through object.__setattr__ and
    costs more than the rest of decoding or copying a record. The records have no
    __post_init__ and no slots; the dict becomes the instance's own."""
    new = _new(cls)
    _set(new, "__dict__", fields)  # frozen dataclasses refuse a plain assignment
    return new


class Status(enum.StrEnum):
    """Global transaction statuses, spelled as dtm spells them on the wire."""

    PREPARED = "prepared"
    SUBMITTED = "submitted"
    ABORTING = "aborting"
    SUCCEED = "succeed"
    FAILED = "failed"


FINISHED: frozenset[Status] = frozenset({Status.SUCCEED, Status.FAILED})
UNFINISHED: frozenset[Status] = frozenset(set(Status) - FINISHED)


class BranchStatus(enum.StrEnum):
    PREPARED = "prepared"
    SUCCEED = "succeed"
    FAILED = "failed"


class Op(enum.StrEnum):
    ACTION = "action"
    COMPENSATE = "compensate"
    TRY = "try"
    CONFIRM = "confirm"
    CANCEL = "cancel"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    MSG = "msg"


TRANS_TYPES: frozenset[str] = frozenset({"saga", "msg", "tcc", "xa", "workflow"})


@dataclass(frozen=True)
class Options:
    """Per-transaction options (dtm's TransOptions). Zero means "use the server default"."""

    wait_result: bool = False
    timeout_to_fail: int = 0
    request_timeout: int = 0
    retry_interval: int = 0
    retry_limit: int = 0
    branch_headers: dict[str, str] = field(default_factory=dict)
    concurrent: bool = False


class _BranchKey:
    """Branch.key: like functools.cached_property, without the lock it takes on every
    first read (Python 3.11); each new branch copy reads its key at least once."""

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _BranchKey: ...
    @overload
    def __get__(self, obj: Branch, owner: type | None = None) -> str: ...
    def __get__(self, obj: Branch | None, owner: type | None = None) -> str | _BranchKey:
        if obj is None:
            return self
        # A StrEnum formats as its value, without the Enum.value property.
        key = obj.__dict__["key"] = f"{obj.branch_id}:{obj.op}"
        return key


@dataclass(frozen=True)
class Branch:
    """One branch operation: a (branch_id, op) pair with the URL to call."""

    branch_id: str
    op: Op
    url: str
    status: BranchStatus = BranchStatus.PREPARED
    # Only branches registered at run time (tcc, xa, workflow) carry their own body;
    # saga and msg branches read theirs from the transaction's payloads.
    data: str = ""
    seq: int = 0
    create_time: int = 0
    update_time: int = 0
    finish_time: int = 0
    # The op sent on the wire when it is not one of the fixed ops: a workflow's recovery
    # call names the workflow.
    wire_op: str = ""
    # Whether the branch's fixed part (id, op, url, data) is in the transaction's spec,
    # as for the branches its create stored, so that a change stores only its state;
    # False for a branch registered at run time or read from an older layout, whose
    # record of its own is rewritten whole (see lua/transition.lua). A hint of where
    # the branch is kept, not part of what it is: equality ignores it.
    in_spec: bool = field(default=False, compare=False, repr=False)

    # "<branch_id>:<op>", computed once and kept in the instance dict: the engine asks
    # for it many times per round. evolve() copies it (and drops it when the id changes).
    key = _BranchKey()

    @property
    def op_name(self) -> str:
        return self.wire_op or self.op.value


def new_branch(branch_id: str, op: Op, url: str) -> Branch:
    """Branch(branch_id, op, url), copied from a blank one: the API makes one per step
    and op, and a frozen dataclass's __init__ (one object.__setattr__ per field) cost
    nearly twice as much, evolve's keyword dict and key check a third more."""
    fields = _BLANK_BRANCH_FIELDS.copy()
    fields["branch_id"] = branch_id
    fields["op"] = op
    fields["url"] = url
    return record_of(Branch, fields)


# Taken before anything could ask the blank for its key (which it would then keep).
_BLANK_BRANCH_FIELDS = Branch("", Op.ACTION, "").__dict__.copy()


def stamped(branches: tuple[Branch, ...], now: int) -> tuple[Branch, ...]:
    """The branches as create stores them: in its spec, seq by position, created and
    updated at `now`.

    evolve per branch (a keyword dict and a key check each) was most of what the engine
    spent rebuilding a new transaction's branches after its create.
    """
    out = []
    for seq, branch in enumerate(branches, 1):
        fields = branch.__dict__.copy()
        fields["seq"] = seq
        fields["create_time"] = fields["update_time"] = now
        fields["in_spec"] = True
        out.append(record_of(Branch, fields))
    return tuple(out)


@dataclass(frozen=True)
class Trans:
    """A global transaction with its branches, as read from the store."""

    gid: str
    trans_type: str
    status: Status
    steps: tuple[dict[str, str], ...] = ()
    payloads: tuple[str, ...] = ()
    branches: tuple[Branch, ...] = ()
    custom_data: str = ""
    query_prepared: str = ""
    protocol: str = "http"
    rollback_reason: str = ""
    result: str = ""
    options: Options = Options()
    ext_headers: dict[str, str] = field(default_factory=dict)
    create_time: int = 0  # all times are milliseconds since the epoch (Redis clock)
    update_time: int = 0
    finish_time: int = 0
    rollback_time: int = 0
    next_cron_interval: int = 0  # seconds
    next_cron_time: int = 0
    retry_count: int = 0
    owner: str = ""
    # Digest of what the client sent (see coordinator/fingerprint.py), kept so that a
    # repeated submit can be told from a gid reused for other content.
    fingerprint: str = ""

    def with_branches(self, updates: Mapping[str, BranchStatus]) -> Trans:
        """A copy with some branch statuses changed (keys are `Branch.key`)."""
        if not updates:
            return self
        branches = []
        for b in self.branches:
            status = updates.get(b.key)
            branches.append(b if status is None else evolve(b, status=status))
        return evolve(self, branches=tuple(branches))

    def payload_bytes(self, branch: Branch) -> bytes:
        """The exact bytes to send with a branch call.

        A transaction that came in over gRPC carries raw bytes (BinPayloads, a TCC
        branch's BusiPayload); they are kept as text decoded as latin-1, one character
        per byte, so the same bytes go out again whatever they hold.
        """
        body = self.payload_of(branch)
        return body.encode("latin-1" if self.protocol == "grpc" else "utf-8")

    def payload_of(self, branch: Branch) -> str:
        """The body sent with a branch call."""
        if branch.data:
            return branch.data
        index = int(branch.branch_id[:2]) - 1 if branch.branch_id[:2].isdigit() else -1
        if 0 <= index < len(self.payloads):
            return self.payloads[index]
        return ""
