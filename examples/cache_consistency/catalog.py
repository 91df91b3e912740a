"""The catalog service: prices in PostgreSQL, a cache in Redis, read cache-aside.

GET  /product/{id}     the reader: the cached price, or the database's (then cached)
POST /invalidate       the message's action: delete a product's cache entry
GET  /queryPrepared    the message's back-check, answered by the barrier table
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from coordinator.client import BranchInfo, PostgresBarrier, branch_handler, query_prepared_handler

TABLE = "ex_product"
CACHE_TTL = 300  # bounds how long a reader that raced a delete can serve an old price


class Catalog:
    def __init__(self, pool: Any, redis: Redis, key_prefix: str) -> None:
        self.pool = pool
        self.redis = redis
        self.barrier = PostgresBarrier(pool)
        self.cache_prefix = f"{key_prefix}:cache:product:"
        self.invalidated: list[str] = []  # gids whose action ran
        self.back_checks: list[tuple[str, int]] = []  # (gid, HTTP status answered)
        self._back_check = query_prepared_handler(self.barrier)

    def cache_key(self, product: str) -> str:
        return self.cache_prefix + product

    async def reset(self, prices: Mapping[str, int]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            await conn.execute(f"CREATE TABLE {TABLE} (id text PRIMARY KEY, price int NOT NULL)")
            await conn.executemany(f"INSERT INTO {TABLE} VALUES ($1, $2)", list(prices.items()))

    async def price_in_db(self, product: str) -> int:
        return int(await self.pool.fetchval(f"SELECT price FROM {TABLE} WHERE id = $1", product))

    async def cached(self, product: str) -> str | None:
        value = await self.redis.get(self.cache_key(product))
        return None if value is None else str(value)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/product/{id}", self.read)
        app.router.add_post("/invalidate", branch_handler(self.invalidate))
        app.router.add_get("/queryPrepared", self.query_prepared)
        return app

    async def read(self, request: web.Request) -> web.Response:
        product = request.match_info["id"]
        cached = await self.cached(product)
        if cached is not None:
            return web.json_response({"price": int(cached), "source": "cache"})
        price = await self.price_in_db(product)
        await self.redis.set(self.cache_key(product), price, ex=CACHE_TTL)
        return web.json_response({"price": price, "source": "database"})

    async def invalidate(self, request: web.Request, branch: BranchInfo) -> None:
        # Deleting a key twice leaves it just as deleted: a repeated delivery needs no
        # barrier here.
        product = str((await request.json())["product"])
        await self.redis.delete(self.cache_key(product))
        self.invalidated.append(branch.gid)

    async def query_prepared(self, request: web.Request) -> web.Response:
        response = await self._back_check(request)
        self.back_checks.append((request.query.get("gid", ""), response.status))
        return response

    async def barrier_reason(self, gid: str) -> str | None:
        """What the msg barrier row says: "msg" (committed) or "rollback"."""
        value = await self.pool.fetchval(
            "SELECT reason FROM dtm_barrier.barrier WHERE gid = $1 AND branch_id = '00' "
            "AND op = 'msg' AND barrier_id = '01'", gid)
        return None if value is None else str(value)
