"""Thin handlers for the read API: parse, call the proxy, set registry headers.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pull
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from aiohttp import web

from mirror import errors
from mirror.api.ranges import parse_range
from mirror.api.responses import HOLD_BACK, SendfileResponse, stream_fetch
from mirror.node import Node
from mirror.proxy.blobs import BlobSource
from mirror.proxy.tags import paginate
from mirror.registry.digest import Digest
from mirror.registry.mediatypes import parse_accept
from mirror.registry.reference import RepositoryName, Tag, parse_reference
from mirror.storage.quota import RETRY_AFTER, is_disk_full
from mirror.upstream.credential import Credential
from mirror.web.keys import CACHE_OUTCOME, CLIENT_NAME, NODE, UPSTREAM_CREDENTIAL

log = logging.getLogger(__name__)
MAX_PAGE = 10_000
BLOB_CACHE_CONTROL = "max-age=31536000"


def _node(request: web.Request) -> Node:
    return request.app[NODE]


def _credential(request: web.Request) -> Credential:
    """Whose credentials to use upstream: the auth layer's verdict (a KeyError if it gave none)."""
    return request[UPSTREAM_CREDENTIAL]


async def base(request: web.Request) -> web.Response:
    """`GET /v2/`: the API version check."""
    return web.json_response({})


async def catalog(request: web.Request, _params: dict[str, str]) -> web.Response:
    """`GET /v2/_catalog`: the repositories this node holds."""
    n, last = page_params(request)
    repositories, more = paginate(await _node(request).metadata.repositories(), n, last)
    response = web.json_response({"repositories": repositories})
    if more:
        response.headers["Link"] = f'</v2/_catalog?last={repositories[-1]}&n={n}>; rel="next"'
    return response


async def tags_list(request: web.Request, params: dict[str, str]) -> web.Response:
    """`GET /v2/<name>/tags/list` with `n`/`last` pagination."""
    repo = RepositoryName.parse(params["name"]).value
    n, last = page_params(request)
    tags = await _node(request).tags.list(repo, _credential(request))
    page, more = paginate(tags, n, last)
    response = web.json_response({"name": request.get(CLIENT_NAME, repo), "tags": page})
    if more:  # by the node's key: the next page reaches the same registry without `ns`
        response.headers["Link"] = f'</v2/{repo}/tags/list?last={page[-1]}&n={n}>; rel="next"'
    return response


def page_params(request: web.Request) -> tuple[int | None, str | None]:
    """Validate `n` (ASCII digits, clamped to MAX_PAGE) and `last`.

    Raises:
        PaginationNumberInvalid: `n` is negative or not a number.
    """
    raw_n = request.query.get("n")
    n = None
    if raw_n is not None and raw_n != "":
        if not (raw_n.isascii() and raw_n.isdigit()) or len(raw_n) > 19:
            raise errors.PaginationNumberInvalid(detail={"n": raw_n[:40]})
        n = min(int(raw_n), MAX_PAGE)
    last = request.query.get("last") or None
    return n, last


