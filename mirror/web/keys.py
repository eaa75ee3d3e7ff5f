"""Typed keys for what the application and each request carry.

The application holds the node (:data:`NODE`); the dispatch and auth
middlewares record on each request what the handlers, the access log and the
metrics read later. Kept apart from the handlers so the admin API, the auth
layer and the access log reach them without importing the registry API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # the keys' value types, for type checking only: web/ imports nothing above it
    from mirror.node import Node
    from mirror.upstream.credential import Credential

NODE: web.AppKey[Node] = web.AppKey("node")
#: How the request was answered: hit, miss, coalesced, revalidated, stale (access log, metrics).
CACHE_OUTCOME: web.RequestKey[str] = web.RequestKey("cache", str)
#: The matched route's name (set by dispatch; read by the access log and metrics).
ROUTE_NAME: web.RequestKey[str] = web.RequestKey("route", str)
#: Whose credentials this request's upstream calls carry; set by the auth layer, always.
UPSTREAM_CREDENTIAL: web.RequestKey[Credential] = web.RequestKey("upstream_credential")
#: The repository name as the client wrote it, when routing keyed it otherwise (`?ns=`, a prefix).
CLIENT_NAME: web.RequestKey[str] = web.RequestKey("client_name", str)
#: The registry a repository request belongs to, as metrics label it (`upstream`).
REGISTRY_LABEL: web.RequestKey[str] = web.RequestKey("registry_label", str)
