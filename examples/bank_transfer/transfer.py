"""The body every bank branch receives, and the receiving bank's rule."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from coordinator.client import TransactionFailed

LIMIT = 400  # the receiving bank accepts at most this much per transfer


@dataclass(frozen=True)
class Transfer:
    account: str
    amount: int

    @classmethod
    async def of(cls, request: web.Request) -> Transfer:
        return cls.parse(await request.read())

    @classmethod
    def parse(cls, raw: bytes) -> Transfer:
        """A transfer from a branch's body, the JSON of `body()` (over HTTP or gRPC)."""
        body = orjson.loads(raw)
        account, amount = body.get("account"), body.get("amount")
        if not isinstance(account, str) or type(amount) is not int or amount <= 0:
            # A malformed body is a bug, not a business "no": answer 500, not FAILURE.
            raise ValueError(f"not a transfer: {body!r}")
        return cls(account, amount)

    def body(self) -> dict[str, Any]:
        return {"account": self.account, "amount": self.amount}


# A bank's work on one account in one local transaction: (connection, transfer, table).
Business = Callable[[Any, Transfer, str], Awaitable[None]]


def check_limit(transfer: Transfer) -> None:
    if transfer.amount > LIMIT:
        raise TransactionFailed(f"{transfer.amount} is over the limit of {LIMIT} per transfer")
