"""Log set-up: `--log-format json|text`, a level per module, transaction context.

Every line logged while a transaction is being driven carries its gid and trans_type,
and inside a branch call its branch id and op: the engine's task and each branch
call set `log_context` (a ContextVar, so concurrent transactions never mix), and a
filter copies it onto each record. Code can also pass the same keys with `extra=`.
Payloads are never logged at INFO or above.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

CONTEXT_KEYS = ("gid", "trans_type", "branch_id", "op")
log_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "coordinator_log_context", default=None
)


def bind(**values: str) -> contextvars.Token[dict[str, str] | None]:
    """Add keys to the context of this task (and tasks it starts)."""
    current = log_context.get() or {}
    return log_context.set({**current, **values})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = log_context.get()
        if ctx:
            for key, value in ctx.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with `key=value` context appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS if getattr(record, k, None)
        )
        if not extra:
            return line
        first, sep, rest = line.partition("\n")
        return f"{first} [{extra}]{sep}{rest}"


def parse_levels(spec: str) -> tuple[int, dict[str, int]]:
    """`coordinator.engine=DEBUG,INFO` → (INFO, {"coordinator.engine": DEBUG}).

    A bare level is the root level; `module=LEVEL` pairs set one logger each.
    """
    root = logging.INFO
    modules: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, level = part.rpartition("=")
        value = logging.getLevelName(level.strip().upper())
        if not isinstance(value, int):
            raise ValueError(f"unknown log level {level!r} in --log-level {spec!r}")
        if eq:
            modules[name.strip()] = value
        else:
            root = value
    return root, modules


def setup(level_spec: str = "INFO", fmt: str = "text") -> None:
    if fmt not in ("json", "text"):
        raise ValueError(f"--log-format must be json or text, not {fmt!r}")
    root_level, modules = parse_levels(level_spec)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    for name, level in modules.items():
        logging.getLogger(name).setLevel(level)
