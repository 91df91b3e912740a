"""Driver: a reader fills the cache, then three price updates: one that goes through,
one whose writer dies after its commit, one whose writer dies before it.

    python -m examples.cache_consistency
"""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp

from coordinator.client import DtmClient, local_gid
from examples.cache_consistency.catalog import Catalog
from examples.cache_consistency.writer import WriterDied, update_price
from examples.common import (
    Checks,
    Server,
    cli,
    describe,
    final_status,
    key_prefix,
    pg_pool,
    redis_client,
    run_example,
)

NAME = "cache_consistency"
PRODUCT = "p1"


async def read(http: aiohttp.ClientSession, catalog: Server) -> dict[str, Any]:
    """What a customer sees: ``{"price": …, "source": "cache" | "database"}``."""
    async with http.get(catalog.url(f"product/{PRODUCT}")) as response:
        response.raise_for_status()
        answer: dict[str, Any] = await response.json()
        return answer


async def scenario(dtm: DtmClient, checks: Checks) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(pg_pool())
        redis = await stack.enter_async_context(redis_client())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        catalog = Catalog(pool, redis, key_prefix(NAME))
        await catalog.reset({PRODUCT: 100})
        server = await stack.enter_async_context(Server(catalog.app()))
        print(f"catalog service {server.url()}: prices in PostgreSQL, cache key "
              f"{catalog.cache_key(PRODUCT)}")

        checks.section("A reader fills the cache")
        checks.equal("first read", await read(http, server), {"price": 100, "source": "database"})
        checks.equal("second read", await read(http, server), {"price": 100, "source": "cache"})

        checks.section("Price 100 -> 120 with Msg.do_and_submit")
        gid = local_gid("price-")
        await update_price(dtm, server, catalog.barrier, gid, PRODUCT, 120)
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "succeed")
        checks.equal("price in the database", await catalog.price_in_db(PRODUCT), 120)
        checks.equal("cache entry after the message's action", await catalog.cached(PRODUCT),
                     None)
        checks.equal("the reader refills it", await read(http, server),
                     {"price": 120, "source": "database"})
        checks.equal("cache entry", await catalog.cached(PRODUCT), "120")

        checks.section("Price 120 -> 150, the writer dies after its local commit")
        gid = local_gid("price-")
        with contextlib.suppress(WriterDied):
            await update_price(dtm, server, catalog.barrier, gid, PRODUCT, 150,
                                crash="after-commit")
        checks.equal("price in the database", await catalog.price_in_db(PRODUCT), 150)
        checks.equal("right after the crash, status", await final_status(dtm, gid, timeout=0),
                     "prepared")
        checks.equal("right after the crash, the cache is stale", await catalog.cached(PRODUCT),
                     "120")
        checks.equal("status once the coordinator back-checked", await final_status(dtm, gid),
                     "succeed")
        checks.note(await describe(dtm, gid))
        checks.equal("back-check answers", [s for g, s in catalog.back_checks if g == gid],
                     [200])
        checks.equal("cache deletes for this message", catalog.invalidated.count(gid), 1)
        checks.equal("the reader sees the new price", await read(http, server),
                     {"price": 150, "source": "database"})

        checks.section("Price 150 -> 999, the writer dies inside its local transaction")
        gid = local_gid("price-")
        with contextlib.suppress(WriterDied):
            await update_price(dtm, server, catalog.barrier, gid, PRODUCT, 999,
                               crash="before-commit")
        checks.equal("status once the coordinator back-checked", await final_status(dtm, gid),
                     "failed")
        checks.note(await describe(dtm, gid))
        checks.equal("back-check answers", [s for g, s in catalog.back_checks if g == gid],
                     [409])
        checks.equal("barrier row (a late commit can no longer succeed)",
                     await catalog.barrier_reason(gid), "rollback")
        checks.equal("price in the database", await catalog.price_in_db(PRODUCT), 150)
        checks.equal("cache deletes for this message", catalog.invalidated.count(gid), 0)
        checks.equal("the reader", await read(http, server), {"price": 150, "source": "cache"})

        checks.section("Totals")
        db, cached = await catalog.price_in_db(PRODUCT), await catalog.cached(PRODUCT)
        checks.equal("database and cache agree", (db, cached), (150, "150"))


async def main() -> bool:
    return await run_example(NAME, scenario)


if __name__ == "__main__":
    cli(main)
