"""The sub-transaction barrier against real PostgreSQL, MariaDB and Redis.

Each behaviour test runs once per backend. The business is "add delta to an account's
amount, refusing to go below zero"; the tests count how often the business really ran
and read the stored amount back, so a barrier that lets a duplicate or a hanging call
through shows up as a wrong amount.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import barrier_mysql, barrier_postgres
from coordinator.client.barrier import BarrierResult, BranchBarrier, check_table_name, decide
from coordinator.client.barrier_mysql import MysqlBarrier, quiet_cursor
from coordinator.client.barrier_postgres import PostgresBarrier
from coordinator.client.barrier_redis import RedisBarrier
from coordinator.client.errors import DuplicatedRequest, TransactionFailed
from tests.conftest import open_mysql_pool, open_pg_pool

ROOT = Path(__file__).resolve().parents[1]
START = 100


class Harness:
    """One backend: an account table (or key) and the business that changes it."""

    name = ""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.runs = 0  # how often the business itself ran (and was not skipped)

    def account(self, name: str) -> str:
        return f"{self.tag}-{name}"

    async def create(self, account: str, amount: int = START) -> None:
        raise NotImplementedError

    async def amount(self, account: str) -> int:
        raise NotImplementedError

    async def apply(
        self, barrier: BranchBarrier, account: str, delta: int, slow: float = 0.0
    ) -> BarrierResult:
        raise NotImplementedError

    async def query_prepared(self, gid: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PostgresHarness(Harness):
    name = "postgres"

    async def open(self) -> PostgresHarness:
        self.pool = await open_pg_pool()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7201)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS sdk_barrier_account (id text PRIMARY KEY, "
                "amount bigint NOT NULL)"
            )
        self.backend = PostgresBarrier(self.pool)
        return self

    async def create(self, account: str, amount: int = START) -> None:
        await self.pool.execute(
            "INSERT INTO sdk_barrier_account (id, amount) VALUES ($1, $2)", account, amount
        )

    async def amount(self, account: str) -> int:
        value = await self.pool.fetchval(
            "SELECT amount FROM sdk_barrier_account WHERE id = $1", account
        )
        return int(value)

    async def apply(
        self, barrier: BranchBarrier, account: str, delta: int, slow: float = 0.0
    ) -> BarrierResult:
        async def business(conn: Any) -> None:
            self.runs += 1
            left = await conn.fetchval(
                "UPDATE sdk_barrier_account SET amount = amount + $1 WHERE id = $2 "
                "RETURNING amount", delta, account,
            )
            await asyncio.sleep(slow)
            if left < 0:
                raise TransactionFailed("insufficient amount")  # after partial work

        return await barrier.call(self.backend, business)

    async def query_prepared(self, gid: str) -> None:
        await self.backend.query_prepared(gid)

    async def close(self) -> None:
        await self.pool.execute("DELETE FROM sdk_barrier_account WHERE id LIKE $1",
                                f"{self.tag}-%")
        await self.pool.close()


class MysqlHarness(Harness):
    name = "mysql"

    async def open(self) -> MysqlHarness:
        self.pool = await open_mysql_pool()
        await self._run(
            "CREATE TABLE IF NOT EXISTS sdk_barrier_account (id varchar(100) PRIMARY KEY, "
            "amount bigint NOT NULL) ENGINE = InnoDB"
        )
        self.backend = MysqlBarrier(self.pool)
        return self

    async def _run(self, sql: str, *args: Any) -> Any:
        async with self.pool.acquire() as conn:
            async with conn.cursor(quiet_cursor()) as cur:
                await cur.execute(sql, args)
                row = await cur.fetchone()
            await conn.commit()
            return row

    async def create(self, account: str, amount: int = START) -> None:
        await self._run("INSERT INTO sdk_barrier_account (id, amount) VALUES (%s, %s)",
                        account, amount)

    async def amount(self, account: str) -> int:
        row = await self._run("SELECT amount FROM sdk_barrier_account WHERE id = %s", account)
        return int(row[0])

    async def apply(
        self, barrier: BranchBarrier, account: str, delta: int, slow: float = 0.0
    ) -> BarrierResult:
        async def business(conn: Any) -> None:
            self.runs += 1
            async with conn.cursor() as cur:
                await cur.execute(
                    "UPDATE sdk_barrier_account SET amount = amount + %s WHERE id = %s",
                    (delta, account),
                )
                await cur.execute("SELECT amount FROM sdk_barrier_account WHERE id = %s",
                                  (account,))
                (left,) = await cur.fetchone()
            await asyncio.sleep(slow)
            if left < 0:
                raise TransactionFailed("insufficient amount")

        return await barrier.call(self.backend, business)

    async def query_prepared(self, gid: str) -> None:
        await self.backend.query_prepared(gid)

    async def close(self) -> None:
        await self._run("DELETE FROM sdk_barrier_account WHERE id LIKE %s", f"{self.tag}-%")
        self.pool.close()
        await self.pool.wait_closed()


class RedisHarness(Harness):
    name = "redis"

    def __init__(self, tag: str, client: Any) -> None:
        super().__init__(tag)
        self.client = client
        self.backend = RedisBarrier(client, key_prefix=f"{tag}:barrier:")

    def account(self, name: str) -> str:
        return f"{self.tag}:account:{name}"

    async def create(self, account: str, amount: int = START) -> None:
        await self.client.set(account, amount)

    async def amount(self, account: str) -> int:
        return int(await self.client.get(account))

    async def apply(
        self, barrier: BranchBarrier, account: str, delta: int, slow: float = 0.0
    ) -> BarrierResult:
        result = await self.backend.adjust_amount(barrier, account, delta)
        if result is BarrierResult.APPLIED:
            self.runs += 1
        return result

    async def query_prepared(self, gid: str) -> None:
        await self.backend.query_prepared(gid)

    async def close(self) -> None:
        pass


@pytest.fixture(params=["postgres", "mysql", "redis"])
async def harness(request: pytest.FixtureRequest, aredis: Any, prefix: str
                  ) -> AsyncIterator[Harness]:
    if request.param == "postgres":
        h: Harness = await PostgresHarness(prefix).open()
    elif request.param == "mysql":
        h = await MysqlHarness(prefix).open()
    else:
        h = RedisHarness(prefix, aredis)
    yield h
    await h.close()


def branch(gid: str, op: str, trans_type: str = "saga", branch_id: str = "01") -> BranchBarrier:
    """A fresh barrier, as one handler call builds it from the request's query."""
    return BranchBarrier(trans_type, gid, branch_id, op)


