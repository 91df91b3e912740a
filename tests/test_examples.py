"""Every example under examples/ runs as its one command and verifies its own outcome.

Each is started the way the README says, ``python -m examples.<name>``, and must exit 0,
which it does only if every check it printed held. The services an example needs are
probed first, so a missing one is reported by name (a skip, or under CI=true a failure)
instead of as a broken example.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from urllib.parse import quote

import pytest

from tests.conftest import (
    MYSQL_DB,
    MYSQL_HOST,
    MYSQL_PASSWORD,
    MYSQL_PORT,
    MYSQL_USER,
    POSTGRES_DSN,
    open_mysql_pool,
    open_pg_pool,
)
from tests.etcd_support import require_etcd
from tests.support import ROOT

# Every example also needs Redis (the coordinator's store), probed by `redis_url`.
EXAMPLES = {
    "bank_transfer": ("postgres", "mysql"),
    "order_stock": ("postgres", "mysql"),
    "travel_booking": ("postgres",),
    "cache_consistency": ("postgres",),
    "mixed_branches": ("postgres", "mysql"),
    # Starts its own etcd from the binary on PATH (EXAMPLES_ETCD would name another).
    "gozero_transfer": ("postgres", "mysql", "etcd"),
}
TIMEOUT = 60.0  # each example takes a few seconds; this only catches a hang


async def require(services: tuple[str, ...]) -> None:
    """Skip, or fail under CI=true, if a service the example needs is not there."""
    if "etcd" in services:
        require_etcd()
    if "postgres" in services:
        pg = await open_pg_pool(max_size=1)
        await pg.close()
    if "mysql" in services:
        mysql = await open_mysql_pool(max_size=1)
        mysql.close()
        await mysql.wait_closed()


def example_env(redis_url: str) -> dict[str, str]:
    """The tests' service addresses, in the variables the examples read."""
    mysql = (f"mysql://{quote(MYSQL_USER, safe='')}:{quote(MYSQL_PASSWORD, safe='')}"
             f"@{MYSQL_HOST}:{MYSQL_PORT}/{MYSQL_DB}")
    return {**os.environ, "COORDINATOR_REDIS_URL": redis_url,
            "EXAMPLES_POSTGRES_DSN": POSTGRES_DSN, "EXAMPLES_MYSQL_URL": mysql}


@pytest.mark.parametrize("name", list(EXAMPLES))
async def test_example_runs_and_every_check_holds(name: str, redis_url: str) -> None:
    await require(EXAMPLES[name])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"examples.{name}", cwd=ROOT, env=example_env(redis_url),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail(f"examples.{name} did not finish within {TIMEOUT}s:\n{out.decode()}")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"examples.{name} exited {proc.returncode}:\n{text}"
    assert re.search(rf"^{name}: all \d+ checks held", text, re.MULTILINE), text
