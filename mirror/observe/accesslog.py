"""One access-log line per request, and request metrics, from one middleware.

Fields: method, path, status, bytes, duration, cache outcome, request id and
client address (`X-Forwarded-For` only from trusted proxies). Query strings
are logged without values that could be credentials, and neither
`Authorization` nor tokens ever reach a log line.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror.observe.metrics import Metrics
from mirror.web.external import client_address
from mirror.web.keys import CACHE_OUTCOME, NODE, REGISTRY_LABEL, ROUTE_NAME

log = logging.getLogger("mirror.access")
REQUEST_ID = "X-Request-Id"
#: Generated request ids: this process's random prefix and a counter, unique
#: across processes and restarts without a call into the OS per request.
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def next_request_id() -> str:
    """A request id for a request that brought none (`<process prefix>-<counter>`)."""
    return f"{_ID_PREFIX}-{next(_ids):x}"


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time the request, then log it and count it, whatever happened."""
    started = time.perf_counter()
    request_id = request.headers.get(REQUEST_ID, "")[:64]
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
    if node is not None:
        _count(node.metrics, route, request.method, status, cache, size, duration)
        if cache != "-" and route in ("manifest", "blob"):
            node.metrics.child("registry_cache", request.get(REGISTRY_LABEL, "-"), route, cache).inc()
    if not log.isEnabledFor(logging.INFO):  # the common production level: build nothing
        return
    trusted = node.settings.mirror.trusted_proxies if node else ()
    request_id = request_id or next_request_id()
    client = client_address(request, trusted)
    path = request.rel_url.path
    log.info(
        '%s %s %s %d %d %.3fs cache=%s id=%s',
        client, request.method, path, status, size, duration, cache, request_id,
        extra={"fields": {"method": request.method, "path": path, "status": status,
                          "bytes": size, "duration": round(duration, 6), "cache": cache,
                          "request_id": request_id, "client": client}},
    )


def _count(metrics: Metrics, route: str, method: str, status: int, cache: str, size: int,
           duration: float) -> None:
    metrics.child("requests", route, method, str(status)).inc()
    metrics.child("request_seconds", route).observe(duration)
    if route in ("manifest", "blob"):
        if cache != "-":
            metrics.child("cache", route, cache).inc()
        if status < 300:
            metrics.child("bytes_served", route).inc(size)
            if route == "blob" and cache == "hit":
                metrics.bytes_saved.inc(size)
