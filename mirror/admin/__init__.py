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


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer secret (`mirror.admin.token`) required; without one, loopback only."""
    if request.path.startswith(ADMIN_PREFIX):
        secret = request.app[NODE].settings.mirror.admin.token
        if secret:
            offered = request.headers.get("Authorization", "")
            if not hmac.compare_digest(offered.encode(), f"Bearer {secret}".encode()):
                raise errors.Unauthorized("admin token required",
                                          headers={"WWW-Authenticate": 'Bearer realm="mirror-admin"'})
        elif not _loopback(request):
            raise errors.Denied("admin API answers only on loopback without mirror.admin.token")
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
