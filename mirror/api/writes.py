"""Write pass-through: pushes go to the central registry through the node.

With `mirror.passthrough_writes: true` blob uploads (POST, PATCH, PUT,
cross-repository mounts), manifest PUT and DELETE are relayed upstream with
bodies streamed both ways (memory stays bounded for multi-GiB layers),
`Content-Range`/`Range`/`Docker-Upload-UUID`/`Docker-Content-Digest` intact,
and the client's own token passed unchanged. Upstream's absolute `Location`s
(built from its own `http.host`) are rewritten to the node's external URL,
so the client's next PATCH/PUT comes back through the node: the source
document's "must be https + domain name to avoid http patch 401 error".

Read your writes: a manifest pushed by tag updates the node's tag as soon as
upstream confirms it, and pushed bytes are kept (verified) in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from aiohttp import web

from mirror import errors
from mirror.node import Node
from mirror.registry import manifest as manifests
from mirror.registry.digest import Digest
from mirror.registry.reference import RepositoryName, Tag, parse_reference
from mirror.registry.routes import Route
from mirror.web.bodies import read_capped
from mirror.web.external import external_base
from mirror.web.keys import NODE

log = logging.getLogger(__name__)

REQUEST_HEADERS = ("authorization", "content-type", "content-length", "content-range", "range",
                   "accept", "user-agent", "docker-content-digest")
RESPONSE_HEADERS = ("content-type", "content-range", "range", "location", "docker-upload-uuid",
                    "docker-content-digest", "www-authenticate", "retry-after", "oci-chunk-min-length")
CHUNK = 256 * 1024

#: Methods each route accepts when writes pass through.
WRITE_METHODS = {"manifest": {"PUT", "DELETE"}, "blob": {"DELETE"},
                 "upload": {"POST", "PATCH", "PUT", "GET", "DELETE"}}


async def forward(request: web.Request, route: Route) -> web.StreamResponse:
    """Relay one write request upstream and its answer back."""
    node = request.app[NODE]
    repo = RepositoryName.parse(route.params["name"]).value
    path_qs = request.rel_url.raw_path + (f"?{request.rel_url.raw_query_string}"
                                          if request.rel_url.raw_query_string else "")
    headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
    if route.name == "manifest" and request.method == "PUT":
        return await _put_manifest(request, node, repo, route, path_qs, headers)
    session = _session_for(request, route)
    body = _teed_body(request, node, session) if request.body_exists else None
    async with node.upstream.forward(request.method, path_qs, headers, body) as upstream:
        # Bookkeeping first, shielded: a client that hangs up as soon as it has
        # the answer must not leave the node's cache behind upstream.
        if upstream.status_code < 300:
            await asyncio.shield(_after_write(node, request, route, repo, upstream))
        elif session is not None:
            await asyncio.shield(node.uploads.abandon(session))
        return await _relay_response(request, node, upstream)


def _session_for(request: web.Request, route: Route) -> str | None:
    """The upload session a request's bytes belong to (None: nothing to copy)."""
    if route.name != "upload" or request.method not in ("PATCH", "PUT", "POST"):
        return None
    if request.method == "POST":
        return None  # a POST opens a session; its UUID comes back in the answer
    return route.params["upload"] or None


async def _teed_body(request: web.Request, node: Node, session: str | None) -> AsyncIterator[bytes]:
    """Stream the client's body upstream, copying it for write-through."""
    copy = None
    if session is not None:
        start = _range_start(request.headers.get("Content-Range"))
        copy = node.uploads.get(session, start) if start is not None else node.uploads.get_any(session)
        if copy is None:
            await node.uploads.abandon(session)
    while True:
        chunk = await request.content.read(CHUNK)
        if not chunk:
            return
        if copy is not None:
            try:
                await node.uploads.write(copy, chunk)
            except OSError as exc:
                log.info("not keeping pushed bytes: %s", exc)
                await node.uploads.abandon(session or "")
                copy = None
        yield chunk


def _range_start(value: str | None) -> int | None:
    """Start offset of a PATCH `Content-Range: start-end` (None when absent)."""
    if not value:
        return None
    first = value.removeprefix("bytes ").split("-", 1)[0].strip()
    return int(first) if first.isdigit() else -1


