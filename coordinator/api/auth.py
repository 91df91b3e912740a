"""The operator token: `Authorization: Bearer <server.api_token>`.

One place decides whether a request carries the token, so the API routes, the metrics
endpoint, the admin page and the CLI all agree. The comparison is constant-time, and
an unset token means the server is open, as dtm is.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from coordinator.errors import Unauthorized


def bearer_of(request: web.Request) -> str:
    """The token of an `Authorization: Bearer …` header, or ''."""
    return bearer_value(request.headers.get("Authorization", ""))


def bearer_value(authorization: str) -> str:
    """The token of an `Authorization` value `Bearer …` (HTTP header or gRPC metadata)."""
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def token_matches(expected: str, presented: str) -> bool:
    """Constant-time: the time taken says nothing about how much of the token matched."""
    if not expected:
        return True
    return hmac.compare_digest(expected.encode(), presented.encode())


def require_token(request: web.Request, expected: str) -> None:
    """Raise `Unauthorized` unless the request carries the token (or none is set)."""
    if not token_matches(expected, bearer_of(request)):
        raise Unauthorized("this route needs Authorization: Bearer <server.api_token>")
