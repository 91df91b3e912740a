"""Branch outcomes that are not a success are logged once each, rate-limited per URL."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

import aiohttp
import pytest

from coordinator.engine.branch_log import REFILL_SECONDS, BranchLog
from coordinator.machines.base import SUCCESS, Outcome, OutcomeKind
from coordinator.model import Branch, Op, Status, Trans
from tests.support import (
    ERROR,
    FAIL,
    OK,
    Api,
    CoordinatorProcess,
    Participant,
    saga_body,
    wait_for,
)


async def test_branch_failures_are_logged_once_and_rate_limited(
    redis_url: str, prefix: str, participant: Participant, session: aiohttp.ClientSession
) -> None:
    proc = CoordinatorProcess(redis_url, prefix)
    proc.log_level = "INFO"
    await proc.start()
    try:
        api = Api(session, proc.api)
        tag = uuid.uuid4().hex[:6]
        gids = [f"log-{tag}-{i}" for i in range(8)]
        for gid in gids:
            participant.plan_for(gid, "a1", ERROR, OK)
            assert (await api.post("submit", saga_body(gid, participant, 1,
                                                       retry_interval=1)))[0] == 200
        refused = f"log-{tag}-refused"
        participant.plan_for(refused, "a2", FAIL)
        assert (await api.post("submit", saga_body(refused, participant, 2,
                                                   wait_result=True)))[0] == 409
        for gid in gids:
            await api.wait_status(gid, "succeed", timeout=10)

        def lines(pattern: str) -> list[str]:
            # Without the transaction context the text format appends ("[gid=… op=…]").
            return [re.sub(r" \[gid=[^]]*\]$", "", ln)
                    for ln in proc.log_tail(500).splitlines() if re.search(pattern, ln)]

        # 8 errors on one URL at once: the first 5 are logged, with what an operator needs.
        a1 = re.escape(participant.url("a1"))
        errors = lines(f"WARNING coordinator.branches: saga log-{tag}-.* {a1}")
        assert len(errors) == 5, errors
        for line in errors:
            assert re.search(rf"branch 01 action {a1}: error \(HTTP 500\) internal error "
                             r"after \d+ ms; next retry in 1 s$", line), line
        # Each failing call once: no line for the successful retries.
        assert len({re.search(r"log-\w+-\d+", ln).group() for ln in errors}) == 5  # type: ignore[union-attr]
        # A refusal is an INFO line, and the action is not called again.
        (refusal,) = lines(f"INFO coordinator.branches: saga {refused} branch 02 action")
        assert "failure (HTTP 409)" in refusal
        assert refusal.endswith("not retried")

        # The next error on that URL, once the bucket refilled, reports what was dropped.
        await asyncio.sleep(REFILL_SECONDS + 0.2)
        late = f"log-{tag}-late"
        participant.plan_for(late, "a1", ERROR, OK)
        assert (await api.post("submit", saga_body(late, participant, 1,
                                                   retry_interval=1)))[0] == 200
        await wait_for(lambda: lines(f"saga {late} branch 01"), 10, what="the late line")
        (summary,) = lines(f"saga {late} branch 01")
        assert summary.endswith("(3 similar suppressed)"), summary
    finally:
        await proc.aclose()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> tuple[logging.Logger, _Records]:
    logger = logging.getLogger(f"test.branches.{uuid.uuid4().hex}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = _Records()
    logger.addHandler(handler)
    return logger, handler


def test_records_carry_structured_extras_and_the_bucket_refills(
    captured: tuple[logging.Logger, _Records],
) -> None:
    logger, handler = captured
    now = [100.0]
    blog = BranchLog(logger, burst=2, refill_seconds=10, clock=lambda: now[0])
    trans = Trans("g1", "tcc", Status.SUBMITTED)
    branch = Branch("01", Op.CONFIRM, "http://svc/confirm")
    ongoing = Outcome(OutcomeKind.ONGOING, "not yet", 425)
    blog.report(trans, branch, SUCCESS, 0.01, None)  # successes are never logged
    for _ in range(4):
        blog.report(trans, branch, ongoing, 0.012, 2.0)
    other = Branch("02", Op.CONFIRM, "http://other/confirm")
    blog.report(trans, other, Outcome(OutcomeKind.ERROR, "TimeoutError: "), 3.0, 4.0)
    assert len(handler.records) == 3
    first = handler.records[0]
    assert (first.gid, first.trans_type, first.branch_id, first.op) == (  # type: ignore[attr-defined]
        "g1", "tcc", "01", "confirm")
    assert (first.url, first.outcome, first.http_status, first.duration_ms,  # type: ignore[attr-defined]
            first.next_retry_s) == ("http://svc/confirm", "ongoing", 425, 12, 2.0)
    assert first.levelno == logging.INFO
    assert handler.records[2].levelno == logging.WARNING
    assert "no answer" in handler.records[2].getMessage()
    now[0] += 10  # one token back
    blog.report(trans, branch, ongoing, 0.012, 2.0)
    assert handler.records[-1].getMessage().endswith("(2 similar suppressed)")
