"""The peer interface, `/zone/v1/...` on the main listener (no collision with `/v2/`).

| path                                   | answers                                              |
| `GET/HEAD /zone/v1/blobs/<digest>?repo=R` | the blob as this node serves it to a client of R: |
|                                        | stored (and linked, or confirmed upstream), or filled |
|                                        | now from peers or the link; single ranges supported |
| `GET/HEAD /zone/v1/held/<digest>?repo=R`  | the blob only if stored here (never fetched);     |
|                                        | `X-Mirror-Zone-Linked: 1` when linked to R          |
| `GET /zone/v1/manifests/<digest>?repo=R`  | a manifest by digest, as to a client of R         |

Every request must carry a valid signature (:mod:`mirror.zone.signing`),
else 401 with the spec's JSON body and `X-Mirror-Zone-Refused: 1`, and no
content. The client was authorized by the node it reached; the
credential that node chose (client, node or anonymous) comes along in
`X-Mirror-Zone-Credential` and is what this node uses upstream for the
request, so a blob reaches only clients whose credential upstream accepts
for R, as on a lone node. Peer requests are not client pulls: no pull
events, no popularity, their own route names in metrics.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web

from mirror import errors
from mirror.api import handlers, stalls
from mirror.web import keys
from mirror.proxy.blobs import BlobSource
from mirror.registry.digest import Digest
from mirror.registry.reference import RepositoryName
from mirror.upstream.credential import Credential
from mirror.zone import signing
from mirror.zone.peers import CACHE, LINKED, PREFIX, REFUSED
from mirror.zone.routing import ROUTING


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX + "/blobs/{digest}", blob)  # and HEAD
    app.router.add_get(PREFIX + "/held/{digest}", held)  # and HEAD
    app.router.add_get(PREFIX + "/manifests/{digest}", manifest)
    app.router.add_route("*", PREFIX + r"/{tail:[\s\S]*}", unknown)


def _authenticated(request: web.Request) -> tuple[str, Digest, Credential]:
    """(repository, digest, credential) of a signed peer request.

    Raises:
        Unauthorized: the zone is off, or the signature is missing, wrong or stale.
        NameInvalid, DigestInvalid: a malformed repository or digest.
    """
    node = request.app[keys.NODE]
    zone = getattr(node, "zone", None)
    refusal = "this node is in no zone" if zone is None else signing.verify(
        zone.settings.secret, request.method, request.rel_url.raw_path_qs, request.headers,
        zone.settings.max_skew)
    if refusal is not None:
        if zone is not None:
            zone.metrics.refused.inc()
        raise errors.Unauthorized(refusal, headers={REFUSED: "1"})
    repo = RepositoryName.parse(request.query.get("repo", "")).value
    digest = Digest.parse(request.match_info["digest"])
    return repo, digest, _credential(request)


def _credential(request: web.Request) -> Credential:
    kind = request.headers.get(signing.CREDENTIAL, "")
    if kind == "client":
        header = request.headers.get(signing.CLIENT_AUTHORIZATION, "")
        if header:
            return Credential.client(header)
    elif kind == "node":
        return Credential.node()
    elif kind == "anonymous":
        return Credential.anonymous()
    raise errors.Unauthorized("peer request names no credential", headers={REFUSED: "1"})


async def blob(request: web.Request) -> web.StreamResponse:
    """A peer asks the owner: served exactly as to a client of R, never routed further."""
    repo, digest, credential = _authenticated(request)
    node = request.app[keys.NODE]
    node.zone.metrics.served.labels("blobs").inc()
    request[keys.ROUTE_NAME] = "zone_blob"
    request[keys.UPSTREAM_CREDENTIAL] = credential
    stalls.watch(request, node.settings.mirror.client_idle_timeout)
    # Not routed again: its fill goes to a peer holding it, or the link. Reset after, since
    # aiohttp runs a keep-alive connection's requests in one task (one context).
    token = ROUTING.set(False)
    try:
        return await handlers.blob(request, {"name": repo, "digest": str(digest)})
    finally:
        ROUTING.reset(token)


async def manifest(request: web.Request) -> web.StreamResponse:
    """A manifest by digest, as to a client of R (stored and linked, or fetched now), never routed."""
    repo, digest, credential = _authenticated(request)
    node = request.app[keys.NODE]
    node.zone.metrics.served.labels("manifests").inc()
    request[keys.ROUTE_NAME] = "zone_manifest"
    token = ROUTING.set(False)
    try:
        result = await node.manifests.by_digest(repo, digest, credential)
    finally:
        ROUTING.reset(token)
    request[keys.CACHE_OUTCOME] = result.cache
    return web.Response(body=result.raw, headers={"Content-Type": result.media_type, CACHE: result.cache,
                                                  "Docker-Content-Digest": str(result.digest)})


async def held(request: web.Request) -> web.StreamResponse:
    """Only what this node stores: HEAD says so (and whether linked to R), GET sends it."""
    repo, digest, _credential = _authenticated(request)
    node = request.app[keys.NODE]
    node.zone.metrics.served.labels("held").inc()
    request[keys.ROUTE_NAME] = "zone_held"
    stalls.watch(request, node.settings.mirror.client_idle_timeout)
    opened = await _stored(node, digest)
    if opened is None:
        raise errors.BlobUnknown("not stored on this node")
    fd, size = opened
    linked = "1" if await node.metadata.is_linked(repo, digest) else "0"
    if request.method == "HEAD":
        os.close(fd)
        response = web.StreamResponse(headers={LINKED: linked, "Docker-Content-Digest": str(digest)})
        response.content_length = size
        return response
    source = BlobSource(digest, size, fd=fd)
    response = handlers._send_stored(request, source, node.quota.hold(digest))
    response.headers[LINKED] = linked
    return response


async def _stored(node: Any, digest: Digest) -> tuple[int, int] | None:
    """(open descriptor, size) of the stored object, or None."""
    loop = asyncio.get_running_loop()
    size = await loop.run_in_executor(node.executor, node.store.size, digest)
    if size is None:
        return None
    return await loop.run_in_executor(node.executor, node.store.open_object, digest, size)


async def unknown(request: web.Request) -> web.StreamResponse:
    _authenticated_or_refused(request)
    raise errors.NameUnknown("no such peer route", status=404)


def _authenticated_or_refused(request: web.Request) -> None:
    node = request.app[keys.NODE]
    zone = getattr(node, "zone", None)
    if zone is None or signing.verify(zone.settings.secret, request.method, request.rel_url.raw_path_qs,
                                      request.headers, zone.settings.max_skew) is not None:
        raise errors.Unauthorized("peer request refused", headers={REFUSED: "1"})
