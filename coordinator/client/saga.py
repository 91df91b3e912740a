"""SAGA: a list of steps, each an action and its compensation.

    saga = Saga(dtm, gid, TransOptions(wait_result=True))
    saga.add(f"{out}/TransOut", f"{out}/TransOutRevert", {"amount": 30})
    saga.add(f"{inn}/TransIn", f"{inn}/TransInRevert", {"amount": 30})
    await saga.submit()          # raises TransactionFailed(reason) if it rolled back

Concurrent sagas run every step whose prerequisites succeeded in parallel:
``saga.add_order(2, [0, 1])`` makes step 2 wait for steps 0 and 1 (0-based, as dtm).
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from coordinator.client.base import TransBase, encode_payload
from coordinator.client.http import DtmClient
from coordinator.client.options import TransOptions


class Saga(TransBase):
    trans_type = "saga"

    def __init__(
        self, dtm: str | DtmClient, gid: str, options: TransOptions | None = None, *,
        concurrent: bool = False,
    ) -> None:
        super().__init__(dtm, gid, options)
        self.concurrent = concurrent
        self.orders: dict[int, list[int]] = {}

    def add(self, action: str, compensate: str, payload: object = None) -> Saga:
        """Append a step; an empty URL is a step that succeeds without a call."""
        self.steps.append({"action": action, "compensate": compensate})
        self.payloads.append(encode_payload(payload))
        return self

    def set_concurrent(self) -> Saga:
        self.concurrent = True
        return self

    def add_order(self, step: int, prerequisites: Iterable[int]) -> Saga:
        """Step ``step`` starts only after every step in ``prerequisites`` succeeded.

        Orders only mean something in a concurrent saga, so this makes it concurrent.
        """
        self.orders[step] = sorted(set(prerequisites))
        self.concurrent = True
        return self

    def _check_orders(self) -> None:
        n = len(self.steps)
        for step, pres in self.orders.items():
            if not 0 <= step < n or any(not 0 <= p < n or p == step for p in pres):
                raise ValueError(f"order {step} <- {pres} names a step outside 0..{n - 1}")

    async def submit(self) -> None:
        """Hand the saga to the coordinator (and, with wait_result, wait for its end)."""
        if not self.steps:
            raise ValueError("a saga needs at least one step")
        self._check_orders()
        if self.concurrent:
            orders = {str(k): v for k, v in sorted(self.orders.items())}
            self.custom_data = orjson.dumps({"concurrent": True, "orders": orders}).decode()
        await self._call("submit")
