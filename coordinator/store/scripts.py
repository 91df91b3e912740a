"""Finds the Lua scripts shipped with the package and registers them with redis-py."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# A source checkout keeps the scripts at the top level (lua/); the wheel carries them
# inside the package as coordinator/lua.
_SOURCE_DIR = Path(__file__).resolve().parents[2] / "lua"


def script_text(name: str) -> str:
    """The text of lua/<name>.lua."""
    if (_SOURCE_DIR / f"{name}.lua").is_file():
        return (_SOURCE_DIR / f"{name}.lua").read_text()
    return (importlib.resources.files("coordinator") / "lua" / f"{name}.lua").read_text()


SCRIPT_NAMES = (
    "create", "transition", "claim", "load", "sweep", "register", "reset_due", "topic",
)
