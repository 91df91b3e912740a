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


def failure(message: str) -> web.Response:
    return json_response({"dtm_result": "FAILURE", "message": message}, 409)


def ongoing(message: str) -> web.Response:
    return json_response({"dtm_result": "ONGOING", "message": message}, 425)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No stack trace reaches a client, and a status conflict is a 409, never a 500."""
    try:
        return await handler(request)
    except BadRequest as exc:
        body: dict[str, Any] = {"message": str(exc)}
        if exc.field:
            body["field"] = exc.field
        return json_response(body, 400)
    except Unauthorized as exc:
        return web.Response(
            body=orjson.dumps({"message": str(exc)}), status=401,
            content_type="application/json", headers={"WWW-Authenticate": "Bearer"},
        )
    except NotFound as exc:
        return json_response({"message": str(exc)}, 404)
    except StoreUnavailable as exc:
        return web.Response(
            body=orjson.dumps({"message": str(exc)}), status=503,
            content_type="application/json", headers={"Retry-After": "1"},
        )
    except TransactionFailure as exc:
        return failure(str(exc))
    except TransactionOngoing as exc:
        return ongoing(str(exc))
    except web.HTTPRequestEntityTooLarge as exc:
        return json_response({"message": f"request body too large: {exc.text}"}, 413)
    except web.HTTPException as exc:
        if exc.status >= 400:
            response = json_response({"message": exc.reason}, exc.status)
            if "Allow" in exc.headers:  # 405 must say which methods the route has
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_response({"message": "internal error; see the coordinator's log"}, 500)
