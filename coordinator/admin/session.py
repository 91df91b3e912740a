"""Who may use the admin page, and forms that another site cannot submit.

With `server.api_token` set, a person logs in once with the token and gets a session
cookie; scripts send `Authorization: Bearer <token>` instead. The cookie holds an HMAC
of the token, never the token itself: HttpOnly (no script reads it), SameSite=Strict
(no other site's page sends it), scoped to /admin.

Forms carry a CSRF token that must equal the value of a second SameSite=Strict cookie
(double submit), and a POST whose Origin names another host is refused, so a page
elsewhere cannot make a logged-in browser force-stop a transaction. Requests
authenticated by the Bearer header need neither: a browser never adds that header on
its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web

from coordinator.api.auth import bearer_of, token_matches

SESSION_COOKIE = "coordinator_admin"
CSRF_COOKIE = "coordinator_csrf"
COOKIE_PATH = "/admin"


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"coordinator-admin-session", hashlib.sha256).hexdigest()


def by_bearer(request: web.Request, token: str) -> bool:
    return bool(token) and token_matches(token, bearer_of(request))


def is_authenticated(request: web.Request, token: str) -> bool:
    if not token or by_bearer(request, token):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie, session_value(token))


def set_session(response: web.StreamResponse, token: str) -> None:
    response.set_cookie(SESSION_COOKIE, session_value(token), path=COOKIE_PATH,
                        httponly=True, samesite="Strict")


def clear_session(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def csrf_token(request: web.Request) -> str:
    """This browser's CSRF token (a new one when it has none yet)."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_hex(16)


def remember_csrf(response: web.StreamResponse, value: str) -> None:
    response.set_cookie(CSRF_COOKIE, value, path=COOKIE_PATH, httponly=True,
                        samesite="Strict")


def csrf_ok(request: web.Request, form_value: str, token: str) -> bool:
    if by_bearer(request, token):
        return True
    origin = request.headers.get("Origin", "")
    if origin and origin != "null" and origin.split("://", 1)[-1] != request.host:
        return False
    cookie = request.cookies.get(CSRF_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie, form_value)
