"""Msg.do_and_submit when the process dies at the worst moments.

A real coordinator, a participant app built with the SDK (the msg action and the
``queryPrepared`` back-check endpoint, answered by the barrier), and a real local
database (PostgreSQL and MariaDB). The "crash" is emulated in the business callback:
either the coordinator becomes unreachable right after the local commit (the submit
never arrives), or the business raises halfway through its local transaction.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from coordinator.client import (
    BranchInfo,
    CoordinatorUnavailable,
    DtmClient,
    DuplicatedRequest,
    Msg,
    TransactionFailed,
    TransOptions,
    branch_handler,
    query_prepared_handler,
)
from coordinator.client.barrier import BranchBarrier, SqlBarrier
from coordinator.client.barrier_mysql import MysqlBarrier, quiet_cursor
from coordinator.client.barrier_postgres import PostgresBarrier
from tests.conftest import open_mysql_pool, open_pg_pool
from tests.support import AppServer, CoordinatorProcess, free_port, wait_for


class Shop:
    """The local database of the service sending the message: one orders table."""

    backend: SqlBarrier

    async def insert(self, conn: Any, order: str, amount: int) -> None:
        raise NotImplementedError

    async def orders(self, tag: str) -> list[str]:
        raise NotImplementedError

    async def barrier_reason(self, gid: str) -> str | None:
        raise NotImplementedError

    async def close(self, tag: str) -> None:
        raise NotImplementedError


class PostgresShop(Shop):
    async def open(self) -> PostgresShop:
        self.pool = await open_pg_pool()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7202)")
            await conn.execute("CREATE TABLE IF NOT EXISTS sdk_msg_order "
                               "(id text PRIMARY KEY, amount bigint NOT NULL)")
        self.backend = PostgresBarrier(self.pool)
        return self

    async def insert(self, conn: Any, order: str, amount: int) -> None:
        await conn.execute("INSERT INTO sdk_msg_order (id, amount) VALUES ($1, $2)",
                           order, amount)

    async def orders(self, tag: str) -> list[str]:
        rows = await self.pool.fetch("SELECT id FROM sdk_msg_order WHERE id LIKE $1",
                                     f"{tag}%")
        return [r["id"] for r in rows]

    async def barrier_reason(self, gid: str) -> str | None:
        value = await self.pool.fetchval(
            "SELECT reason FROM dtm_barrier.barrier WHERE gid = $1 AND branch_id = '00' "
            "AND op = 'msg' AND barrier_id = '01'", gid)
        return None if value is None else str(value)

    async def close(self, tag: str) -> None:
        await self.pool.execute("DELETE FROM sdk_msg_order WHERE id LIKE $1", f"{tag}%")
        await self.pool.close()


class MysqlShop(Shop):
    async def open(self) -> MysqlShop:
        self.pool = await open_mysql_pool()
        await self._query("CREATE TABLE IF NOT EXISTS sdk_msg_order (id varchar(100) "
                          "PRIMARY KEY, amount bigint NOT NULL) ENGINE = InnoDB")
        self.backend = MysqlBarrier(self.pool)
        return self

    async def _query(self, sql: str, *args: Any) -> list[Any]:
        async with self.pool.acquire() as conn:
            async with conn.cursor(quiet_cursor()) as cur:
                await cur.execute(sql, args)
                rows = list(await cur.fetchall())
            await conn.commit()
        return rows

    async def insert(self, conn: Any, order: str, amount: int) -> None:
        async with conn.cursor() as cur:
            await cur.execute("INSERT INTO sdk_msg_order (id, amount) VALUES (%s, %s)",
                              (order, amount))

    async def orders(self, tag: str) -> list[str]:
        return [r[0] for r in await self._query(
            "SELECT id FROM sdk_msg_order WHERE id LIKE %s", f"{tag}%")]

    async def barrier_reason(self, gid: str) -> str | None:
        rows = await self._query(
            "SELECT reason FROM dtm_barrier.barrier WHERE gid = %s AND branch_id = '00' "
            "AND op = 'msg' AND barrier_id = '01'", gid)
        return str(rows[0][0]) if rows else None

    async def close(self, tag: str) -> None:
        await self._query("DELETE FROM sdk_msg_order WHERE id LIKE %s", f"{tag}%")
        self.pool.close()
        await self.pool.wait_closed()


class Service:
    """The participant: the msg action (credit) and the back-check endpoint."""

    def __init__(self, backend: SqlBarrier) -> None:
        self.credits: list[dict[str, Any]] = []
        self.checks: list[tuple[str, int]] = []  # (gid, status answered)
        check = query_prepared_handler(backend)

        async def query_prepared(request: web.Request) -> web.Response:
            response = await check(request)
            self.checks.append((request.query.get("gid", ""), response.status))
            return response

        @branch_handler
        async def credit(request: web.Request, branch: BranchInfo) -> None:
            self.credits.append(await request.json())

        app = web.Application()
        app.router.add_get("/queryPrepared", query_prepared)
        app.router.add_post("/credit", credit)
        self.server = AppServer(app)


@pytest.fixture(params=["postgres", "mysql"])
async def shop(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Shop]:
    s: Shop = await (PostgresShop() if request.param == "postgres" else MysqlShop()).open()
    yield s
    await s.close(prefix)


@pytest.fixture
async def service(shop: Shop) -> AsyncIterator[Service]:
    svc = Service(shop.backend)
    await svc.server.start()
    yield svc
    await svc.server.stop()


@pytest.fixture
async def dtm(shared_coordinator: CoordinatorProcess) -> AsyncIterator[DtmClient]:
    async with DtmClient(shared_coordinator.api) as client:
        yield client


async def wait_final(dtm: DtmClient, gid: str, timeout: float = 20.0) -> dict[str, Any]:
    trans: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal trans
        trans = (await dtm.query(gid))["transaction"] or {}
        return trans.get("status") in ("succeed", "failed")

    await wait_for(done, timeout, 0.1, f"{gid} to finish")
    return trans


def new_message(dtm: DtmClient, service: Service, gid: str, timeout: int) -> Msg:
    msg = Msg(dtm, gid, TransOptions(timeout_to_fail=timeout))
    return msg.add(service.server.url("credit"), {"order": gid, "amount": 7})


async def test_crash_after_the_local_commit_is_completed_by_the_back_check(
    dtm: DtmClient, shop: Shop, service: Service, prefix: str
) -> None:
    gid = f"{prefix}-after-commit-{uuid.uuid4().hex[:8]}"
    msg = new_message(dtm, service, gid, timeout=1)
    dead = f"http://127.0.0.1:{free_port()}/api/dtmsvr"

    async def business(conn: Any) -> None:
        await shop.insert(conn, gid, 7)
        # The process "dies" once this local transaction commits: its submit never
        # reaches the coordinator.
        msg.dtm = dead

    with pytest.raises(CoordinatorUnavailable):
        await msg.do_and_submit(service.server.url("queryPrepared"), shop.backend, business)
    assert await shop.orders(gid) == [gid]  # the local work committed
    trans = await wait_final(dtm, gid)
    assert trans["status"] == "succeed"
    # Decided by the back-check, which found the committed barrier row.
    assert service.checks
    assert service.checks[0] == (gid, 200)
    assert service.credits == [{"order": gid, "amount": 7}]
    assert await shop.barrier_reason(gid) == "msg"


async def test_crash_before_the_local_commit_fails_the_message(
    dtm: DtmClient, shop: Shop, service: Service, prefix: str
) -> None:
    gid = f"{prefix}-before-commit-{uuid.uuid4().hex[:8]}"
    msg = new_message(dtm, service, gid, timeout=1)

    async def business(conn: Any) -> None:
        await shop.insert(conn, gid, 7)  # partial work, rolled back with the transaction
        raise RuntimeError("process crashed inside its local transaction")

    with pytest.raises(RuntimeError, match="crashed"):
        await msg.do_and_submit(service.server.url("queryPrepared"), shop.backend, business)
    # Nothing was submitted or aborted: only the back-check can decide.
    assert (await dtm.query(gid))["transaction"]["status"] == "prepared"
    trans = await wait_final(dtm, gid)
    assert trans["status"] == "failed"
    assert "FAILURE" in trans["rollback_reason"]
    assert service.checks[0][0] == gid
    assert service.checks[0][1] == 409
    assert service.credits == []
    assert await shop.orders(gid) == []
    assert await shop.barrier_reason(gid) == "rollback"
    # A local transaction that resumed now could not commit the message any more.
    with pytest.raises(DuplicatedRequest):
        await BranchBarrier("msg", gid, "00", "msg").call(
            shop.backend, lambda conn: shop.insert(conn, gid, 7))
    assert await shop.orders(gid) == []


async def test_business_refusal_aborts_at_once_without_a_back_check(
    dtm: DtmClient, shop: Shop, service: Service, prefix: str
) -> None:
    gid = f"{prefix}-refused-{uuid.uuid4().hex[:8]}"
    msg = new_message(dtm, service, gid, timeout=30)

    async def business(conn: Any) -> None:
        await shop.insert(conn, gid, 7)
        raise TransactionFailed("out of stock")

    started = time.monotonic()
    with pytest.raises(TransactionFailed, match="out of stock"):
        await msg.do_and_submit(service.server.url("queryPrepared"), shop.backend, business)
    trans = await wait_final(dtm, gid, timeout=5)
    assert trans["status"] == "failed"
    assert time.monotonic() - started < 5  # aborted, not timed out (30 s)
    assert service.checks == []
    assert service.credits == []
    assert await shop.orders(gid) == []


async def test_do_and_submit_happy_path(
    dtm: DtmClient, shop: Shop, service: Service, prefix: str
) -> None:
    gid = f"{prefix}-ok-{uuid.uuid4().hex[:8]}"
    msg = new_message(dtm, service, gid, timeout=30)
    result = await msg.do_and_submit(
        service.server.url("queryPrepared"), shop.backend,
        lambda conn: shop.insert(conn, gid, 7),
    )
    assert result == "applied"
    trans = await wait_final(dtm, gid, timeout=10)
    assert trans["status"] == "succeed"
    assert service.checks == []
    assert service.credits == [{"order": gid, "amount": 7}]
    assert orjson.loads(trans["payloads"][0]) == {"order": gid, "amount": 7}
