"""The OpenAPI description, and a property-based fuzzer run against a live coordinator.

Schemathesis draws requests from coordinator/api/openapi.json, valid ones and invalid
ones, for every route. Each answer must be no 5xx and must match the description
(status code, content type, body schema); the server must still answer afterwards; and
a rejected request must leave nothing in Redis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import FlakyFailure, Unsatisfiable, UnsatisfiedAssumption
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.api.app import create_app
from coordinator.settings import Settings
from tests.support import CoordinatorProcess, running_coordinator

OPENAPI = Path(__file__).resolve().parents[1] / "coordinator" / "api" / "openapi.json"
# Examples per route and generation mode: 25 routes × 2 modes × 30 ≈ 1,500 requests.
EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
CREATING = ("/prepare", "/submit", "/prepareWorkflow", "/registerBranch",
            "/registerTccBranch", "/registerXaBranch", "/api/json-rpc")


def test_openapi_describes_every_route() -> None:
    doc = orjson.loads(OPENAPI.read_bytes())
    assert doc["openapi"].startswith("3.1")
    described = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    routes = {
        (r.method, r.resource.canonical)
        for r in create_app(Settings.load(env={})).router.routes()
        if r.method != "HEAD" and r.resource is not None  # HEAD comes with every GET
        # The admin pages are HTML forms for people (log-in cookie, CSRF token), not API:
        # README's "Admin page" describes them and a browser test drives them.
        and not r.resource.canonical.startswith("/admin")
    }
    assert routes - described == set(), "routes without a description"
    assert described - routes == set(), "described routes the server does not have"


@pytest.fixture(scope="module")
def target(redis_url: str) -> Iterator[CoordinatorProcess]:
    with running_coordinator(
        redis_url,
        # Generated URLs must never be called: the only allowed host has nothing on it.
        COORDINATOR_ENGINE_ALLOWED_BRANCH_HOSTS="127.0.0.1:1",
        COORDINATOR_SERVER_WAIT_RESULT_TIMEOUT="1",
    ) as proc:
        yield proc


def _gid_of(case: Any) -> str | None:
    body = case.body if isinstance(case.body, dict) else None
    if body is not None and isinstance(body.get("params"), dict):
        body = body["params"]  # JSON-RPC
    gid = body.get("gid") if body is not None else None
    return gid if isinstance(gid, str) else None


def test_fuzz_the_api(target: CoordinatorProcess, redis_url: str) -> None:
    schema = schemathesis.openapi.from_path(OPENAPI)
    counts: Counter[int] = Counter()
    accepted: set[str] = set()
    http = requests.Session()

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                response = case.call(base_url=target.base, session=http, timeout=15)
                counts[response.status_code] += 1
                gid = _gid_of(case)
                rpc_error = case.path == "/api/json-rpc" and '"error"' in response.text
                if response.status_code < 300 and gid and case.path.endswith(CREATING) \
                        and not rpc_error:
                    accepted.add(gid)
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # A route without parameters or body has no invalid form to draw.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except FlakyFailure as exc:
                # The generator rejecting, on a replay, a draw it had accepted before: the
                # strategy's doing, no request failed. Anything else is a real failure.
                if not all(isinstance(e, UnsatisfiedAssumption) for e in exc.exceptions):
                    raise

    total = sum(counts.values())
    print(f"\nfuzzed {total} requests; by status: "
          + ", ".join(f"{code}: {n}" for code, n in sorted(counts.items())))
    assert not [code for code in counts if code >= 500]
    assert requests.get(f"{target.base}/api/ping", timeout=5).json() == {"msg": "pong"}
    # Only accepted requests left a transaction behind.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        stored = {
            client.hget(key, "gid")
            for key in client.scan_iter(match=f"{target.prefix}:trans:*", count=1000)
        }
    finally:
        client.close()
    assert stored <= accepted, sorted(str(g) for g in stored - accepted)[:10]
