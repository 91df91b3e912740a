"""The typed requests the service layer takes and the typed answers it gives.

Each front end (HTTP routes, JSON-RPC, gRPC) parses its own wire format into these and
renders the answers itself, so the service layer never sees a body or a protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.model import Branch, Trans


@dataclass(frozen=True)
class TransRequest:
    """prepare, submit and prepareWorkflow: the transaction plus the client's extras."""

    trans: Trans
    req_extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GidRequest:
    """abort, forceStop and resetNextCronTime: a gid and the options abort reads."""

    gid: str
    rollback_reason: str = ""
    wait_result: bool = False


@dataclass(frozen=True)
class RegisterRequest:
    """registerBranch. `fields` holds every string the client sent (tcc: confirm and
    cancel, xa: url, workflow: op and status); `data` is the branch's body."""

    gid: str
    branch_id: str
    trans_type: str
    fields: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)


@dataclass(frozen=True)
class WorkflowState:
    """prepareWorkflow's answer: the stored transaction and the progress recorded so far."""

    trans: Trans
    progresses: tuple[Branch, ...] = ()
