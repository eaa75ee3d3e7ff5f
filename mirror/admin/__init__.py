"""The admin API, served on the debug listener (`http.debug.addr`).

Everything the CLI does to a running node goes through here, so the
server's in-memory state (access times, in-flight fetches, pins) is never
bypassed. Each module of this package owns one concern and exposes
`routes(router)`; :func:`add_admin_routes` mounts them all behind
:func:`admin_guard`.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror import errors
from mirror.web.keys import NODE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_PREFIX = "/admin/"


STATUS_PAGE = "/"
#: The one admin route a registry's notifications call: it takes `mirror.notify.token`.
NOTIFY_PATH = "/admin/notify"


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each secret authorizes its own routes; without one, trusted loopback only.

    `mirror.notify.token` authorizes `POST /admin/notify` and nothing else (a
    registry's notification config holds it); `mirror.admin.token` authorizes
    every other admin route (purge, gc, prewarm...) and the status page, never
    notify. With `mirror.admin.trust_loopback: false` (hostNetwork, where
    loopback is every process of the host) an unset secret closes its routes.

    A browser cannot send a Bearer header by itself, so for the status page
    (`/`) HTTP Basic with the token as password (any user name) is accepted
    too, and the page's challenge is Basic: the browser asks once and sends it
    again with the page's own `/admin/status` requests.
    """
    if request.path.startswith(ADMIN_PREFIX) or request.path == STATUS_PAGE:
        settings = request.app[NODE].settings.mirror
        if request.path == NOTIFY_PATH or request.path.startswith(f"{NOTIFY_PATH}/"):  # per registry too
            secret, key = settings.notify.token, "mirror.notify.token"
        else:
            secret, key = settings.admin.token, "mirror.admin.token"
        if secret:
            if not _offers(request.headers.get("Authorization", ""), secret):
                scheme = "Basic" if request.path == STATUS_PAGE else "Bearer"
                raise errors.Unauthorized(f"{key} required",
                                          headers={"WWW-Authenticate": f'{scheme} realm="mirror-admin"'})
        elif not settings.admin.trust_loopback:
            raise errors.Denied(f"closed: {key} is not set and "
                                "mirror.admin.trust_loopback is false")
        elif not _loopback(request):
            raise errors.Denied(f"answers only on loopback without {key}")
    return await handler(request)


def _offers(authorization: str, secret: str) -> bool:
    """The header carries the token: `Bearer TOKEN`, or Basic with TOKEN as password."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), secret.encode())


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
