"""The SDK's exceptions: what a coordinator or a branch answered, as types.

dtm's protocol has three answers besides success: FAILURE (HTTP 409, the business said
no; final), ONGOING (HTTP 425, not decided yet; ask again later) and everything else
(an error; retry). Mapping them to types once lets callers write ``except
TransactionFailed`` instead of scanning response bodies, and lets a participant raise
the same types to produce the right answer (see ``participant.py``).
"""

from __future__ import annotations


class DtmError(Exception):
    """Base class of every error the SDK raises on purpose."""


class TransactionFailed(DtmError):
    """A final "no": the business refused, or the transaction failed (409 / FAILURE).

    Raised by a branch handler it rolls back the handler's local transaction and makes
    the coordinator treat the branch as failed (a saga then compensates).
    """


class TransactionOngoing(DtmError):
    """Not decided yet (425 / ONGOING): the coordinator asks again later."""


class DuplicatedRequest(DtmError):
    """The msg barrier found its row already written (dtm's ErrDuplicated).

    Either the back-check already recorded a rollback for this gid, or the local
    transaction of this message already committed once. Either way the business must not
    run again, and only the back-check may decide the message.
    """


class CoordinatorUnavailable(DtmError):
    """The coordinator could not be reached, timed out, or answered 502/503/504.

    Whether the request took effect is unknown: prepare/submit/abort are idempotent, so
    retrying with the same gid is safe.
    """


class RequestRejected(DtmError):
    """The coordinator answered another non-200 status (400 bad request, 404, 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class BranchCallError(DtmError):
    """A branch the SDK called itself (TCC try, XA action) gave no usable answer:
    transport error, timeout, or a non-200 status other than 409/425."""

    def __init__(self, url: str, message: str, status: int = 0) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.status = status
