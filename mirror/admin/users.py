"""Admin API: the users this node learned for offline tokens.

    GET    /admin/users          -> {"users": [{name, credentials, learned_at, repositories}], ...}
    DELETE /admin/users/{name}   -> {"forgotten": name}; 404 when the node never learned it

The learned verifiers and grants live in their own SQLite file in the
metadata directory (the truth shared by every process of the node), so these
handlers open it per call rather than reach into the token relay.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mirror import errors
from mirror.web.keys import NODE


def _with_store(request: web.Request, work: Any, nothing: Any) -> Any:
    """``work(store)``, or ``nothing`` when the node never learned anyone (no file made)."""
    from mirror.auth.offline import DB_FILE, OfflineStore

    directory = request.app[NODE].settings.metadata_dir
    if not (directory / DB_FILE).exists():
        return nothing
    store = OfflineStore(directory)
    try:
        return work(store)
    finally:
        store.close()


async def list_users(request: web.Request) -> web.Response:
    users = await asyncio.to_thread(_with_store, request, lambda store: store.users(), [])
    auth = request.app[NODE].settings.mirror.auth
    return web.json_response({
        "offline_grace": auth.offline_grace if auth.token_proxy else 0,
        "users": [{"name": u.subject, "credentials": u.credentials, "learned_at": u.learned_at,
                   "repositories": list(u.repositories)} for u in users],
    })


async def forget_user(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    forgotten = await asyncio.to_thread(_with_store, request, lambda store: store.forget(name),
                                        False)
    if not forgotten:
        raise errors.RegistryError(f"no learned user {name!r}", status=404)
    return web.json_response({"forgotten": name})


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/users", list_users)
    router.add_delete("/admin/users/{name}", forget_user)