async def _relay_response(request: web.Request, node: Node, upstream: httpx.Response) -> web.StreamResponse:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() in RESPONSE_HEADERS}
    if "location" in upstream.headers:
        headers = {k: v for k, v in headers.items() if k.lower() != "location"}
        headers["Location"] = rewrite_location(upstream.headers["location"], _base(request, node))
    response = web.StreamResponse(status=upstream.status_code, headers=headers)
    length = upstream.headers.get("content-length")
    if length is not None and length.isdigit():
        response.content_length = int(length)
    await response.prepare(request)
    async for chunk in upstream.aiter_raw():
        await response.write(chunk)
    await response.write_eof()
    return response


def _base(request: web.Request, node: Node) -> str:
    mirror = node.settings.mirror
    return external_base(request, node.settings.http.host, mirror.trusted_proxies)


def rewrite_location(value: str, base: str) -> str:
    """Point an upstream registry URL at this node; leave other URLs alone."""
    parts = urlsplit(value)
    if not parts.path.startswith("/v2/"):
        return value
    return base + parts.path + (f"?{parts.query}" if parts.query else "")


async def _after_write(node: Node, request: web.Request, route: Route, repo: str,
                       upstream: httpx.Response) -> None:
    """Read-your-writes bookkeeping once upstream confirmed a write."""
    uuid = upstream.headers.get("docker-upload-uuid")
    if route.name == "upload" and request.method == "POST":
        await _after_post(node, request, repo, upstream, uuid)
    elif route.name == "upload" and request.method == "PATCH" and uuid:
        node.uploads.rekey(route.params["upload"], uuid)
    elif route.name == "upload" and request.method == "PUT":
        await _keep_blob(node, repo, route.params["upload"], upstream.headers.get("docker-content-digest"))
    elif request.method == "DELETE" and route.name in ("manifest", "blob"):
        await _forget(node, repo, route)


async def _after_post(node: Node, request: web.Request, repo: str, upstream: httpx.Response,
                      uuid: str | None) -> None:
    mounted = request.query.get("mount")
    if upstream.status_code == 201 and mounted:
        digest = Digest.parse(mounted)
        if await node.metadata.get_object(digest) is not None:
            await node.metadata.link(repo, digest)
    elif upstream.status_code == 202 and uuid:
        await node.uploads.open(uuid)


async def _keep_blob(node: Node, repo: str, session: str, digest_header: str | None) -> None:
    if not digest_header:
        return
    digest = Digest.parse(digest_header)
    if await node.uploads.commit(session, digest):
        size = await node.blobs._io(node.store.size, digest)
        await node.metadata.put_object(digest, size or 0, None)
        await node.metadata.link(repo, digest)
        node.blobs.negative.forget(("blob", repo, digest))


async def _forget(node: Node, repo: str, route: Route) -> None:
    if route.name == "blob":
        await node.metadata.unlink(repo, Digest.parse(route.params["digest"]))
        return
    reference = parse_reference(route.params["reference"])
    if isinstance(reference, Tag):
        await node.metadata.delete_tag(repo, reference.value)
    else:
        await node.metadata.delete_tags_to(repo, reference)
        await node.metadata.unlink(repo, reference)


async def _put_manifest(request: web.Request, node: Node, repo: str, route: Route, path_qs: str,
                        headers: dict[str, str]) -> web.StreamResponse:
    """A manifest push: small, so read whole (capped, 413 beyond), relayed, then cached."""
    cap = node.settings.mirror.manifest_max_size
    raw = await read_capped(request, cap, lambda: errors.ManifestInvalid(
        f"manifest larger than {cap} bytes (mirror.manifest_max_size)", status=413))
    async with node.upstream.forward("PUT", path_qs, headers, raw) as upstream:
        if upstream.status_code == 201:
            await asyncio.shield(_keep_manifest(node, repo, route, raw, request.headers.get("Content-Type"),
                                                upstream.headers.get("docker-content-digest")))
        return await _relay_response(request, node, upstream)


async def _keep_manifest(node: Node, repo: str, route: Route, raw: bytes, content_type: str | None,
                         digest_header: str | None) -> None:
    digest = Digest.of(raw)
    if digest_header and Digest.parse(digest_header) != digest:
        log.warning("upstream confirmed %s for a manifest hashing to %s: not cached", digest_header, digest)
        return
    try:
        media_type = manifests.detect_media_type(raw, content_type)
    except errors.RegistryError:
        return
    await node.manifests.put(repo, digest, raw, media_type)
    reference = parse_reference(route.params["reference"])
    if isinstance(reference, Tag):
        await node.manifests.set_tag(repo, reference.value, digest, media_type)
