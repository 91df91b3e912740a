"""/api/metrics against a live coordinator: dtm's names and labels, our own gauges and
counters, the token, one total over `--workers 2`, and metrics turned off."""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from coordinator.keys import KeySpace
from coordinator.machines.saga import branches_for
from coordinator.model import Status, Trans
from coordinator.settings import RedisSettings
from coordinator.store.redis_store import RedisStore
from tests.support import (
    ERROR,
    FAIL,
    OK,
    Api,
    CoordinatorProcess,
    Participant,
    saga_body,
    submit_all,
    wait_for,
)

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(session: aiohttp.ClientSession, base: str, **headers: str) -> Samples:
    async with session.get(f"{base}/api/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in
                                                              labels.items()))


def empty_saga(gid: str) -> dict[str, Any]:
    return {"gid": gid, "trans_type": "saga", "wait_result": True,
            "steps": [{"action": "", "compensate": ""}, {"action": "", "compensate": ""}],
            "payloads": ["{}", "{}"]}


async def test_dtm_metric_names_and_ours(
    redis_url: str, prefix: str, participant: Participant, session: aiohttp.ClientSession
) -> None:
    coord = await CoordinatorProcess(redis_url, prefix,
                                     COORDINATOR_SERVER_METRICS_REFRESH="0.2").start()
    try:
        api = Api(session, coord.api)
        for i in range(3):
            assert (await api.post("submit", empty_saga(f"{prefix}-ok-{i}")))[0] == 200
        participant.plan("a1", FAIL)
        status, _ = await api.post("submit", saga_body(f"{prefix}-no", participant, 2,
                                                       wait_result=True))
        assert status == 409
        # One error, then success: a retry and both outcomes in the latency histogram.
        participant.plan_for(f"{prefix}-retry", "a1", ERROR, OK)
        await api.post("submit", saga_body(f"{prefix}-retry", participant, 1,
                                           retry_interval=1))
        await api.wait_status(f"{prefix}-retry", "succeed")
        await api.get("query", gid="nope")  # a 200 for a gid that is not there
        await api.post("forceStop", {"gid": "nope"})  # 4xx: fail

        m = await scrape(session, coord.base)
        assert total(m, "dtm_server_info") == 1
        assert total(m, "dtm_transaction_process_total", model="saga", status="ok") == 4
        assert total(m, "dtm_transaction_process_total", model="saga", status="fail") == 1
        assert total(m, "dtm_transaction_handled_duration_count", model="saga") == 5
        assert total(m, "dtm_server_process_total", type="http", api="submit",
                     status="ok") == 4
        assert total(m, "dtm_server_process_total", type="http", api="submit",
                     status="fail") == 1
        assert total(m, "dtm_server_process_total", api="forcestop", status="fail") == 1
        # wait_status polled `query` too
        assert total(m, "dtm_server_response_duration_count", type="http", api="query") >= 2
        # Empty-URL sagas: actions 01 and 02 ok three times; the refused one: 01 fail.
        assert total(m, "dtm_branch_process_total", model="saga", branchid="02",
                     branchtype="action", status="ok") == 3
        assert total(m, "dtm_branch_process_total", branchid="01", branchtype="action",
                     status="fail") == 2  # the refusal and the error
        assert total(m, "dtm_branch_process_total", branchtype="compensate",
                     status="ok") == 1
        assert total(m, "coordinator_retries_total", model="saga") == 1
        assert total(m, "coordinator_branch_call_duration_seconds_count", outcome="error") == 1
        assert total(m, "coordinator_branch_call_duration_seconds_count",
                     outcome="success") >= 2
        assert total(m, "coordinator_branch_call_duration_seconds_count",
                     outcome="failure") == 1
        for script in ("create", "transition", "claim", "load"):
            assert total(m, "coordinator_script_duration_seconds_count", script=script) > 0
        labels = {lab["partition"] for lab, _ in m["coordinator_due_backlog"]}
        assert labels == {str(p) for p in range(RedisSettings().partitions)}
        # Every label set stays bounded: no gid anywhere.
        for series in m.values():
            for lab, _ in series:
                assert not any(prefix in v for v in lab.values()), lab
    finally:
        await coord.aclose()


