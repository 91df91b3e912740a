"""dtm's response envelope, and the middleware that maps errors onto it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from coordinator.errors import (
    BadRequest,
    NotFound,
    StoreUnavailable,
    TransactionFailure,
    TransactionOngoing,
    Unauthorized,
)

log = logging.getLogger("coordinator.api")

SUCCESS_BODY = b'{"dtm_result":"SUCCESS"}'


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json"
    )


def success() -> web.Response:
    return web.Response(body=SUCCESS_BODY, content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# An answer as the fast HTTP path writes it: status, JSON body, further headers.
Answer = tuple[int, bytes, tuple[tuple[str, str], ...]]


def error_answer(exc: Exception, what: str) -> Answer:
    """The answer to an exception raised while serving `what` ("POST /api/…").

    One mapping for the aiohttp middleware and the fast path (fast.py): no stack trace
    reaches a client, and a status conflict is a 409, never a 500. Anything that is not
    one of the API's own errors is logged with its traceback and answered 500. Call it
    from the `except` block that caught `exc`.
    """
    if isinstance(exc, BadRequest):
        body: dict[str, Any] = {"message": str(exc)}
        if exc.field:
            body["field"] = exc.field
        return 400, orjson.dumps(body), ()
    if isinstance(exc, Unauthorized):
        return 401, orjson.dumps({"message": str(exc)}), (("WWW-Authenticate", "Bearer"),)
    if isinstance(exc, NotFound):
        return 404, orjson.dumps({"message": str(exc)}), ()
    if isinstance(exc, StoreUnavailable):
        return 503, orjson.dumps({"message": str(exc)}), (("Retry-After", "1"),)
    if isinstance(exc, TransactionFailure):
        return 409, orjson.dumps({"dtm_result": "FAILURE", "message": str(exc)}), ()
    if isinstance(exc, TransactionOngoing):
        return 425, orjson.dumps({"dtm_result": "ONGOING", "message": str(exc)}), ()
    log.exception("%s failed", what)
    return 500, b'{"message":"internal error; see the coordinator\'s log"}', ()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Maps errors onto dtm's envelope (see error_answer) and aiohttp's own onto JSON."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_response({"message": f"request body too large: {exc.text}"}, 413)
    except web.HTTPException as exc:
        if exc.status >= 400:
            response = json_response({"message": exc.reason}, exc.status)
            if "Allow" in exc.headers:  # 405 must say which methods the route has
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except Exception as exc:
        status, body, headers = error_answer(exc, f"{request.method} {request.path}")
        return web.Response(body=body, status=status, content_type="application/json",
                            headers=dict(headers))
