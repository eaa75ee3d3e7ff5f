"""Admin API: `POST /admin/notify`, distribution's notification endpoint.

Point the central registry's `notifications.endpoints` here (the debug
listener, `http.debug.addr`); with `mirror.notify.token` set, the endpoint
config carries it: `headers: {Authorization: [Bearer <token>]}`. The body is
distribution's envelope (`application/vnd.docker.distribution.events.v1+json`,
`{"events": [...]}`); it is acted on in the background, so the answer (200,
with counts) comes at once and the registry's delivery `timeout` is never hit.
Another registry of `mirror.upstreams` posts to `/admin/notify/<its name>`.
"""

from __future__ import annotations

from aiohttp import web

from mirror import errors
from mirror.ops.notify import HOPS_HEADER
from mirror.web.bodies import read_capped
from mirror.web.keys import NODE

MAX_BODY = 16 * 1024 * 1024


async def notify(request: web.Request) -> web.Response:
    body = await read_capped(request, MAX_BODY,
                             lambda: errors.RegistryError("notification envelope too large", status=413))
    raw_hops = request.headers.get(HOPS_HEADER, "0")
    hops = int(raw_hops) if raw_hops.isdigit() else 0
    node = request.app[NODE]
    registry = None
    name = request.match_info.get("registry")
    if name is not None:  # another of mirror.upstreams sent it: its repositories are its own
        registry = node.upstream.named(name)
        if registry is None:
            raise errors.NameUnknown(f"this node serves no registry {name[:100]!r}", status=404)
    counts = node.ops.notifications.receive(body, hops, registry)
    return web.json_response(counts)


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/notify", notify)
    router.add_post("/admin/notify/{registry}", notify)  # per registry (README, Several registries)