async def manifest(request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    """`GET`/`HEAD /v2/<name>/manifests/<reference>`, negotiated on Accept."""
    repo = RepositoryName.parse(params["name"]).value
    reference = parse_reference(params["reference"])
    accepted = parse_accept(request.headers.getall("Accept", []))
    try:
        result = await _node(request).manifests.get(repo, reference, accepted, _credential(request))
    except OSError as exc:  # storing it failed: a full disk is 503, and recovers
        _node(request).quota.store_error(exc)
        if is_disk_full(exc):
            raise errors.Unavailable("the mirror's disk is full", headers=RETRY_AFTER) from exc
        log.error("storing a manifest of %s failed: %s", repo, exc)  # EIO...: a 503 as for blobs, not a 500
        raise errors.Unavailable("the mirror could not store this manifest", headers=RETRY_AFTER) from exc
    request[CACHE_OUTCOME] = result.cache
    _node(request).ops.manifest_served(request, repo, reference, result)  # pull counts, pull events
    headers = {
        "Content-Type": result.media_type,
        "Docker-Content-Digest": str(result.digest),
        "ETag": f'"{result.digest}"',
    }
    if isinstance(reference, Tag):
        headers["Vary"] = "Accept"
        headers.update(_freshness(result.fetched_at, _node(request).manifests.tag_policy(repo)[0]))
    if _etag_matches(request, str(result.digest)):
        return web.Response(status=304, headers=headers)
    return web.Response(body=result.raw, headers=headers)


def _freshness(confirmed_at: float | None, tag_ttl: float) -> dict[str, str]:
    """`Cache-Control: max-age` and `Age` for a tag answer.

    A downstream mirror (an edge zone) dates its own record by `Age`, so its
    TTL runs from when this node last confirmed the tag, not on top of it.
    """
    if confirmed_at is None:
        return {}
    age = max(0, int(time.time() - confirmed_at))
    return {"Cache-Control": f"max-age={max(0, int(tag_ttl) - age)}", "Age": str(age)}


def _etag_matches(request: web.Request, digest: str) -> bool:
    header = request.headers.get("If-None-Match")
    return header is not None and any(t.strip().strip('"') in (digest, "*") for t in header.split(","))


async def blob(request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    """`GET`/`HEAD /v2/<name>/blobs/<digest>`, with single byte ranges."""
    repo = RepositoryName.parse(params["name"]).value
    digest = Digest.parse(params["digest"])
    node = _node(request)
    if request.method == "HEAD":
        source = await node.blobs.stat(repo, digest, _credential(request))
        request[CACHE_OUTCOME] = source.cache
        response = web.StreamResponse(headers=_blob_headers(digest))
        if source.size is not None:
            response.content_length = source.size
        return response
    source = await node.blobs.open(repo, digest, _credential(request))
    if source.fd is not None and not await _verified_first(request, node, source):
        source = await node.blobs.open(repo, digest, _credential(request))  # quarantined: refetch
    request[CACHE_OUTCOME] = source.cache
    if source.relay is not None:  # streamed from the zone's owner of the digest (mirror.zone)
        return await source.relay.send(request, web.StreamResponse(headers=_blob_headers(digest)))
    if source.fetch is not None and "Range" in request.headers:
        source = await _after_commit(node, repo, source, _credential(request))
    if source.fd is not None:
        return _send_stored(request, source, node.quota.hold(digest))  # never evicted while read
    assert source.fetch is not None
    response = web.StreamResponse(headers=_blob_headers(digest))
    if source.size is not None:
        response.content_length = source.size
    release = node.quota.hold(digest)
    try:
        return await stream_fetch(request, response, source.fetch, node.store, node.executor)
    finally:
        release()
        if source.fetch.committed:  # hashed as it was written: its first stored serve needs no hash
            node.integrity.remember(digest)


async def _after_commit(node: Node, repo: str, source: BlobSource, credential: Credential) -> BlobSource:
    """A Range on a blob still in flight waits for the verified object (cut if upstream stalls).

    Reopening it carries the same client's credential: a fetch that failed
    or went uncached is retried as that client, never as the node.
    """
    assert source.fetch is not None
    if source.size is not None:
        await source.fetch.readable(source.size)  # the whole blob, committed; raises on a stall
    await source.fetch.done.wait()
    if source.fetch.error is not None:
        raise source.fetch.error
    return await node.blobs.open(repo, source.digest, credential)


async def _verified_first(request: web.Request, node: Node, source: BlobSource) -> bool:
    """Hash a stored blob before sending when a mismatch could still be hidden.

    The first time this process serves an object it hashes it (bit rot keeps
    size and mtime). A range, or a blob of at most `HOLD_BACK` bytes, is
    hashed whole before anything is sent, so a corrupt one is quarantined and
    refetched within the same request; a larger whole blob is hashed while it
    is sent (`SendfileResponse`). Ranges of a large unverified blob therefore
    wait for one full hash (about a second per GB), once per process.

    Returns:
        False when the object was corrupt: it is quarantined, `source.fd` closed.
    """
    assert source.fd is not None and source.size is not None
    if node.integrity.is_verified(source.digest):
        return True
    if "Range" not in request.headers and source.size > HOLD_BACK:
        return True  # verified while sent
    try:
        matches = await node.integrity.check(source.digest, source.fd)
    except BaseException:
        os.close(source.fd)
        raise
    if not matches:
        os.close(source.fd)
    return matches


def _send_stored(request: web.Request, source: BlobSource, release: Callable[[], None]) -> web.StreamResponse:
    assert source.fd is not None and source.size is not None
    headers = _blob_headers(source.digest)
    try:
        byte_range = parse_range(request.headers.get("Range"), source.size)
    except errors.RegistryError:
        os.close(source.fd)
        release()
        raise
    integrity = _node(request).integrity
    if byte_range is None:
        verification = None
        if not integrity.is_verified(source.digest):  # first serve here: hashed while sent
            verification = integrity.check(source.digest, source.fd)
        return SendfileResponse(source.fd, 0, source.size, release, verification, headers=headers)
    headers["Content-Range"] = byte_range.content_range(source.size)
    return SendfileResponse(source.fd, byte_range.start, byte_range.length, release, status=206,
                            headers=headers)


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": BLOB_CACHE_CONTROL,
    }


HANDLERS = {"catalog": catalog, "tags": tags_list, "manifest": manifest, "blob": blob}
