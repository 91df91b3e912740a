"""Per-transaction options, as dtm's clients send them with prepare/submit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class TransOptions:
    """dtm's TransOptions. Zero means "the coordinator's default".

    wait_result: submit answers only once the transaction finished (TransactionFailed
      with the rollback reason if it failed).
    timeout_to_fail: seconds until a prepared msg is back-checked, a prepared tcc/xa is
      rolled back, or (if set) a saga gives up and compensates.
    request_timeout: seconds the coordinator waits for each branch call.
    retry_interval: seconds between retries of a branch that answered an error (doubled
      on each further error).
    retry_limit: a saga gives up and compensates after this many retries.
    branch_headers: extra HTTP headers on every branch call.
    concurrent: msg actions are called in parallel.
    """

    wait_result: bool = False
    timeout_to_fail: int = 0
    request_timeout: int = 0
    retry_interval: int = 0
    retry_limit: int = 0
    branch_headers: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    concurrent: bool = False

    def __post_init__(self) -> None:
        for name in ("timeout_to_fail", "request_timeout", "retry_interval", "retry_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        # A frozen options object must not change through a dict the caller still holds.
        object.__setattr__(self, "branch_headers", MappingProxyType(dict(self.branch_headers)))

    def to_wire(self) -> dict[str, Any]:
        return {
            "wait_result": self.wait_result,
            "timeout_to_fail": self.timeout_to_fail,
            "request_timeout": self.request_timeout,
            "retry_interval": self.retry_interval,
            "retry_limit": self.retry_limit,
            "branch_headers": dict(self.branch_headers),
            "concurrent": self.concurrent,
        }
