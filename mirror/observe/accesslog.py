"""One access-log line per request, and request metrics, from one middleware.

Fields: method, path, status, bytes, duration, cache outcome, request id and
client address (`X-Forwarded-For` only from trusted proxies). Query strings
are logged without values that could be credentials, and neither
`Authorization` nor tokens ever reach a log line.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.api.external import client_address
from mirror.api.handlers import CACHE_OUTCOME, NODE, ROUTE_NAME

log = logging.getLogger("mirror.access")
REQUEST_ID = "X-Request-Id"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time the request, then log it and count it, whatever happened."""
    started = time.perf_counter()
    request_id = request.headers.get(REQUEST_ID, "")[:64] or secrets.token_hex(8)
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:  # send it now, so the line has the real byte count
            await response.prepare(request)
        return response
    finally:
        duration = time.perf_counter() - started
        _record(request, status, _body_bytes(request, response), duration, request_id)


def _body_bytes(request: web.Request, response: web.StreamResponse | None) -> int:
    if response is None or request.method == "HEAD":
        return 0
    if isinstance(response, web.Response):
        return response.content_length or 0
    return getattr(response, "sent", 0) or response.body_length


def _record(request: web.Request, status: int, size: int, duration: float, request_id: str) -> None:
    node = request.app.get(NODE)
    route = request.get(ROUTE_NAME, "other")  # parsed once, by dispatch
    cache = request.get(CACHE_OUTCOME, "-")
    trusted = node.settings.mirror.trusted_proxies if node else ()
    if node is not None:
        metrics = node.metrics
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.request_seconds.labels(route).observe(duration)
        if cache != "-" and route in ("manifest", "blob"):
            metrics.cache.labels(route, cache).inc()
        if route in ("manifest", "blob") and status < 300:
            metrics.bytes_served.labels(route).inc(size)
            if route == "blob" and cache == "hit":
                metrics.bytes_saved.inc(size)
    log.info(
        '%s %s %s %d %d %.3fs cache=%s id=%s',
        client_address(request, trusted), request.method, request.rel_url.path, status, size, duration,
        cache, request_id,
        extra={"fields": {"method": request.method, "path": request.rel_url.path, "status": status,
                          "bytes": size, "duration": round(duration, 6), "cache": cache,
                          "request_id": request_id, "client": client_address(request, trusted)}},
    )