def new_gid() -> str:
    return "bt-" + uuid.uuid4().hex


# -- behaviour, on every backend ----------------------------------------------------------


async def test_duplicate_delivery_runs_the_business_once(harness: Harness) -> None:
    acct = harness.account("dup")
    await harness.create(acct)
    gid = new_gid()
    assert await harness.apply(branch(gid, "action"), acct, -30) is BarrierResult.APPLIED
    assert await harness.apply(branch(gid, "action"), acct, -30) is BarrierResult.DUPLICATE
    assert await harness.amount(acct) == START - 30
    assert await harness.apply(branch(gid, "compensate"), acct, 30) is BarrierResult.APPLIED
    assert await harness.apply(branch(gid, "compensate"), acct, 30) is BarrierResult.DUPLICATE
    assert await harness.amount(acct) == START
    assert harness.runs == 2


@pytest.mark.parametrize(("forward", "backward", "trans_type"),
                         [("action", "compensate", "saga"), ("try", "cancel", "tcc")])
async def test_null_compensation_then_late_forward_op_changes_nothing(
    harness: Harness, forward: str, backward: str, trans_type: str
) -> None:
    acct = harness.account(f"null-{forward}")
    await harness.create(acct)
    gid = new_gid()
    # The compensation arrives first (the forward call was lost or is still in flight).
    result = await harness.apply(branch(gid, backward, trans_type), acct, 30)
    assert result is BarrierResult.NULL_COMPENSATION
    assert await harness.apply(branch(gid, backward, trans_type), acct, 30) in (
        BarrierResult.DUPLICATE,
    )
    # Now the forward op finally arrives: it must be refused (hanging), or the money it
    # takes would never be given back.
    late = await harness.apply(branch(gid, forward, trans_type), acct, -30)
    assert late is BarrierResult.DUPLICATE
    assert await harness.amount(acct) == START
    assert harness.runs == 0


async def test_concurrent_identical_calls_run_the_business_exactly_once(
    harness: Harness,
) -> None:
    acct = harness.account("race")
    await harness.create(acct)
    gid = new_gid()
    # Five deliveries of the same action at once, each on a connection of its own; the
    # business holds its transaction open a while so the others queue on the barrier row.
    results = await asyncio.gather(
        *(harness.apply(branch(gid, "action"), acct, -10, slow=0.2) for _ in range(5))
    )
    assert sorted(results) == sorted([BarrierResult.APPLIED] + [BarrierResult.DUPLICATE] * 4)
    assert harness.runs == 1
    assert await harness.amount(acct) == START - 10


