"""The debug/admin listener (`http.debug.addr`): metrics, health, readiness.

Kept off the registry port, as distribution does, so monitoring and admin
endpoints are never exposed where clients pull.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from mirror.admin import add_admin_routes, admin_guard
from mirror.api.handlers import NODE
from mirror.api.middleware import error_middleware
from mirror.node import Node

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


async def metrics(request: web.Request) -> web.Response:
    """`/metrics` in the Prometheus text format."""
    node = request.app[NODE]
    await refresh_store_gauges(node)
    return web.Response(body=node.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def refresh_store_gauges(node: Node) -> None:
    """Store size and object count, from the metadata (cheap aggregate)."""
    count, size = await node.metadata.totals()
    node.metrics.store_objects.set(count)
    node.metrics.store_bytes.set(size)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: the store is writable; upstream reachability is reported only.

    A node whose link is down still serves what it has, so an unreachable
    upstream does not make it unready (that would take a zone's cache out
    exactly when it is needed most).
    """
    node = request.app[NODE]
    if node.draining:  # shutting down: take the node out of rotation at once
        return web.json_response({"draining": True}, status=503)
    writable = await asyncio.get_running_loop().run_in_executor(node.executor, _store_writable, node)
    upstream = await node.upstream.ping()
    body = {"store_writable": writable, "upstream_reachable": upstream}
    return web.json_response(body, status=200 if writable else 503)


def _store_writable(node: Node) -> bool:
    probe = node.store.new_temp_path()
    try:
        with open(probe, "xb") as handle:
            handle.write(b"ok")
        os.unlink(probe)
    except OSError:
        return False
    return True


def create_debug_app(node: Node) -> web.Application:
    """The debug application, sharing the registry application's node."""
    app = web.Application(middlewares=[error_middleware, admin_guard])
    app[NODE] = node
    add_admin_routes(app)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/health", health)
    app.router.add_get("/debug/ready", ready)
    return app
