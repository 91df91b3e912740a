"""Fault injection: bank transfers as sagas across MariaDB and PostgreSQL, behind the barrier.

TransOut takes money from an account in MariaDB, TransIn puts it into an account in
PostgreSQL; each has a compensation, and every branch runs behind the sub-transaction
barrier. Both banks are aiohttp apps on loopback built with the SDK. While a few hundred
transfers run, the banks (seeded) answer 500 before or after doing the work, answer
after the coordinator's request timeout (before or after the work), and are stopped
mid-request and restarted on the same port, dropping their connection pools. Some
transfers are refused by business rules (insufficient funds, a frozen account), and
sagas that take too long are rolled back by their timeout while slow actions are still
in flight (hanging requests).

Afterwards every transaction must be final, the money in both databases together must be
unchanged, and every account must hold exactly what the succeeded transfers say.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from coordinator.client import (
    BarrierResult,
    BranchInfo,
    DtmClient,
    Saga,
    TransactionFailed,
    TransOptions,
    branch_handler,
)
from coordinator.client.barrier import SqlBarrier
from coordinator.client.barrier_mysql import MysqlBarrier, quiet_cursor
from coordinator.client.barrier_postgres import PostgresBarrier
from tests.conftest import open_mysql_pool, open_pg_pool
from tests.support import AppServer, CoordinatorProcess, StoreProbe

SEED = 20240611
TRANSFERS = 200
ACCOUNTS = 6
START = 2000  # per MariaDB account; PostgreSQL accounts start empty
FROZEN = 0  # PostgreSQL account i0 refuses every credit
REQUEST_TIMEOUT = 1  # seconds the coordinator waits for a branch
SLOW = 1.3  # a "timeout" fault answers this late
SAGA_TIMEOUT = 6  # a transfer not finished by then is rolled back
# (kind, probability) of the fault injected into one branch call.
FAULTS = [("error_before", 0.07), ("error_after", 0.05), ("slow_before", 0.03),
          ("slow_after", 0.03)]


@dataclass
class Bank:
    """One bank service: its database pool, its barrier and its HTTP app."""

    name: str
    open_pool: Callable[[], Awaitable[Any]]
    make_barrier: Callable[[Any], SqlBarrier]
    credit: Callable[[Any, str, int], Awaitable[None]]  # business of the forward op
    debit: Callable[[Any, str, int], Awaitable[None]]  # business of the compensation
    rng: random.Random
    inject: bool = True
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    applied: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    results: collections.Counter[str] = field(default_factory=collections.Counter)
    late: list[BarrierResult] = field(default_factory=list)  # results of delayed calls
    in_flight: int = 0
    pool: Any = None
    server: AppServer | None = None

    async def start(self) -> None:
        self.pool = await self.open_pool()
        barrier = self.make_barrier(self.pool)

        @branch_handler
        async def forward(request: web.Request, branch: BranchInfo) -> None:
            body = await request.json()
            await self._run(branch, barrier, self.credit, body)

        @branch_handler
        async def backward(request: web.Request, branch: BranchInfo) -> None:
            body = await request.json()
            await self._run(branch, barrier, self.debit, body)

        app = web.Application(middlewares=[self._inject])
        app.router.add_post("/action", forward)
        app.router.add_post("/compensate", backward)
        port = self.server.port if self.server else 0
        self.server = await AppServer(app, port=port, shutdown_timeout=0.2).start()

    async def stop(self) -> None:
        """Like a process that is killed: requests in flight are cancelled mid-way."""
        assert self.server is not None
        await self.server.stop()
        await self.pool_close()

    async def pool_close(self) -> None:
        pool, self.pool = self.pool, None
        if hasattr(pool, "wait_closed"):  # aiomysql
            pool.close()
            await pool.wait_closed()
        else:
            await pool.close()

    async def _run(self, branch: BranchInfo, barrier: SqlBarrier,
                   business: Callable[[Any, str, int], Awaitable[None]],
                   body: dict[str, Any]) -> None:
        delay = body.get("delay", 0) if branch.op == "action" else 0
        self.in_flight += 1
        try:
            if delay:  # stuck in the network before reaching the bank
                await asyncio.sleep(delay)
            result = await branch.barrier().call(
                barrier, lambda conn: business(conn, body["account"], body["amount"]))
        finally:
            self.in_flight -= 1
        if delay:
            self.late.append(result)
        self.results[f"{branch.op}:{result.value}"] += 1
        if result is BarrierResult.APPLIED:
            self.applied[(branch.gid, branch.op)] += 1

    @web.middleware
    async def _inject(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        roll, kind = self.rng.random(), ""
        for name, p in FAULTS if self.inject else []:
            if roll < p:
                kind = name
                break
            roll -= p
        if kind:
            self.faults[kind] += 1
        if kind == "error_before":
            return web.Response(status=500, text="injected error")
        if kind == "slow_before":
            await asyncio.sleep(SLOW)
        response = await handler(request)
        if kind == "error_after":
            return web.Response(status=500, text="injected error after the work")
        if kind == "slow_after":
            await asyncio.sleep(SLOW)
        return response


# -- the two databases ----------------------------------------------------------------------


async def mysql_credit_out(conn: Any, account: str, amount: int) -> None:
    """TransOut: take money out, refusing to overdraw."""
    async with conn.cursor() as cur:
        changed = await cur.execute(
            "UPDATE sdk_bank_out SET balance = balance - %s WHERE id = %s AND balance >= %s",
            (amount, account, amount))
    if changed != 1:
        raise TransactionFailed(f"insufficient funds in {account}")


async def mysql_refund(conn: Any, account: str, amount: int) -> None:
    async with conn.cursor() as cur:
        await cur.execute("UPDATE sdk_bank_out SET balance = balance + %s WHERE id = %s",
                          (amount, account))


async def pg_credit_in(conn: Any, account: str, amount: int) -> None:
    """TransIn: put money in, unless the account is frozen."""
    if account.endswith(f"-i{FROZEN}"):
        raise TransactionFailed(f"account {account} is frozen")
    await conn.execute("UPDATE sdk_bank_in SET balance = balance + $1 WHERE id = $2",
                       amount, account)


async def pg_take_back(conn: Any, account: str, amount: int) -> None:
    await conn.execute("UPDATE sdk_bank_in SET balance = balance - $1 WHERE id = $2",
                       amount, account)


async def setup_accounts(prefix: str) -> None:
    pool = await open_mysql_pool()
    try:
        async with pool.acquire() as conn:
            async with conn.cursor(quiet_cursor()) as cur:
                await cur.execute("CREATE TABLE IF NOT EXISTS sdk_bank_out (id varchar(100) "
                                  "PRIMARY KEY, balance bigint NOT NULL) ENGINE = InnoDB")
                await cur.executemany(
                    "INSERT INTO sdk_bank_out (id, balance) VALUES (%s, %s)",
                    [(f"{prefix}-o{i}", START) for i in range(ACCOUNTS)])
            await conn.commit()
    finally:
        pool.close()
        await pool.wait_closed()
    pg = await open_pg_pool()
    try:
        async with pg.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7203)")
            await conn.execute("CREATE TABLE IF NOT EXISTS sdk_bank_in (id text PRIMARY KEY, "
                               "balance bigint NOT NULL)")
            await conn.executemany("INSERT INTO sdk_bank_in (id, balance) VALUES ($1, 0)",
                                   [(f"{prefix}-i{i}",) for i in range(ACCOUNTS)])
    finally:
        await pg.close()


async def read_balances(prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    pool = await open_mysql_pool()
    try:
        async with pool.acquire() as conn:
            async with conn.cursor() as cur:
                await cur.execute("SELECT id, balance FROM sdk_bank_out WHERE id LIKE %s",
                                  (f"{prefix}-o%",))
                out.update({r[0]: int(r[1]) for r in await cur.fetchall()})
            await conn.commit()
    finally:
        pool.close()
        await pool.wait_closed()
    pg = await open_pg_pool()
    try:
        rows = await pg.fetch("SELECT id, balance FROM sdk_bank_in WHERE id LIKE $1",
                              f"{prefix}-i%")
        out.update({r["id"]: int(r["balance"]) for r in rows})
    finally:
        await pg.close()
    return out


async def drop_accounts(prefix: str) -> None:
    pool = await open_mysql_pool()
    try:
        async with pool.acquire() as conn:
            async with conn.cursor() as cur:
                await cur.execute("DELETE FROM sdk_bank_out WHERE id LIKE %s", (f"{prefix}-o%",))
            await conn.commit()
    finally:
        pool.close()
        await pool.wait_closed()
    pg = await open_pg_pool()
    try:
        await pg.execute("DELETE FROM sdk_bank_in WHERE id LIKE $1", f"{prefix}-i%")
    finally:
        await pg.close()


@pytest.fixture(params=[True], ids=["faults"])
async def banks(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[tuple[Bank, Bank]]:
    inject = request.param
    await setup_accounts(prefix)
    out_bank = Bank("out", open_mysql_pool, MysqlBarrier, mysql_credit_out, mysql_refund,
                    random.Random(SEED), inject)
    in_bank = Bank("in", open_pg_pool, PostgresBarrier, pg_credit_in, pg_take_back,
                   random.Random(SEED + 1), inject)
    await out_bank.start()
    await in_bank.start()
    yield out_bank, in_bank
    for bank in (out_bank, in_bank):
        if bank.pool is not None:
            await bank.stop()
    await drop_accounts(prefix)


async def chaos(banks: tuple[Bank, Bank], restarts: list[str], stop: asyncio.Event) -> None:
    """Kill and restart the banks in turn while transfers are running."""
    for i in range(4):
        await asyncio.sleep(0.8)
        if stop.is_set():
            return
        bank = banks[i % 2]
        await bank.stop()
        await asyncio.sleep(0.6)
        await bank.start()
        restarts.append(bank.name)


async def test_bank_transfers_survive_faults_and_keep_the_money(
    redis_url: str, prefix: str, banks: tuple[Bank, Bank]
) -> None:
    out_bank, in_bank = banks
    assert out_bank.server is not None
    assert in_bank.server is not None
    coordinator = await CoordinatorProcess(
        redis_url, prefix, COORDINATOR_ENGINE_MAX_RETRY_INTERVAL=4
    ).start()
    probe = StoreProbe(redis_url, prefix)
    rng = random.Random(SEED + 2)
    transfers = [
        (f"{prefix}-t{j:03d}", f"{prefix}-o{rng.randrange(ACCOUNTS)}",
         f"{prefix}-i{rng.randrange(ACCOUNTS)}", rng.randint(10, 100))
        for j in range(TRANSFERS)
    ]
    options = TransOptions(request_timeout=REQUEST_TIMEOUT, timeout_to_fail=SAGA_TIMEOUT)
    restarts: list[str] = []
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        chaos_task = asyncio.create_task(chaos(banks, restarts, stop))
        async with DtmClient(coordinator.api) as dtm:
            gate = asyncio.Semaphore(20)

            async def submit(gid: str, src: str, dst: str, amount: int, delay: float) -> None:
                # Spread the submits over about 7 s, so that all four restarts (done by
                # about 5.6 s) hit transfers in flight however fast the machine is.
                await asyncio.sleep(delay)
                saga = Saga(dtm, gid, options)
                saga.add(out_bank.server.url("action"), out_bank.server.url("compensate"),
                         {"account": src, "amount": amount})
                saga.add(in_bank.server.url("action"), in_bank.server.url("compensate"),
                         {"account": dst, "amount": amount})
                async with gate:
                    await saga.submit()

            await asyncio.gather(*(submit(*t, delay=i * 0.035)
                                   for i, t in enumerate(transfers)))
            statuses = await probe.wait_final([t[0] for t in transfers], timeout=45)
        stop.set()
        await chaos_task
    finally:
        stop.set()
        coordinator.stop()
        await probe.close()
    elapsed = time.monotonic() - started

    balances = await read_balances(prefix)
    expected = {f"{prefix}-o{i}": START for i in range(ACCOUNTS)}
    expected.update({f"{prefix}-i{i}": 0 for i in range(ACCOUNTS)})
    for gid, src, dst, amount in transfers:
        if statuses[gid] == "succeed":
            expected[src] -= amount
            expected[dst] += amount
    assert sum(balances.values()) == START * ACCOUNTS, "money was created or destroyed"
    assert balances == expected

    # The run was meaningful: both outcomes, every kind of fault, and the restarts.
    outcome = collections.Counter(statuses.values())
    assert outcome["succeed"] > TRANSFERS // 3, outcome
    assert outcome["failed"] > 10, outcome
    faults = out_bank.faults + in_bank.faults
    assert all(faults[kind] > 0 for kind, _ in FAULTS), faults
    assert restarts == ["out", "in", "out", "in"]
    # Exactly-once, seen from inside the banks: no branch op did its work twice, and the
    # barrier really had repeats and null compensations to absorb.
    for bank in banks:
        twice = [key for key, n in bank.applied.items() if n > 1]
        assert not twice, f"{bank.name}: applied more than once: {twice[:5]}"
    results = out_bank.results + in_bank.results
    assert results["action:duplicate"] > 0, results
    assert results["compensate:null_compensation"] > 0, results
    print(f"\n{TRANSFERS} transfers in {elapsed:.1f}s: {dict(outcome)}; faults {dict(faults)}; "
          f"restarts {restarts}; barrier {dict(sorted(results.items()))}")
    assert elapsed < 60, f"took {elapsed:.1f}s"


@pytest.mark.parametrize("banks", [False], indirect=True, ids=["no-faults"])
async def test_late_credit_after_a_timeout_rollback_is_refused(
    redis_url: str, prefix: str, banks: tuple[Bank, Bank]
) -> None:
    """Hanging requests, deterministically: every TransIn call is held up in the network
    longer than the whole saga may take, so the saga times out and compensates (TransIn's
    compensation is a null compensation) while the credits are still on their way. When
    they arrive, the barrier must refuse them, or money would appear from nowhere."""
    out_bank, in_bank = banks
    assert out_bank.server is not None
    assert in_bank.server is not None
    coordinator = await CoordinatorProcess(redis_url, prefix).start()
    probe = StoreProbe(redis_url, prefix)
    gids = [f"{prefix}-late{j}" for j in range(5)]
    options = TransOptions(request_timeout=REQUEST_TIMEOUT, timeout_to_fail=2)
    try:
        async with DtmClient(coordinator.api) as dtm:
            for j, gid in enumerate(gids):
                saga = Saga(dtm, gid, options)
                saga.add(out_bank.server.url("action"), out_bank.server.url("compensate"),
                         {"account": f"{prefix}-o{j}", "amount": 50})
                saga.add(in_bank.server.url("action"), in_bank.server.url("compensate"),
                         {"account": f"{prefix}-i{j + 1}", "amount": 50, "delay": 3.5})
                await saga.submit()
            statuses = await probe.wait_final(gids, timeout=20)
        assert set(statuses.values()) == {"failed"}
        # TransIn was compensated before any credit arrived: null compensations.
        compensations = {k: n for k, n in in_bank.results.items() if k.startswith("comp")}
        assert compensations == {"compensate:null_compensation": len(gids)}
        # Let every delayed credit arrive at the bank.
        deadline = time.monotonic() + 10
        while (in_bank.in_flight or not in_bank.late) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        coordinator.stop()
        await probe.close()
    assert len(in_bank.late) >= len(gids)
    assert set(in_bank.late) == {BarrierResult.DUPLICATE}, in_bank.late
    assert in_bank.results["action:applied"] == 0
    balances = await read_balances(prefix)
    assert balances == {**{f"{prefix}-o{i}": START for i in range(ACCOUNTS)},
                        **{f"{prefix}-i{i}": 0 for i in range(ACCOUNTS)}}