async def test_refused_action_leaves_nothing_and_its_compensation_is_null(
    harness: Harness,
) -> None:
    acct = harness.account("refuse")
    await harness.create(acct)
    gid = new_gid()
    with pytest.raises(TransactionFailed):
        await harness.apply(branch(gid, "action"), acct, -(START + 1))
    assert await harness.amount(acct) == START
    # The refusal rolled back the barrier rows too: the compensation sees no action.
    result = await harness.apply(branch(gid, "compensate"), acct, START + 1)
    assert result is BarrierResult.NULL_COMPENSATION
    assert await harness.amount(acct) == START


async def test_each_barrier_call_of_one_handler_gets_its_own_barrier_id(
    harness: Harness,
) -> None:
    acct = harness.account("ids")
    await harness.create(acct)
    gid = new_gid()
    handler_call = branch(gid, "action")
    assert await harness.apply(handler_call, acct, -1) is BarrierResult.APPLIED  # 01
    assert await harness.apply(handler_call, acct, -2) is BarrierResult.APPLIED  # 02
    redelivered = branch(gid, "action")
    assert await harness.apply(redelivered, acct, -1) is BarrierResult.DUPLICATE
    assert await harness.apply(redelivered, acct, -2) is BarrierResult.DUPLICATE
    assert await harness.amount(acct) == START - 3


async def test_msg_back_check_before_the_local_commit_records_a_rollback(
    harness: Harness,
) -> None:
    acct = harness.account("msg-rb")
    await harness.create(acct)
    gid = new_gid()
    with pytest.raises(TransactionFailed):
        await harness.query_prepared(gid)
    # The local transaction comes too late: it must not run, and must say so.
    with pytest.raises(DuplicatedRequest):
        await harness.apply(branch(gid, "msg", "msg", "00"), acct, -10)
    assert await harness.amount(acct) == START
    with pytest.raises(TransactionFailed):
        await harness.query_prepared(gid)
    assert harness.runs == 0


async def test_msg_back_check_after_the_local_commit_succeeds(harness: Harness) -> None:
    acct = harness.account("msg-ok")
    await harness.create(acct)
    gid = new_gid()
    assert await harness.apply(branch(gid, "msg", "msg", "00"), acct, -10) is (
        BarrierResult.APPLIED
    )
    await harness.query_prepared(gid)  # no exception: committed
    await harness.query_prepared(gid)
    with pytest.raises(DuplicatedRequest):
        await harness.apply(branch(gid, "msg", "msg", "00"), acct, -10)
    assert await harness.amount(acct) == START - 10


# -- SQL only: the back-check racing an open local transaction -------------------------


@pytest.fixture(params=["postgres", "mysql"])
async def sql_harness(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Harness]:
    h: Harness = await (PostgresHarness(prefix) if request.param == "postgres"
                        else MysqlHarness(prefix)).open()
    yield h
    await h.close()


@pytest.mark.parametrize("commits", [True, False])
async def test_msg_back_check_waits_for_an_open_local_transaction(
    sql_harness: Harness, commits: bool
) -> None:
    acct = sql_harness.account(f"msg-wait-{commits}")
    await sql_harness.create(acct)
    gid = new_gid()
    delta = -10 if commits else -(START + 1)  # the second one is refused after its work
    local = asyncio.create_task(
        sql_harness.apply(branch(gid, "msg", "msg", "00"), acct, delta, slow=0.5)
    )
    await asyncio.sleep(0.2)  # the local transaction holds the msg row now
    assert not local.done()
    if commits:
        await sql_harness.query_prepared(gid)
        # The commit that released the row and the back-check's answer can arrive in one
        # loop iteration, before the local task is resumed: give it a moment, far less
        # than the 0.3 s it would still sleep had the back-check not waited for it.
        await asyncio.wait({local}, timeout=0.1)
        assert local.done(), "the back-check answered before the local transaction ended"
        assert await local is BarrierResult.APPLIED
        assert await sql_harness.amount(acct) == START - 10
    else:
        with pytest.raises(TransactionFailed):
            await sql_harness.query_prepared(gid)
        with pytest.raises(TransactionFailed):
            await local
        assert await sql_harness.amount(acct) == START


# -- Redis only ---------------------------------------------------------------------------


