"""A flash-sale service: many buyers, little stock, exactly one order per unit sold.

POST /buy?user=U      buy one unit. One Lua script checks and deducts the stock and
                      creates a two-phase message as submitted, atomically; answers
                      200 {"result":"ok","gid":...} or 409 {"dtm_result":"FAILURE",
                      "result":"sold out"}. Once a buy found the stock gone, the
                      process reads the stock first (a small script) and makes no
                      purchase while it is 0: every answer still comes from Redis at
                      that moment, and stock put back sells again.
POST /order           the message's action, called by the coordinator: creates the
                      order behind a barrier, so a repeated delivery creates nothing.
GET  /state           stock left, orders created, and which process answered (pid).

The HTTP front is examples/http1.py rather than aiohttp: the buyer path's real work is
one Redis call, and aiohttp's own per-request cost would dominate it.

The stock, the barrier records, the orders and the purchase transactions all live in one
Redis hash slot (the coordinator partition named in the gids, ``{N}``), which is what
lets one script change them together.

Run: python -m examples.flash_sale.service --port 8081 --redis-url redis://127.0.0.1:6379/0
     --coordinator-prefix coord --partitions 16 --stock 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import uuid

import orjson

from coordinator.keys import KeySpace, tag
from coordinator.machines.msg import branches_for
from coordinator.model import Options, Status, Trans, evolve
from coordinator.store.batch import READ, ScriptBatcher
from coordinator.store.redis_store import RedisStore
from coordinator.store.scripts import batch_script_text, script_text
from examples.http1 import Handler, Reply, Request, serve

BARRIER_TTL_S = 7 * 86_400


class Sale:
    """One item on sale, in coordinator partition `partition`."""

    def __init__(self, store: RedisStore, partition: int, item: str, order_url: str) -> None:
        self.store = store
        self.partition = partition
        self.item = item
        self.order_url = order_url
        t = tag(partition)
        self.stock_key = f"flash:stock:{t}:{item}"
        self.orders_key = f"flash:orders:{t}:{item}"
        self.barrier_prefix = f"flash:barrier:{t}:"
        # Every purchase is this message with its own gid and payload: copying it costs
        # a fraction of building one (a buyer answered "sold out" builds one too).
        self.purchase = Trans(
            gid="", trans_type="msg", status=Status.SUBMITTED,
            steps=({"action": order_url},), payloads=("",),
            branches=branches_for([{"action": order_url}], {}),
            options=Options(retry_interval=1),
        )
        client = store.client
        self.buy_script = client.register_script(script_text("flash_buy"))
        self.order_script = client.register_script(script_text("flash_order"))
        self.stock_script = client.register_script(script_text("flash_stock"))
        # Concurrent buyers' scripts share round trips, as the coordinator's writes do,
        # and, all being in the sale's slot, one EVALSHA of the batch script per round.
        self.batch_script = client.register_script(
            batch_script_text(("flash_buy", "flash_order", "flash_stock")))
        self.batch = ScriptBatcher(
            client, batch_script=self.batch_script,
            batch_index={self.buy_script.sha: 1, self.order_script.sha: 2,
                         self.stock_script.sha: 3},
        )
        # Set when a buy found no stock, cleared when one succeeds: while it is set a
        # buyer costs one read of the stock instead of a purchase's script.
        self.sold_out = False

    async def start(self, stock: int | None) -> None:
        for script in (self.buy_script, self.order_script, self.stock_script,
                       self.batch_script):
            await self.store.client.script_load(script.script)
        if stock is not None:
            await self.store.client.set(self.stock_key, stock)

    async def buy(self, user: str) -> tuple[bool, str]:
        if self.sold_out:
            left = await self.batch.call(self.stock_script, [self.stock_key], [], writes=READ)
            if int(left) < 1:
                return False, ""
        gid = f"{{{self.partition}}}{uuid.uuid4().hex}"
        payload = orjson.dumps({"user": user, "item": self.item}).decode()
        trans = evolve(self.purchase, gid=gid, payloads=(payload,))
        keys_after = [self.stock_key, f"{self.barrier_prefix}{gid}-00-msg-01"]
        reply = await self.store.create_by(
            trans,
            lambda keys, args: self.batch.call(
                self.buy_script, [*keys, *keys_after], [*args, 1, BARRIER_TTL_S]),
            due_in_ms=0,
        )
        self.sold_out = reply[0] == "SOLD_OUT"
        return reply[0] == "OK", gid

    async def create_order(self, gid: str, branch_id: str, order: str) -> str:
        barrier = f"{self.barrier_prefix}{gid}-{branch_id}-action-01"
        return str(await self.batch.call(self.order_script, [self.orders_key, barrier],
                                         [gid, order, BARRIER_TTL_S]))

    async def state(self) -> dict[str, int]:
        stock = await self.store.client.get(self.stock_key)
        orders = await self.store.client.hlen(self.orders_key)
        # pid: with --reuse-port several processes share the port; a caller can tell
        # that every one of them is listening before it opens long-lived connections.
        return {"stock": int(stock or 0), "orders": int(orders), "pid": os.getpid()}


def routes(sale: Sale) -> dict[tuple[str, str], Handler]:
    async def buy(request: Request) -> Reply:
        ok, gid = await sale.buy(request.query.get("user", "anonymous"))
        if ok:
            return 200, orjson.dumps({"result": "ok", "gid": gid})
        return 409, b'{"dtm_result":"FAILURE","result":"sold out"}'

    async def order(request: Request) -> Reply:
        q = request.query
        if "gid" not in q or "branch_id" not in q:
            return 400, b'{"message":"gid and branch_id are required"}'
        await sale.create_order(q["gid"], q["branch_id"], request.body.decode())
        return 200, b'{"dtm_result":"SUCCESS"}'

    async def state(request: Request) -> Reply:
        return 200, orjson.dumps(await sale.state())

    return {("POST", "/buy"): buy, ("POST", "/order"): order, ("GET", "/state"): state}


async def run(args: argparse.Namespace) -> None:
    keys = KeySpace(args.coordinator_prefix, args.partitions)
    store = RedisStore.from_url(args.redis_url, keys)
    sale = Sale(store, args.partition, args.item, f"http://127.0.0.1:{args.port}/order")
    await sale.start(args.stock)
    server = asyncio.ensure_future(
        serve(routes(sale), "127.0.0.1", args.port, reuse_port=args.reuse_port)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--coordinator-prefix", default="coord")
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--partition", type=int, default=0, help="coordinator partition of the sale")
    p.add_argument("--item", default="item-1")
    p.add_argument("--stock", type=int, help="set the stock at start")
    p.add_argument("--reuse-port", action="store_true", help="share the port with siblings")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
