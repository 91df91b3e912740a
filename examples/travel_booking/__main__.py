"""Driver: three trips. One is booked, one fails because no car is left, one is given up
by the travel agent after the flight and hotel were held.

    python -m examples.travel_booking
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from coordinator.client import DtmClient, TransactionFailed, TransOptions, local_gid, tcc_global
from examples.common import Checks, Server, cli, describe, final_status, pg_pool, run_example
from examples.travel_booking.booking import BookingService

NAME = "travel_booking"
# kind → (resource, units): one car only, so the second trip finds none.
INVENTORY = {"flight": ("LH-400", 10), "hotel": ("Adlon", 5), "car": ("compact", 1)}


class CardDeclined(Exception):
    """The travel agent's own step between the tries fails."""


class Trip:
    def __init__(self, services: dict[str, tuple[BookingService, Server]]) -> None:
        self.services = services

    async def book(
        self, dtm: DtmClient, gid: str, *, decline_card: bool = False,
        on_held: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Hold flight, hotel and car, then confirm them all. With ``decline_card`` the
        payment check between the hotel and the car fails, which cancels the holds made
        so far; ``on_held`` runs once everything is held, before the confirms."""
        async with tcc_global(dtm, gid, TransOptions(wait_result=True)) as tcc:
            for kind, (_, server) in self.services.items():
                if kind == "car" and decline_card:
                    raise CardDeclined("card declined")
                await tcc.call_branch({"resource": INVENTORY[kind][0]}, server.url("try"),
                                      server.url("confirm"), server.url("cancel"))
            if on_held is not None:
                await on_held()

    async def bookings(self, gid: str) -> dict[str, str]:
        """kind → status of this trip's booking, for the services that have one"""
        found = {}
        for kind, (service, _) in self.services.items():
            status = (await service.bookings()).get(gid)
            if status:
                found[kind] = status
        return found

    async def free(self) -> dict[str, int]:
        return {kind: await service.free() for kind, (service, _) in self.services.items()}

    def journals(self, gid: str) -> dict[str, list[str]]:
        return {kind: service.journal.of(gid) for kind, (service, _) in self.services.items()}


async def scenario(dtm: DtmClient, checks: Checks) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(pg_pool())
        services = {}
        for kind, (resource, units) in INVENTORY.items():
            service = BookingService(kind, pool)
            await service.reset(resource, units)
            services[kind] = (service, await stack.enter_async_context(Server(service.app())))
        trip = Trip(services)
        print(", ".join(f"{kind} {server.url()}" for kind, (_, server) in services.items()))

        checks.section("trip-1: flight, hotel and car are free")
        gid = local_gid("trip-1-")

        async def all_held() -> None:
            checks.equal("after the tries, bookings", await trip.bookings(gid),
                         {"flight": "held", "hotel": "held", "car": "held"})

        await trip.book(dtm, gid, on_held=all_held)
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "succeed")
        checks.equal("bookings", await trip.bookings(gid),
                     {"flight": "confirmed", "hotel": "confirmed", "car": "confirmed"})
        checks.equal("free", await trip.free(), {"flight": 9, "hotel": 4, "car": 0})

        checks.section("trip-2: no car left")
        gid = local_gid("trip-2-")
        reason = ""
        try:
            await trip.book(dtm, gid)
        except TransactionFailed as exc:
            reason = str(exc)
        checks.note(await describe(dtm, gid))
        checks.check("the car try raised TransactionFailed", "no car available" in reason,
                     reason)
        checks.equal("status", await final_status(dtm, gid), "failed")
        checks.equal("the services saw", trip.journals(gid), {
            "flight": ["try: applied", "cancel: applied"],
            "hotel": ["try: applied", "cancel: applied"],
            "car": ["try: refused", "cancel: null_compensation"]})
        checks.equal("bookings left", await trip.bookings(gid), {})
        checks.equal("free", await trip.free(), {"flight": 9, "hotel": 4, "car": 0})

        checks.section("trip-3: the card is declined after flight and hotel are held")
        gid = local_gid("trip-3-")
        with contextlib.suppress(CardDeclined):
            await trip.book(dtm, gid, decline_card=True)
        checks.note(await describe(dtm, gid))
        checks.equal("status", await final_status(dtm, gid), "failed")
        checks.equal("the services saw", trip.journals(gid), {
            "flight": ["try: applied", "cancel: applied"],
            "hotel": ["try: applied", "cancel: applied"], "car": []})
        checks.equal("bookings left", await trip.bookings(gid), {})
        checks.equal("free", await trip.free(), {"flight": 9, "hotel": 4, "car": 0})

        checks.section("Totals")
        for kind, (service, _) in services.items():
            statuses = sorted((await service.bookings()).values())
            free = await service.free()
            checks.check(f"{kind}: one confirmed booking, no hold, "
                         f"{free} free + 1 booked = {INVENTORY[kind][1]}",
                         statuses == ["confirmed"] and free + 1 == INVENTORY[kind][1],
                         f"bookings {statuses}, free {free}")


async def main() -> bool:
    return await run_example(NAME, scenario)


if __name__ == "__main__":
    cli(main)
