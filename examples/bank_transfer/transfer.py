"""The body every bank branch receives, and the receiving bank's rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from coordinator.client import TransactionFailed

LIMIT = 400  # the receiving bank accepts at most this much per transfer


@dataclass(frozen=True)
class Transfer:
    account: str
    amount: int

    @classmethod
    async def of(cls, request: web.Request) -> Transfer:
        body = await request.json()
        account, amount = body.get("account"), body.get("amount")
        if not isinstance(account, str) or type(amount) is not int or amount <= 0:
            # A malformed body is a bug, not a business "no": answer 500, not FAILURE.
            raise ValueError(f"not a transfer: {body!r}")
        return cls(account, amount)

    def body(self) -> dict[str, Any]:
        return {"account": self.account, "amount": self.amount}


def check_limit(transfer: Transfer) -> None:
    if transfer.amount > LIMIT:
        raise TransactionFailed(f"{transfer.amount} is over the limit of {LIMIT} per transfer")
