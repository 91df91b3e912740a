"""The README's claims about keys, unknown gids and the examples' extras, checked.

A README that disagrees with the code costs a new user their first hour, so what it
shows is read from the README itself and compared with what the code does.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from coordinator.keys import KeySpace
from coordinator.settings import Settings
from tests.support import ROOT, Api
from tests.test_examples import EXAMPLES, example_env

README = (ROOT / "README.md").read_text()
# Which driver modules each extra brings (pyproject's optional dependencies).
EXTRA_MODULES = {"postgres": ("asyncpg",), "mysql": ("aiomysql",)}


def test_key_layout_example_names_the_real_partition() -> None:
    settings = Settings()
    keys = KeySpace(settings.redis.key_prefix, settings.redis.partitions)
    partition = keys.partition("order-1001")
    shown = set(re.findall(r"\{p(\d+)\}:order-1001", README))
    assert shown == {str(partition)}, f"order-1001 is in partition {partition}"
    assert f"lands in partition {partition} of {settings.redis.partitions}" in README
    assert f"'{keys.due(partition)}'" in README
    assert keys.for_gid("order-1001").trans in README


async def test_unknown_gid_answers_as_the_readme_says(api: Api) -> None:
    assert "`query` of an unknown gid answers `200\n{\"transaction\": null" in README
    status, body = await api.get("query", gid="no-such-gid-anywhere")
    assert (status, body) == (200, {"transaction": None, "branches": []})
    for op in ("abort", "forceStop", "resetNextCronTime"):
        status, body = await api.post(op, {"gid": "no-such-gid-anywhere"})
        assert status == 404, (op, body)


def example_rows() -> dict[str, set[str]]:
    """`python -m examples.NAME` → the extras the README's table names for it."""
    rows = {}
    for name, extras in re.findall(
        r"^\| `python -m examples\.(\w+)` \| ([^|]*) \|", README, flags=re.MULTILINE
    ):
        rows[name] = set(re.findall(r"`(\w+)`", extras))
    return rows


def test_examples_table_names_the_extras_each_example_needs() -> None:
    rows = example_rows()
    assert set(rows) == set(EXAMPLES)
    for name, services in EXAMPLES.items():
        # The extras column names pip extras; etcd is a server, named in the text.
        assert rows[name] == set(services) & set(EXTRA_MODULES), name


@pytest.mark.parametrize(
    ("example", "extra"),
    [(name, extra) for name, extras in sorted(example_rows().items()) for extra in sorted(extras)],
)
async def test_example_without_its_driver_exits_2_with_the_install_hint(
    example: str, extra: str, redis_url: str
) -> None:
    """Run the example the README's way, with the extra's driver made unimportable."""
    hide = "".join(f"sys.modules[{m!r}] = None; " for m in EXTRA_MODULES[extra])
    code = (f"import runpy, sys; {hide}"
            f"runpy.run_module('examples.{example}', run_name='__main__', alter_sys=True)")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, env=example_env(redis_url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2, (out.decode(), text)
    assert "Traceback" not in text
    assert f"pip install -e '.[{extra}]'" in text, text
