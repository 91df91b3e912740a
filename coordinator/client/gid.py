"""Global transaction ids: from the coordinator, or made locally."""

from __future__ import annotations

import secrets
import string

from coordinator.client.http import DtmClient, borrow

_ALPHABET = string.ascii_letters + string.digits


async def new_gid(dtm: str | DtmClient) -> str:
    """A gid from the coordinator's ``newGid`` (works against dtm as well)."""
    async with borrow(dtm) as client:
        reply = await client.get("newGid")
    gid = reply.get("gid")
    if not isinstance(gid, str) or not gid:
        raise ValueError(f"newGid answered without a gid: {reply!r}")
    return gid


def local_gid(prefix: str = "") -> str:
    """22 random base62 characters (about 131 bits), no round trip to the coordinator.

    ``prefix`` may carry a partition tag such as ``{3}`` to co-locate the transaction
    with a participant's data in the same Redis Cluster slot.
    """
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(22))
