"""Typed errors, and the one place that maps store reply codes to them.

The HTTP layer turns these into dtm's envelope: `TransactionFailure` and
`StatusConflict` become 409 FAILURE, `TransactionOngoing` 425 ONGOING,
`BadRequest` 400, `Unauthorized` 401, `NotFound` 404 and
`StoreUnavailable` 503 with `Retry-After`. Nothing else should reach a client.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error the coordinator raises on purpose."""


class BadRequest(CoordinatorError):
    """The client sent something malformed; `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthorized(CoordinatorError):
    """The route needs `Authorization: Bearer <server.api_token>` and did not get it."""


class StoreUnavailable(CoordinatorError):
    """Redis cannot be reached right now; the client should retry (HTTP 503)."""


class DataMismatch(CoordinatorError):
    """The data in Redis was stored in a way this process cannot work with."""


class PartitionMismatch(DataMismatch):
    """redis.partitions differs from the count the stored transactions were keyed with."""


class LayoutTooNew(DataMismatch):
    """The data in Redis is in a key layout of a newer version than this one."""


class NotFound(CoordinatorError):
    """No transaction with that gid."""


class TransactionFailure(CoordinatorError):
    """The business said no, or the request cannot apply (dtm's ErrFailure, HTTP 409)."""


class TransactionOngoing(CoordinatorError):
    """The transaction has not finished yet (dtm's ErrOngoing, HTTP 425)."""


class StatusConflict(TransactionFailure):
    """A compare-and-set found another status than the one it expected."""

    def __init__(self, gid: str, found: str, wanted: str) -> None:
        super().__init__(f"transaction {gid} has status '{found}', cannot {wanted}")
        self.gid = gid
        self.found = found


class AlreadyExists(CoordinatorError):
    """A create found the gid taken; `status` is the existing transaction's."""

    def __init__(
        self, gid: str, status: str, fingerprint: str = "", trans_type: str = ""
    ) -> None:
        super().__init__(f"transaction {gid} already exists with status '{status}'")
        self.gid = gid
        self.status = status
        self.fingerprint = fingerprint  # of the stored content ("" if none was kept)
        self.trans_type = trans_type  # of the stored transaction ("" if not known)


class LeaseLost(CoordinatorError):
    """This worker no longer owns the transaction: another one took it over."""


def raise_for_reply(code: str, gid: str, detail: str, wanted: str) -> None:
    """Map a Lua script's short reply code to a typed exception.

    Every script answers ``OK`` or one of the codes below; keeping the mapping in one
    function means a new code cannot silently turn into a success.
    """
    if code == "OK":
        return
    if code == "NOT_FOUND":
        raise NotFound(f"no transaction with gid '{gid}'")
    if code == "CONFLICT":
        raise StatusConflict(gid, detail, wanted)
    if code == "EXISTS":
        raise AlreadyExists(gid, detail)
    if code == "DUPLICATE":
        raise TransactionFailure(
            f"branch {detail} of {gid} is already recorded; the first record is kept"
        )
    if code == "LEASE_LOST":
        raise LeaseLost(f"lease on {gid} is held by another worker")
    if code == "SKEW":
        raise StoreUnavailable(
            f"the clock of the Redis that holds {gid} moved against this host's while "
            "creating it; retry later"
        )
    raise CoordinatorError(f"unexpected store reply {code!r} for {gid}")
