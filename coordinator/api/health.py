"""GET /api/health: whether each Redis node the coordinator uses answers right now.

200 when every primary answers, 503 otherwise; the body lists every node with its role,
so an operator sees which one is down during a failover.
"""

from __future__ import annotations

from aiohttp import web

from coordinator.api.envelope import json_response
from coordinator.api.routes import STORE


async def handle_health(request: web.Request) -> web.Response:
    report = await request.app[STORE].health()
    return json_response(report, status=200 if report["ok"] else 503)
