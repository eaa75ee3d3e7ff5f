"""The application factory: no module-level state, everything from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from mirror.api import handlers, middleware
from mirror.config import Settings
from mirror.node import close_node, open_node

MAX_HEADER_SIZE = 16 * 1024


def create_app(settings: Settings, transport: object = None) -> web.Application:
    """Build the registry application for `settings`.

    Args:
        transport: an httpx transport for upstream (tests only).
    """
    app = web.Application(middlewares=[middleware.error_middleware],
                          handler_args={"max_field_size": MAX_HEADER_SIZE, "max_line_size": MAX_HEADER_SIZE})

    async def node_context(app: web.Application) -> AsyncIterator[None]:
        node = await open_node(settings, transport)
        app[handlers.NODE] = node
        yield
        await close_node(node)

    app.cleanup_ctx.append(node_context)
    app.on_response_prepare.append(middleware.add_api_version)
    app.router.add_route("*", "/v2", middleware.dispatch)
    app.router.add_route("*", r"/v2/{tail:[\s\S]*}", middleware.dispatch)
    return app
