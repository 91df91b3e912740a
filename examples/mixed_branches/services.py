"""The three services of a checkout: stock (Redis), wallet (PostgreSQL), shipping (MariaDB)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from coordinator.client import (
    BranchInfo,
    MysqlBarrier,
    PostgresBarrier,
    RedisBarrier,
    TransactionFailed,
    branch_handler,
)
from examples.common import Journal, affected, barrier_call, mysql_execute, mysql_rows

WALLET_TABLE = "ex_mixed_wallet"
SHIPMENT_TABLE = "ex_mixed_shipment"
SERVED = ("Berlin", "Lisbon", "Oslo")  # cities the shipping service delivers to


class StockService:
    """Stock counts as Redis integers; the barrier script refuses to go below zero."""

    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{key_prefix}:stock:"
        self.barrier = RedisBarrier(redis, key_prefix=f"{key_prefix}:barrier:",
                                    expire_seconds=3600)
        self.journal = Journal()

    async def reset(self, stock: Mapping[str, int]) -> None:
        await self.redis.mset({self.prefix + sku: n for sku, n in stock.items()})

    async def stock(self, sku: str) -> int:
        return int(await self.redis.get(self.prefix + sku) or 0)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/Deduct", branch_handler(self.deduct))
        app.router.add_post("/Restore", branch_handler(self.restore))
        return app

    async def deduct(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()
        await self._adjust("Deduct", branch, str(body["sku"]), -int(body["qty"]))

    async def restore(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()
        await self._adjust("Restore", branch, str(body["sku"]), int(body["qty"]))

    async def _adjust(self, name: str, branch: BranchInfo, sku: str, amount: int) -> None:
        try:
            result = await self.barrier.adjust_amount(branch.barrier(), self.prefix + sku,
                                                      amount)
        except TransactionFailed as exc:
            self.journal.add(branch.gid, f"{name}: refused")
            raise TransactionFailed(f"{name}: not enough {sku} in stock") from exc
        self.journal.add(branch.gid, f"{name}: {result}")


class WalletService:
    """Balances in PostgreSQL; Debit refuses to overdraw."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.barrier = PostgresBarrier(pool)
        self.journal = Journal()

    async def reset(self, balances: Mapping[str, int]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS {WALLET_TABLE}")
            await conn.execute(f"CREATE TABLE {WALLET_TABLE} "
                               "(id text PRIMARY KEY, balance int NOT NULL)")
            await conn.executemany(f"INSERT INTO {WALLET_TABLE} VALUES ($1, $2)",
                                   list(balances.items()))

    async def balance(self, account: str) -> int:
        return int(await self.pool.fetchval(
            f"SELECT balance FROM {WALLET_TABLE} WHERE id = $1", account))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/Debit", branch_handler(self.debit))
        app.router.add_post("/Refund", branch_handler(self.refund))
        return app

    async def debit(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()
        account, amount = str(body["account"]), int(body["amount"])

        async def take(conn: Any) -> None:
            status = await conn.execute(f"UPDATE {WALLET_TABLE} SET balance = balance - $1 "
                                        "WHERE id = $2 AND balance >= $1", amount, account)
            if status != "UPDATE 1":
                raise TransactionFailed(f"insufficient funds in {account}")

        await barrier_call(self.journal, "Debit", branch, self.barrier, take)

    async def refund(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()

        async def give_back(conn: Any) -> None:
            await conn.execute(f"UPDATE {WALLET_TABLE} SET balance = balance + $1 "
                               "WHERE id = $2", int(body["amount"]), str(body["account"]))

        await barrier_call(self.journal, "Refund", branch, self.barrier, give_back)


class ShippingService:
    """Shipments in MariaDB; Ship refuses cities it does not serve."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.barrier = MysqlBarrier(pool)
        self.journal = Journal()

    async def reset(self) -> None:
        await mysql_execute(
            self.pool,
            f"DROP TABLE IF EXISTS {SHIPMENT_TABLE}",
            f"CREATE TABLE {SHIPMENT_TABLE} (id varchar(64) PRIMARY KEY, qty int NOT NULL, "
            "city varchar(64) NOT NULL, status varchar(16) NOT NULL) ENGINE = InnoDB",
        )

    async def shipments(self) -> dict[str, str]:
        """order → created/cancelled"""
        rows = await mysql_rows(self.pool, f"SELECT id, status FROM {SHIPMENT_TABLE}")
        return {str(r[0]): str(r[1]) for r in rows}

    async def units_shipped(self) -> int:
        rows = await mysql_rows(self.pool, f"SELECT coalesce(sum(qty), 0) FROM {SHIPMENT_TABLE} "
                                           "WHERE status = 'created'")
        return int(rows[0][0])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/Ship", branch_handler(self.ship))
        app.router.add_post("/CancelShipment", branch_handler(self.cancel))
        return app

    async def ship(self, request: web.Request, branch: BranchInfo) -> None:
        body = await request.json()
        order, qty, city = str(body["order"]), int(body["qty"]), str(body["city"])

        async def create(conn: Any) -> None:
            if city not in SERVED:
                raise TransactionFailed(f"no delivery to {city}")
            await affected(conn, f"INSERT INTO {SHIPMENT_TABLE} VALUES (%s, %s, %s, 'created')",
                           order, qty, city)

        await barrier_call(self.journal, "Ship", branch, self.barrier, create)

    async def cancel(self, request: web.Request, branch: BranchInfo) -> None:
        order = str((await request.json())["order"])

        async def mark(conn: Any) -> None:
            await affected(conn, f"UPDATE {SHIPMENT_TABLE} SET status = 'cancelled' "
                                 "WHERE id = %s", order)

        await barrier_call(self.journal, "CancelShipment", branch, self.barrier, mark)
