"""Finds the Lua scripts shipped with the package and registers them with redis-py.

A line ``--!include <file>.lua`` is replaced by that file's text, so that scripts can
share a function (the transaction-creating code of create.lua is also used by the
flash sale's buy script) while each still runs as one atomic EVALSHA.
"""

from __future__ import annotations

from coordinator.resources import read_resource

_INCLUDE = "--!include "


def _read(filename: str) -> str:
    return read_resource("lua", filename)


def script_text(name: str) -> str:
    """The text of lua/<name>.lua with its includes expanded (one level deep)."""
    lines = []
    for line in _read(f"{name}.lua").splitlines(keepends=True):
        if line.startswith(_INCLUDE):
            lines.append(_read(line[len(_INCLUDE):].strip()))
        else:
            lines.append(line)
    return "".join(lines)


SCRIPT_NAMES = (
    "create", "transition", "claim", "load", "sweep", "register", "reset_due", "topic",
    "due",
)