async def test_redis_amount_check_refuses_to_go_negative(aredis: Any, prefix: str) -> None:
    barrier = RedisBarrier(aredis, key_prefix=f"{prefix}:barrier:")
    stock = f"{prefix}:stock"
    await aredis.set(stock, 5)
    first, second = new_gid(), new_gid()
    assert await barrier.adjust_amount(branch(first, "action"), stock, -3) is (
        BarrierResult.APPLIED
    )
    with pytest.raises(TransactionFailed):
        await barrier.adjust_amount(branch(second, "action"), stock, -3)
    assert int(await aredis.get(stock)) == 2
    # Nothing was written for the refused one, so its compensation changes nothing.
    assert await barrier.adjust_amount(branch(second, "compensate"), stock, 3) is (
        BarrierResult.NULL_COMPENSATION
    )
    assert int(await aredis.get(stock)) == 2
    assert await barrier.adjust_amount(branch(new_gid(), "action"), stock, -2) is (
        BarrierResult.APPLIED
    )
    assert int(await aredis.get(stock)) == 0
    with pytest.raises(TransactionFailed):  # a missing key is refused too
        await barrier.adjust_amount(branch(new_gid(), "action"), f"{prefix}:none", -1)
    # The barrier keys are named like dtm's and expire.
    key = f"{prefix}:barrier:{first}-01-action-01"
    assert await aredis.get(key) == b"action"
    assert 0 < await aredis.ttl(key) <= barrier.expire_seconds


async def test_redis_barrier_survives_a_script_cache_flush(aredis: Any, prefix: str) -> None:
    barrier = RedisBarrier(aredis, key_prefix=f"{prefix}:barrier:")
    stock = f"{prefix}:stock"
    await aredis.set(stock, 10)
    assert await barrier.adjust_amount(branch(new_gid(), "action"), stock, -1) is (
        BarrierResult.APPLIED
    )
    await aredis.script_flush()  # EVALSHA now answers NOSCRIPT; the Script reloads
    assert await barrier.adjust_amount(branch(new_gid(), "action"), stock, -1) is (
        BarrierResult.APPLIED
    )
    assert int(await aredis.get(stock)) == 8


# -- pure parts and the schema ----------------------------------------------------------


def test_decide_table() -> None:
    assert decide("action", False, True) is BarrierResult.APPLIED
    assert decide("action", False, False) is BarrierResult.DUPLICATE
    assert decide("compensate", True, True) is BarrierResult.NULL_COMPENSATION
    assert decide("cancel", False, True) is BarrierResult.APPLIED
    assert decide("rollback", True, True) is BarrierResult.NULL_COMPENSATION
    assert decide("cancel", False, False) is BarrierResult.DUPLICATE
    with pytest.raises(DuplicatedRequest):
        decide("msg", False, False)


def test_table_names_are_checked_not_interpolated_blindly() -> None:
    assert check_table_name("dtm_barrier.barrier") == "dtm_barrier.barrier"
    for bad in ("barrier; DROP TABLE x", "a.b.c", "x'", ""):
        with pytest.raises(ValueError, match="table"):
            check_table_name(bad)


def _statements(sql: str) -> list[str]:
    text = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    return [" ".join(s.split()) for s in text.split(";") if s.strip()]


@pytest.mark.parametrize(("module", "path"), [
    (barrier_postgres, "sql/barrier.postgres.sql"),
    (barrier_mysql, "sql/barrier.mysql.sql"),
])
def test_schema_files_match_what_ensure_barrier_table_runs(module: Any, path: str) -> None:
    assert _statements((ROOT / path).read_text()) == [" ".join(s.split()) for s in module.SCHEMA]


async def test_ensure_barrier_table_is_idempotent_and_dtm_shaped(
    pg_pool: Any, mysql_pool: Any
) -> None:
    async with pg_pool.acquire() as conn:
        await barrier_postgres.ensure_barrier_table(conn)
        await barrier_postgres.ensure_barrier_table(conn)
        cols = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'dtm_barrier' AND table_name = 'barrier' "
            "ORDER BY ordinal_position"
        )
    expected = ["id", "trans_type", "gid", "branch_id", "op", "barrier_id", "reason",
                "create_time", "update_time"]
    assert [c["column_name"] for c in cols] == expected
    async with mysql_pool.acquire() as conn:
        await barrier_mysql.ensure_barrier_table(conn)
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'dtm_barrier' AND table_name = 'barrier' "
                "ORDER BY ordinal_position"
            )
            rows = await cur.fetchall()
    assert [r[0] for r in rows] == expected