async def test_backlog_waiters_inflight_and_takeover(
    redis_url: str, prefix: str, participant: Participant, session: aiohttp.ClientSession
) -> None:
    # One transaction at a time: while a slow one runs, new ones pile up as due backlog.
    coord = await CoordinatorProcess(
        redis_url, prefix, COORDINATOR_SERVER_METRICS_REFRESH="0.2",
        COORDINATOR_ENGINE_CONCURRENCY="1",
    ).start()
    store = RedisStore.from_url(redis_url, KeySpace(prefix, RedisSettings().partitions))
    try:
        # A transaction left by a crashed worker: its lease (1 ms) ran out at once.
        steps = ({"action": "", "compensate": ""},)
        orphan = Trans(f"{prefix}-orphan", "saga", Status.SUBMITTED, steps=steps,
                       payloads=("",), branches=branches_for(steps))
        await store.create(orphan, due_in_ms=0, owner="crashed:1", lease_ms=1)
        api = Api(session, coord.api)
        await api.wait_status(orphan.gid, "succeed")
        m = await scrape(session, coord.base)
        assert total(m, "coordinator_lease_takeovers_total") == 1

        participant.delay_for(f"{prefix}-slow", "/a1", 2.5)
        waiting = asyncio.ensure_future(api.post(
            "submit", saga_body(f"{prefix}-slow", participant, 1, wait_result=True)))
        await wait_for(lambda: participant.calls_to("a1"), 5, 0.02, "the slow call")
        for i in range(2):
            assert (await api.post("submit", {**empty_saga(f"{prefix}-q{i}"),
                                              "wait_result": False}))[0] == 200

        async def piled_up() -> bool:
            m = await scrape(session, coord.base)
            return (total(m, "coordinator_wait_result_waiters") == 1
                    and total(m, "coordinator_inflight_transactions") == 1
                    and total(m, "coordinator_due_backlog") == 2
                    and total(m, "coordinator_unfinished_transactions", status="submitted") == 3
                    and max(v for _, v in m["coordinator_oldest_due_age_seconds"]) > 0)

        await wait_for(piled_up, 2, 0.05, "one waiter, one in flight, two due behind it")
        assert (await waiting)[0] == 200
        for i in range(2):
            await api.wait_status(f"{prefix}-q{i}", "succeed")

        async def drained() -> bool:
            m = await scrape(session, coord.base)
            return (total(m, "coordinator_due_backlog") == 0
                    and total(m, "coordinator_unfinished_transactions") == 0
                    and total(m, "coordinator_wait_result_waiters") == 0)

        await wait_for(drained, 3, 0.05, "the backlog to drain")
    finally:
        await store.close()
        await coord.aclose()


async def test_token_and_metrics_off(
    redis_url: str, prefix: str, session: aiohttp.ClientSession
) -> None:
    coord = await CoordinatorProcess(redis_url, prefix, COORDINATOR_SERVER_API_TOKEN="s3cret",
                                     COORDINATOR_SERVER_PROTECT_METRICS="true").start()
    try:
        async with session.get(f"{coord.base}/api/metrics") as r:
            assert r.status == 401
            assert "s3cret" not in await r.text()
        async with session.get(f"{coord.base}/api/metrics",
                               headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        m = await scrape(session, coord.base, Authorization="Bearer s3cret")
        assert total(m, "dtm_server_info") == 1
    finally:
        await coord.aclose()
    coord = await CoordinatorProcess(redis_url, prefix, COORDINATOR_SERVER_API_TOKEN="s3cret",
                                     COORDINATOR_SERVER_METRICS="false").start()
    try:
        async with session.get(f"{coord.base}/api/metrics") as r:
            assert r.status == 404
    finally:
        await coord.aclose()


async def test_workers_scrape_sums_every_process(
    redis_url: str, prefix: str, session: aiohttp.ClientSession
) -> None:
    before = set(Path(tempfile.gettempdir()).glob("coordinator-metrics-*"))
    coord = await CoordinatorProcess(redis_url, prefix, COORDINATOR_SERVER_WORKERS="2").start()
    try:
        made = set(Path(tempfile.gettempdir()).glob("coordinator-metrics-*")) - before
        assert len(made) == 1  # the parent's per-run directory for the children's values
        await asyncio.sleep(1.0)  # both children listening
        await submit_all(session, coord.api, [empty_saga(f"{prefix}-{i}") for i in range(30)])

        async def converged() -> bool:
            async with aiohttp.ClientSession() as fresh:
                m = await scrape(fresh, coord.base)
            return total(m, "dtm_transaction_process_total", status="ok") == 30

        # Each worker hands its counts over every half second.
        await wait_for(converged, 3, 0.1, "the totals of both workers")
        seen = set()
        for _ in range(8):
            # A new connection each time, so the kernel may pick either child.
            async with aiohttp.ClientSession() as fresh:
                m = await scrape(fresh, coord.base)
            assert total(m, "dtm_transaction_process_total", status="ok") == 30
            assert total(m, "dtm_server_process_total", api="submit") == 30
            assert total(m, "dtm_server_info") == 1
            seen.add(total(m, "dtm_server_process_total", api="metrics"))
        assert len(seen) > 1  # the scrapes themselves are counted, across processes
    finally:
        await coord.aclose()
    assert not any(d.exists() for d in made)  # removed at exit


async def test_loop_lag_gauge_shows_a_stall_of_the_event_loop() -> None:
    """coordinator_event_loop_lag_seconds: the longest stall of the last two flush
    windows (a second, as the refresher flushes every half second)."""
    import time

    from coordinator.ops.metrics import Metrics, probe_loop_lag

    metrics = Metrics()
    probe = asyncio.create_task(probe_loop_lag(metrics))
    try:
        await asyncio.sleep(0.05)
        metrics.flush()
        quiet = metrics.loop_lag._value.get()
        time.sleep(0.08)  # the loop is blocked: the probe's 10 ms timer fires late
        await asyncio.sleep(0.03)
        metrics.flush()
        stalled = metrics.loop_lag._value.get()
        await asyncio.sleep(0.03)
        metrics.flush()
        still = metrics.loop_lag._value.get()  # the gauge covers the last two windows
        await asyncio.sleep(0.03)
        metrics.flush()
        after = metrics.loop_lag._value.get()
    finally:
        probe.cancel()
    assert stalled >= 0.06
    assert still == stalled
    # Windows without the stall read less (not zero: the machine may be busy).
    assert quiet < stalled
    assert after < stalled
