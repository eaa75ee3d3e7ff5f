"""The admin API, served on the debug listener (`http.debug.addr`).

Everything the CLI does to a running node goes through here, so the
server's in-memory state (access times, in-flight fetches, pins) is never
bypassed. Each module of this package owns one concern and exposes
`routes(router)`; :func:`add_admin_routes` mounts them all behind
:func:`admin_guard`.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror import errors
from mirror.api.handlers import NODE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_PREFIX = "/admin/"


#: The one admin route a registry's notifications call: it takes `mirror.notify.token`.
NOTIFY_PATH = "/admin/notify"


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each secret authorizes its own routes; without one, trusted loopback only.

    `mirror.notify.token` authorizes `POST /admin/notify` and nothing else (a
    registry's notification config holds it); `mirror.admin.token` authorizes
    every other admin route (purge, gc, prewarm...) and never notify. With
    `mirror.admin.trust_loopback: false` (hostNetwork, where loopback is every
    process of the host) an unset secret closes its routes.
    """
    if request.path.startswith(ADMIN_PREFIX):
        settings = request.app[NODE].settings.mirror
        if request.path == NOTIFY_PATH:
            secret, key = settings.notify.token, "mirror.notify.token"
        else:
            secret, key = settings.admin.token, "mirror.admin.token"
        if secret:
            offered = request.headers.get("Authorization", "")
            if not hmac.compare_digest(offered.encode(), f"Bearer {secret}".encode()):
                raise errors.Unauthorized(f"{key} required",
                                          headers={"WWW-Authenticate": 'Bearer realm="mirror-admin"'})
        elif not settings.admin.trust_loopback:
            raise errors.Denied(f"closed: {key} is not set and "
                                "mirror.admin.trust_loopback is false")
        elif not _loopback(request):
            raise errors.Denied(f"answers only on loopback without {key}")
    return await handler(request)


def _loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    try:
        return bool(peer) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def add_admin_routes(app: web.Application) -> None:
    """Mount every admin module's routes."""
    from mirror.admin import modules

    for module in modules.ALL:
        module.routes(app.router)
