"""Request dispatch, the one place errors become the spec's JSON envelope."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from mirror import errors
from mirror.api import handlers, routes, writes
from mirror.auth.controller import required_access
from mirror.registry.reference import RepositoryName

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every RegistryError once; anything unexpected is UNKNOWN/500."""
    try:
        return await handler(request)
    except errors.RegistryError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 405:
            return error_response(errors.Unsupported())
        return error_response(errors.RegistryError(exc.reason, status=exc.status))
    except Exception:
        log.exception("unexpected failure serving %s %s", request.method, request.path)
        return error_response(errors.Unknown())


def error_response(error: errors.RegistryError) -> web.Response:
    """The JSON error envelope with the error's status and headers."""
    response = web.json_response(error.body(), status=error.status)
    response.headers.update(error.headers)
    return response


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the version header on every response."""
    response.headers[API_VERSION[0]] = API_VERSION[1]


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Route a `/v2/...` request by parsing the path from the right."""
    route = routes.match(request.rel_url.raw_path)
    request[handlers.ROUTE_NAME] = route.name
    node = request.app[handlers.NODE]
    allowed = routes.READ_METHODS[route.name]
    if node.settings.mirror.passthrough_writes:
        allowed = allowed | writes.WRITE_METHODS.get(route.name, set())
    if request.method not in allowed:
        raise errors.Unsupported(headers={"Allow": ", ".join(sorted(allowed))})
    if "name" in route.params:
        RepositoryName.parse(route.params["name"])  # a bad name is 400 for everyone, before auth
    if request.query.get("from"):
        RepositoryName.parse(request.query["from"])
    required = required_access(route, request.method, request.query.get("from"))
    credential = await node.access.authorize(request, required)
    if credential is not None:
        request[handlers.UPSTREAM_AUTHORIZATION] = credential
    if request.method not in routes.READ_METHODS[route.name]:
        return await writes.forward(request, route)
    if route.name == "base":
        return await handlers.base(request)
    _check_namespace(request)
    return await handlers.HANDLERS[route.name](request, route.params)


def _check_namespace(request: web.Request) -> None:
    """containerd's `?ns=`: serve only names of our own upstream.

    Raises:
        NameUnknown: `ns` names another registry, so containerd moves on to its
            next host instead of getting another registry's image by name.
    """
    ns = request.query.get("ns")
    if ns is not None and not request.app[handlers.NODE].serves_namespace(ns):
        raise errors.NameUnknown(f"this mirror does not serve registry {ns[:100]!r}")
