"""The debug/admin listener (`http.debug.addr`): status page, metrics, health, readiness.

Kept off the registry port, as distribution does, so monitoring and admin
endpoints are never exposed where clients pull.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from mirror.admin import add_admin_routes, admin_guard, status
from mirror.api.middleware import error_middleware
from mirror.node import Node
from mirror.observe import lifetime
from mirror.observe.gauges import refresh_store_gauges
from mirror.web.keys import NODE
from mirror.workers import current_role

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


async def metrics(request: web.Request) -> web.Response:
    """`/metrics` in the Prometheus text format."""
    node = request.app[NODE]
    await refresh_store_gauges(node)
    await request.app[status.SAMPLER].upstream_health()
    body = node.metrics.exposition()
    if current_role() is not None:  # worker processes: this is the leader, it adds the others' figures
        from mirror.observe.nodetotals import node_exposition

        body = node_exposition(node.metrics.registry, node.settings.metadata_dir)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


READY_WAIT = 0.5  # the longest readiness waits for a fresh look at the link or the store
STORE_STUCK = 10.0  # a store check pending this long means the store is not writable (a hung mount)


async def ready(request: web.Request) -> web.Response:
    """Readiness: the store is writable; upstream reachability is reported only.

    A node whose link is down still serves what it has, so an unreachable
    upstream does not make it unready (that would take a zone's cache out
    exactly when it is needed most). Nor does readiness wait on the link: it
    answers within about a second from what the node already knows (recent
    upstream exchanges, a background probe), so a link that silently drops
    packets cannot outlast the platform's probe timeout.
    """
    node = request.app[NODE]
    if node.draining:  # shutting down: take the node out of rotation at once
        return web.json_response({"draining": True}, status=503)
    writable = await request.app[STORE_CHECK].writable(node, READY_WAIT)
    link = await node.upstream.health.report(READY_WAIT)
    body = {"store_writable": writable, "upstream_reachable": link["reachable"], "upstream": link}
    if node.upstream.others:  # mirror.upstreams: shown, never waited on, never making the node unready
        body["registries"] = {r.label: {"reachable": r.client.health.reachable, "error": r.client.health.error}
                              for r in node.upstream.others}
    return web.json_response(body, status=200 if writable else 503)


class StoreCheck:
    """Whether a file can be created in the store, checked by one thread at a time.

    Readiness waits for a fresh check only briefly and otherwise answers with
    the last result, so a busy executor cannot make it slow; a check that
    hangs (a dead network mount) holds one thread, never one per probe, and
    after STORE_STUCK makes the node unready.
    """

    def __init__(self) -> None:
        self.last: bool | None = None
        self._check: asyncio.Future[bool] | None = None
        self._started = 0.0

    async def writable(self, node: Node, wait: float) -> bool:
        loop = asyncio.get_running_loop()
        if self._check is None or self._check.done():
            self._started = loop.time()
            self._check = loop.run_in_executor(node.executor, _store_writable, node)
        try:
            self.last = await asyncio.wait_for(asyncio.shield(self._check), wait)
        except TimeoutError:
            if loop.time() - self._started >= STORE_STUCK:
                return False
        return bool(self.last)


STORE_CHECK: web.AppKey[StoreCheck] = web.AppKey("store_check", StoreCheck)


def _store_writable(node: Node) -> bool:
    try:
        probe = node.store.new_temp_path()
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
    app[STORE_CHECK] = StoreCheck()
    add_admin_routes(app)
    status.install(app)
    app.cleanup_ctx.append(lifetime.running)  # `mirror stats` totals across restarts
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/health", health)
    app.router.add_get("/debug/ready", ready)
    return app
