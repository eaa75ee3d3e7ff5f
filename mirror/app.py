"""The application factory: no module-level state, everything from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import httpx
from aiohttp import web

from mirror import errors
from mirror.api import middleware
from mirror.api.server import IN_FLIGHT, InFlight
from mirror.auth.controller import TOKEN_PATH, TokenAccess, install_reload
from mirror.auth.relay import TokenRelay
from mirror.config import Settings
from mirror.node import Node, close_node, open_node
from mirror.observe.accesslog import access_log_middleware
from mirror.upstream.tls import verify_setting
from mirror.web import keys

if TYPE_CHECKING:
    from mirror.auth.offline import OfflineAuthority

TOKEN_RELAY: web.AppKey[TokenRelay] = web.AppKey("token_relay", TokenRelay)

MAX_HEADER_SIZE = 16 * 1024


def create_app(settings: Settings, transport: object = None) -> web.Application:
    """Build the registry application for `settings`.

    Args:
        transport: an httpx transport for upstream (tests only).
    """
    in_flight = InFlight()  # shutdown waits for these, up to mirror.shutdown_grace
    app = web.Application(middlewares=[in_flight.middleware, access_log_middleware,
                                       middleware.error_middleware],
                          handler_args={"max_field_size": MAX_HEADER_SIZE, "max_line_size": MAX_HEADER_SIZE})
    app[IN_FLIGHT] = in_flight

    async def node_context(app: web.Application) -> AsyncIterator[None]:
        node = await open_node(settings, transport)
        app[keys.NODE] = node
        install_reload(node.access, *([node.zone] if node.zone is not None else []))
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), trust_env=False,
                                     verify=verify_setting()) as token_client:
            offline = _offline_authority(node)
            if settings.auth.token is not None and settings.mirror.auth.token_proxy:
                relay = TokenRelay(settings.auth.token.realm, token_client, offline)
                app[TOKEN_RELAY] = relay
            yield
            if offline is not None:
                await offline.close()
        await close_node(node)

    app.cleanup_ctx.append(node_context)
    app.on_response_prepare.append(middleware.add_api_version)
    if settings.http.headers:
        app.on_response_prepare.append(_configured_headers(settings.http.headers))
    if settings.mirror.zone is not None:  # the peer interface, /zone/v1/ (mirror.zone)
        from mirror.zone.server import add_routes
        add_routes(app)
    app.router.add_route("*", TOKEN_PATH, _token)
    app.router.add_route("*", "/v2", middleware.dispatch)
    app.router.add_route("*", r"/v2/{tail:[\s\S]*}", middleware.dispatch)
    return app


def _configured_headers(headers: Mapping[str, tuple[str, ...]]) -> Callable[..., Awaitable[None]]:
    """distribution's `http.headers` (e.g. `X-Content-Type-Options: nosniff`, HSTS) on every
    response that does not set the header itself."""
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        for name, values in headers.items():
            if name not in response.headers:
                for value in values:
                    response.headers.add(name, value)

    return add


async def _token(request: web.Request) -> web.StreamResponse:
    """`/token`: the token relay when enabled, else not a route of this node."""
    relay = request.app.get(TOKEN_RELAY)
    if relay is None:
        raise errors.NameUnknown("no such route", status=404)
    return await relay.handle(request)


def _offline_authority(node: Node) -> OfflineAuthority | None:
    """Offline tokens: on with the token relay unless `mirror.auth.offline_grace: 0`."""
    access = node.access
    if not isinstance(access, TokenAccess) or access.node_verifier is None:
        return None
    from mirror.auth.nodekey import NodeKey
    from mirror.auth.offline import OfflineAuthority, OfflineStore

    settings = node.settings
    directory = settings.metadata_dir
    return OfflineAuthority(OfflineStore(directory), NodeKey.for_settings(settings),
                            access.verifier, access.token.service,
                            settings.mirror.auth.offline_grace, node.metadata.repositories,
                            node.metrics.offline_tokens.inc)
