"""Files shipped beside the Python code: the Lua scripts (lua/) and SQL schemas (sql/).

A source checkout keeps them at the top level, as the design asks; the wheel carries
them inside the package as coordinator/lua and coordinator/sql.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def read_resource(folder: str, filename: str) -> str:
    """The text of <folder>/<filename>, from the checkout or from the installed package."""
    path = _SOURCE_ROOT / folder / filename
    if path.is_file():
        return path.read_text()
    return (importlib.resources.files("coordinator") / folder / filename).read_text()


def sql_statements(text: str) -> tuple[str, ...]:
    """The statements of a schema file: `--` comment lines dropped, split on `;`."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return tuple(s.strip() for s in body.split(";") if s.strip())
