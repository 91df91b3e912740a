"""The HTTP layer: one aiohttp session, dtm's envelope, and branch answers as types.

A `DtmClient` either owns its `ClientSession` (created on first use, closed by
`close()` / `async with`) or borrows one the application already has, so a service
keeps one connection pool for everything it calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from coordinator.client.errors import (
    BranchCallError,
    CoordinatorUnavailable,
    RequestRejected,
    TransactionFailed,
    TransactionOngoing,
)

_UNAVAILABLE = frozenset({502, 503, 504})
_MAX_MESSAGE = 500


def _message(text: str) -> str:
    """The human part of an error body: its "message" (or dtm's "error"), else the text."""
    try:
        data = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        for key in ("message", "error"):
            if isinstance(data.get(key), str) and data[key]:
                return str(data[key])
    return text[:_MAX_MESSAGE]


def parse_envelope(status: int, text: str) -> dict[str, Any]:
    """A coordinator reply as a dict, or the typed exception it stands for.

    Status codes decide; a 200 body is read as JSON and only its ``dtm_result`` field is
    looked at (old dtm versions answered 200 with FAILURE), never the whole text, so a
    query result that merely mentions FAILURE in a rollback reason is still a success.
    """
    if status == 409:
        raise TransactionFailed(_message(text))
    if status == 425:
        raise TransactionOngoing(_message(text))
    if status in _UNAVAILABLE:
        raise CoordinatorUnavailable(f"HTTP {status}: {_message(text)}")
    if status != 200:
        raise RequestRejected(status, _message(text))
    try:
        data = orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        raise RequestRejected(status, f"reply is not JSON: {text[:_MAX_MESSAGE]}") from None
    if not isinstance(data, dict):
        raise RequestRejected(status, f"reply is not a JSON object: {text[:_MAX_MESSAGE]}")
    result = data.get("dtm_result")
    if result == "FAILURE":
        raise TransactionFailed(_message(text))
    if result == "ONGOING":
        raise TransactionOngoing(_message(text))
    return data


@dataclass(frozen=True)
class BranchReply:
    """A successful branch answer (TCC try, XA action)."""

    status: int
    text: str

    def json(self) -> Any:
        return orjson.loads(self.text) if self.text else None


def classify_branch(url: str, status: int, text: str) -> BranchReply:
    """Read a branch's answer the way the coordinator does (DESIGN §4): 425 or ONGOING
    → ongoing, 409 or FAILURE → failure, 200 → success, anything else → error."""
    if status == 425 or "ONGOING" in text:
        raise TransactionOngoing(_message(text))
    if status == 409 or "FAILURE" in text:
        raise TransactionFailed(_message(text))
    if status != 200:
        raise BranchCallError(url, f"HTTP {status}: {_message(text)}", status)
    return BranchReply(status, text)


class DtmClient:
    """Talks to one coordinator (dtm or ours) at ``url``, e.g.
    ``http://127.0.0.1:36789/api/dtmsvr``.

    ``timeout`` bounds every call to the coordinator; keep it above the server's
    wait_result limit (30 s by default) when submitting with ``wait_result``.
    """

    def __init__(
        self, url: str, *, session: aiohttp.ClientSession | None = None, timeout: float = 35.0
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = session
        self._owned = session is None

    async def __aenter__(self) -> DtmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it; a borrowed one stays open."""
        if self._owned and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self, method: str, op: str, *, body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        url = f"{self.url}/{op}"
        try:
            async with self.session.request(
                method,
                url,
                data=orjson.dumps(body) if body is not None else None,
                params=params,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CoordinatorUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        return parse_envelope(resp.status, text)

    async def post(self, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST a JSON body to ``<url>/<op>`` (prepare, submit, abort, registerBranch…)."""
        return await self._request("POST", op, body=body)

    async def get(self, op: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self._request("GET", op, params=params)

    async def query(self, gid: str) -> dict[str, Any]:
        """``{"transaction": {...} | None, "branches": [...]}`` for one gid."""
        return await self.get("query", {"gid": gid})

    async def call_branch(
        self, url: str, *, body: str, params: Mapping[str, str],
        headers: Mapping[str, str] | None = None, timeout: float | None = None,
    ) -> BranchReply:
        """POST to a participant's branch URL the way the coordinator would."""
        try:
            async with self.session.post(
                url,
                data=body.encode(),
                params=params,
                headers={"Content-Type": "application/json", **(headers or {})},
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BranchCallError(url, f"{type(exc).__name__}: {exc}") from exc
        return classify_branch(url, resp.status, text)


@contextlib.asynccontextmanager
async def borrow(dtm: str | DtmClient) -> AsyncIterator[DtmClient]:
    """Use a DtmClient as given, or a short-lived one for a bare URL."""
    if isinstance(dtm, DtmClient):
        yield dtm
        return
    async with DtmClient(dtm) as client:
        yield client
