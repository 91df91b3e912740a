"""`coordinator txn …` and `coordinator topics …` against a live coordinator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import aiohttp

from tests.support import (
    FAIL,
    OK,
    ONGOING,
    ROOT,
    Api,
    CoordinatorProcess,
    Participant,
    saga_body,
    wait_for,
)

TOKEN = "cli-token"


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the command without blocking the loop the participant answers in."""
    full = {**os.environ, "PYTHONPATH": str(ROOT)}
    full.pop("COORDINATOR_SERVER", None)
    full.pop("COORDINATOR_SERVER_API_TOKEN", None)
    full.update(env or {})

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=ROOT, env=full,
                              capture_output=True, text=True, timeout=60)

    done = await asyncio.to_thread(run)
    return done.returncode, done.stdout, done.stderr


async def test_txn_and_topics_commands(
    redis_url: str, prefix: str, participant: Participant, session: aiohttp.ClientSession
) -> None:
    coord = await CoordinatorProcess(redis_url, prefix, COORDINATOR_SERVER_API_TOKEN=TOKEN,
                                     COORDINATOR_SERVER_PROTECT_TRANSACTION_ROUTES="false"
                                     ).start()
    try:
        conn = ["--server", coord.base, "--token", TOKEN]
        api = Api(session, coord.api)
        ok, refused, stuck = f"{prefix}-ok", f"{prefix}-refused", f"{prefix}-stuck"
        assert (await api.post("submit", saga_body(ok, participant, 2, wait_result=True)))[0] \
            == 200
        participant.plan_for(refused, "a1", FAIL)
        assert (await api.post("submit", saga_body(refused, participant, 1,
                                                   wait_result=True)))[0] == 409
        participant.plan_for(stuck, "a1", ONGOING)
        await api.post("submit", saga_body(stuck, participant, 1, retry_interval=3600))
        await wait_for(lambda: participant.calls_to("a1", stuck), 5, 0.05, "the first call")

        # list: an aligned table; --status / --type / --limit; --json for scripts
        code, out, err = await cli("txn", "list", *conn)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["GID", "TYPE", "STATUS", "CREATED", "NEXT", "DUE", "REASON"]
        col = lines[0].index("STATUS")
        statuses = {ln.split()[0]: ln[col:].split()[0] for ln in lines[1:]}
        assert statuses == {ok: "succeed", refused: "failed", stuck: "submitted"}
        code, out, _ = await cli("txn", "list", "--status", "failed", "--json", *conn)
        assert [t["gid"] for t in json.loads(out)] == [refused]
        code, out, _ = await cli("txn", "list", "--type", "tcc", "--json", *conn)
        assert json.loads(out) == []
        code, out, _ = await cli("txn", "list", "--limit", "1", "--json", *conn)
        assert len(json.loads(out)) == 1

        # show: the branches as a table and the timeline; --json is the query answer
        code, out, _ = await cli("txn", "show", ok, *conn)
        assert code == 0
        assert "status:      succeed" in out
        branch_lines = [ln for ln in out.splitlines() if ln.startswith(("01 ", "02 "))]
        assert len(branch_lines) == 4
        assert participant.url("a2") in out
        assert "finished succeed" in out
        code, out, _ = await cli("txn", "show", ok, "--json", *conn)
        assert len(json.loads(out)["branches"]) == 4

        # retry: the waiting one runs now; watch follows it to the end (exit 0)
        participant.plan_for(stuck, "a1", OK)
        code, out, _ = await cli("txn", "retry", stuck, *conn)
        assert code == 0
        assert "due now" in out
        code, out, _ = await cli("txn", "watch", stuck, "--interval", "0.1", "--timeout", "10",
                                 *conn)
        assert code == 0
        assert out.strip().endswith("succeed")

        # force-stop a running one; watch on a failed one exits 1
        participant.plan_for(f"{prefix}-run", "a1", ONGOING)
        await api.post("submit", saga_body(f"{prefix}-run", participant, 1))
        code, out, _ = await cli("txn", "force-stop", f"{prefix}-run", "--json", *conn)
        assert code == 0
        assert json.loads(out)["result"] == "force stopped"
        code, out, _ = await cli("txn", "watch", f"{prefix}-run", "--json", *conn)
        assert code == 1
        assert json.loads(out.splitlines()[-1])["status"] == "failed"

        # errors: one line, non-zero
        code, out, err = await cli("txn", "force-stop", ok, *conn)
        assert code == 1
        assert len(err.strip().splitlines()) == 1
        assert "HTTP 409" in err
        code, _, err = await cli("txn", "show", f"{prefix}-none", *conn)
        assert code == 1
        assert "no transaction" in err
        code, _, err = await cli("txn", "list", "--server", "http://127.0.0.1:1")
        assert code == 2
        assert "cannot reach" in err
        assert len(err.strip().splitlines()) == 1

        # topics, with the server and token from the environment
        env = {"COORDINATOR_SERVER": coord.base, "COORDINATOR_SERVER_API_TOKEN": TOKEN}
        topic = f"{prefix}-t"
        code, out, err = await cli("topics", "subscribe", topic, participant.url("s1"),
                                   "--remark", "first", env=env)
        assert code == 0, err
        await cli("topics", "subscribe", topic, participant.url("s2"), env=env)
        code, out, _ = await cli("topics", "list", env=env)
        rows = [ln.split() for ln in out.splitlines()[1:] if ln.startswith(topic)]
        assert rows == [[topic, participant.url("s1"), "first"], [topic, participant.url("s2")]]
        code, _, err = await cli("topics", "subscribe", topic, participant.url("s1"), env=env)
        assert code == 1
        assert "already subscribed" in err
        code, _, _ = await cli("topics", "unsubscribe", topic, participant.url("s1"), env=env)
        assert code == 0
        code, out, _ = await cli("topics", "list", "--json", env=env)
        mine: list[dict[str, Any]] = [t for t in json.loads(out) if t["topic"] == topic]
        assert [s["url"] for s in mine[0]["subscribers"]] == [participant.url("s2")]
        code, _, _ = await cli("topics", "delete", topic, env=env)
        assert code == 0
        code, _, err = await cli("topics", "delete", topic, env=env)
        assert code == 1
        assert "404" in err
    finally:
        await coord.aclose()


async def test_token_is_sent_and_a_401_explained(participant: Participant) -> None:
    """Against a server that wants a Bearer token (as operator routes do once a token
    is set): the CLI sends --token, and without it says what is missing."""
    participant.plan("api/dtmsvr/all", lambda call: (
        (200, '{"transactions": [], "next_position": ""}')
        if call.headers.get("Authorization") == f"Bearer {TOKEN}"
        else (401, '{"message": "this route needs Authorization: Bearer"}')))
    server = participant.url("")
    code, out, err = await cli("txn", "list", "--server", server)
    assert code == 1
    assert "token" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = await cli("txn", "list", "--server", server, "--token", TOKEN)
    assert code == 0, err
    assert out.strip() == "no transactions"
    code, out, err = await cli("txn", "list", "--server", server,
                               env={"COORDINATOR_SERVER_API_TOKEN": TOKEN})
    assert code == 0, err
