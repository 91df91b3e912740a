"""The flash sale keeps its books when the coordinator and the service are killed.

Buyers deduct stock and create purchase messages in one script; the coordinator then
delivers each message to the order endpoint. The coordinator is SIGKILLed while
buyers are buying and orders are being delivered, the service is SIGKILLed while the
coordinator delivers, and both come back. Afterwards every unit sold has exactly one
order, and nothing is left unfinished.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from coordinator.keys import FINISHED_BAND, KeySpace, tag
from tests.support import ROOT, CoordinatorProcess, free_port, wait_for

PARTITION = 3
STOCK = 150
BUYERS = 260


class FlashService:
    def __init__(self, redis_url: str, prefix: str, item: str) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "examples.flash_sale.service", "--port",
                     str(self.port), "--redis-url", redis_url, "--coordinator-prefix", prefix,
                     "--partition", str(PARTITION), "--item", item]
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, stock: int | None = None) -> None:
        extra = ["--stock", str(stock)] if stock is not None else []
        self.proc = subprocess.Popen([*self.args, *extra], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{self.port}/state"
                ) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up, 15, 0.05, "the flash-sale service")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    await c.aclose()


async def test_orders_equal_units_sold_across_kills(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    item = "crash-" + uuid.uuid4().hex[:8]
    t = tag(PARTITION)
    stock_key, orders_key = f"flash:stock:{t}:{item}", f"flash:orders:{t}:{item}"
    coordinator = await CoordinatorProcess(
        redis_url, prefix, COORDINATOR_ENGINE_LEASE_SECONDS=5).start()
    service = FlashService(redis_url, prefix, item)
    await service.start(stock=STOCK)
    bought: list[str] = []
    sold_out = 0
    try:
        async with aiohttp.ClientSession() as http:
            semaphore = asyncio.Semaphore(16)

            async def buy(n: int) -> None:
                nonlocal sold_out
                async with semaphore, http.post(
                    f"http://127.0.0.1:{service.port}/buy", params={"user": f"u{n}"}
                ) as r:
                    body = await r.json(content_type=None)
                    if r.status == 200:
                        bought.append(body["gid"])
                    else:
                        assert (r.status, body["result"]) == (409, "sold out")
                        sold_out += 1

            first = [asyncio.create_task(buy(n)) for n in range(BUYERS // 2)]
            await wait_for(lambda: len(bought) >= 40, 15, 0.01, "the first purchases")
            coordinator.kill()  # SIGKILL while buyers buy and orders are delivered
            await asyncio.gather(*first)
            await asyncio.gather(*(buy(n) for n in range(BUYERS // 2, BUYERS)))
        assert len(bought) == STOCK
        assert sold_out == BUYERS - STOCK
        delivered_before = int(await client.hlen(orders_key))
        assert delivered_before < STOCK  # the kill left messages undelivered

        # The coordinator returns, but the order endpoint is down for a while: deliveries
        # fail and are retried.
        service.kill()
        coordinator = await CoordinatorProcess(
            redis_url, prefix, COORDINATOR_ENGINE_LEASE_SECONDS=5).start()
        await asyncio.sleep(1.5)
        await service.start()

        due = KeySpace(prefix, 16).due(PARTITION)

        async def settled() -> bool:
            unfinished = await client.zcount(due, "-inf", f"({FINISHED_BAND}")
            return unfinished == 0 and await client.hlen(orders_key) == STOCK

        await wait_for(settled, 45, 0.2, "every purchase delivered")
        orders = await client.hgetall(orders_key)
        assert sorted(orders) == sorted(bought)  # exactly one order per unit sold
        assert int(await client.get(stock_key) or 0) == 0
    finally:
        service.kill()
        coordinator.kill()
        await _drop_sale(client, item, bought)


async def test_a_sold_out_sale_sells_again_when_stock_comes_back(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """After a sell-out a buyer costs a read of the stock rather than a purchase, yet
    every answer is the stock's at that moment: stock put back sells again, exactly."""
    item = "restock-" + uuid.uuid4().hex[:8]
    stock_key = f"flash:stock:{tag(PARTITION)}:{item}"
    service = FlashService(redis_url, prefix, item)
    await service.start(stock=2)
    answers: list[int] = []
    bought: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def buy() -> None:
                async with http.post(f"http://127.0.0.1:{service.port}/buy",
                                     params={"user": "u"}) as r:
                    body = await r.json(content_type=None)
                    answers.append(r.status)
                    if r.status == 200:
                        bought.append(body["gid"])

            for _ in range(4):
                await buy()
            assert answers == [200, 200, 409, 409]
            await client.set(stock_key, 1)  # one unit back
            await buy()
            await buy()
            assert answers[4:] == [200, 409]
        assert int(await client.get(stock_key) or 0) == 0
        # Three purchases made, each its own message for the coordinator.
        keys = KeySpace(prefix, 16)
        for gid in bought:
            assert await client.hget(keys.for_gid(gid).trans, "status") == "submitted"
        assert len(set(bought)) == 3
    finally:
        service.kill()
        await _drop_sale(client, item, bought)


async def _drop_sale(client: aioredis.Redis, item: str, bought: list[str]) -> None:
    """The sale's keys outside the coordinator's prefix: stock, orders, barriers."""
    t = tag(PARTITION)
    await client.delete(f"flash:stock:{t}:{item}", f"flash:orders:{t}:{item}")
    barrier_keys = [k async for k in client.scan_iter(f"flash:barrier:{t}:*", count=1000)
                    if any(g in k for g in bought)]
    if barrier_keys:
        await client.delete(*barrier_keys)
