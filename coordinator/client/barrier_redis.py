"""The barrier for data kept in Redis: one Lua script (lua/barrier.lua) checks the barrier
keys and changes an integer amount atomically, refusing to go below zero.

    stock = RedisBarrier(redis_client)
    async def deduct(request):                  # saga action
        await stock.adjust_amount(BranchBarrier.from_query(request.query), "stock:42", -1)
    async def restore(request):                 # its compensation
        await stock.adjust_amount(BranchBarrier.from_query(request.query), "stock:42", 1)

Keys are ``<key_prefix><gid>-<branch_id>-<op>-<barrier_id>`` (dtm's layout when the
prefix is empty). On Redis Cluster every key of one script must share a slot: put a hash
tag in ``key_prefix`` and the business key (``{stock}:``, ``{stock}:42``), or give gids a
tag (``{3}order-42``) shared with the business key.
"""

from __future__ import annotations

from redis.asyncio import Redis

from coordinator.client.barrier import (
    MSG_BARRIER,
    MSG_BRANCH,
    MSG_OP,
    ROLLBACK_REASON,
    BarrierResult,
    BranchBarrier,
)
from coordinator.client.errors import DtmError, DuplicatedRequest, TransactionFailed
from coordinator.store.scripts import script_text

DEFAULT_EXPIRE = 7 * 86_400  # dtm's default barrier expiry: a week


def result_of(code: str, barrier: BranchBarrier) -> BarrierResult:
    """Map the script's reply code to a result or a typed exception (one place, so a new
    code cannot silently pass as success)."""
    if code == "APPLIED":
        return BarrierResult.APPLIED
    if code == "NULL_COMPENSATION":
        return BarrierResult.NULL_COMPENSATION
    if code == "DUPLICATE":
        if barrier.op == MSG_OP:
            raise DuplicatedRequest(f"the msg barrier key of {barrier.gid} exists")
        return BarrierResult.DUPLICATE
    if code == "FAILURE":
        raise TransactionFailed("the amount is missing or would go below zero")
    if code == "BAD_VALUE":
        raise DtmError("the business key does not hold an integer")
    raise DtmError(f"unexpected barrier script reply {code!r}")


class RedisBarrier:
    def __init__(
        self, redis: Redis, *, key_prefix: str = "", expire_seconds: int = DEFAULT_EXPIRE
    ) -> None:
        if expire_seconds < 1:
            raise ValueError("expire_seconds must be >= 1")
        self.redis = redis
        self.key_prefix = key_prefix
        self.expire_seconds = expire_seconds
        # Registered once; each call is an EVALSHA that reloads the script on NOSCRIPT.
        self._script = redis.register_script(script_text("barrier"))

    def key(self, gid: str, branch_id: str, op: str, barrier_id: str) -> str:
        return f"{self.key_prefix}{gid}-{branch_id}-{op}-{barrier_id}"

    async def adjust_amount(self, barrier: BranchBarrier, key: str, amount: int) -> BarrierResult:
        """Add ``amount`` (negative deducts) to the integer at ``key`` behind the barrier.

        Raises TransactionFailed if the key is missing or the result would be negative
        (nothing is written, so the compensation that follows is a null compensation).
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError("amount must be an int")
        barrier_id = barrier.next_barrier_id()
        current = self.key(barrier.gid, barrier.branch_id, barrier.op, barrier_id)
        origin = current
        if barrier.origin_op:
            origin = self.key(barrier.gid, barrier.branch_id, barrier.origin_op, barrier_id)
        reply = await self._script(
            keys=[key, current, origin],
            args=[amount, barrier.origin_op, self.expire_seconds, barrier.op],
        )
        code = reply.decode() if isinstance(reply, bytes) else str(reply)
        return result_of(code, barrier)

    async def query_prepared(self, gid: str) -> None:
        """The msg back-check: returns if the local step committed, else records a
        rollback (so it never will) and raises TransactionFailed.

        Barrier keys are written once and never changed, so SET NX followed by GET is
        as good as a script: whoever wrote the key first decided its value.
        """
        key = self.key(gid, MSG_BRANCH, MSG_OP, MSG_BARRIER)
        await self.redis.set(key, ROLLBACK_REASON, nx=True, ex=self.expire_seconds)
        value = await self.redis.get(key)
        reason = value.decode() if isinstance(value, bytes) else value
        if reason is None:
            raise DtmError(f"the msg barrier key of {gid} expired at once")
        if reason == ROLLBACK_REASON:
            raise TransactionFailed(f"the local step of msg {gid} did not happen")
