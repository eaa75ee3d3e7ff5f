"""Manifests: by digest from the store, by tag through a revalidated tag cache.

Digests are immutable and never revalidated. A tag is answered from cache
within `mirror.tag_ttl`; after it, one coalesced `HEAD` upstream revalidates
it however many requests arrive meanwhile, and a GET follows only when the
digest moved. When upstream is unreachable, slow, or answers 5xx/429, the
cached tag is served stale (logged) up to `mirror.tag_max_stale`; after a
401, 403 or 404 it is dropped and never served stale. Stale means at once:
the first failed attempt answers every waiting request with the cached tag,
and the revalidation's retries go on in the background (requests meanwhile
are answered stale without waiting for them).

A client waits for upstream at most `mirror.upstream.read_timeout`
(:mod:`mirror.proxy.waits`); the fetch it waited for goes on without it.

Negotiation is local, per request, over one object per digest and one
tag -> (digest, media type) per repository, as distribution does it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mirror import errors
from mirror.observe.metrics import Metrics
from mirror.proxy.hot import HotManifests
from mirror.proxy.negative import NOT_FOUND, NegativeCache
from mirror.proxy.singleflight import SingleFlight
from mirror.proxy.taglocks import TagLocks
from mirror.proxy.waits import Refreshes, within
from mirror.registry import manifest as manifests
from mirror.registry import mediatypes
from mirror.registry.digest import Digest
from mirror.registry.reference import Reference, Tag
from mirror.storage.blobstore import BlobStore
from mirror.storage.metadata import Metadata, TagRecord
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential

log = logging.getLogger(__name__)

STALE_WAIT = 3.0  # how long a request waits on a revalidation before taking the stale tag
REVOKED = (errors.Unauthorized, errors.Denied, *NOT_FOUND)
TRANSIENT = (errors.Unavailable, errors.TooManyRequests)
DEFAULT_PLATFORM = manifests.Platform("linux", "amd64")
#: A repository's (tag_ttl, tag_max_stale), from the registry owning it.
TagPolicy = Callable[[str], tuple[float, float]]


@dataclass(frozen=True, slots=True)
class ManifestResult:
    """A manifest ready to serve, with how it was obtained."""

    raw: bytes
    media_type: str
    digest: Digest
    cache: str = "hit"
    fetched_at: float | None = None  # for tags: when upstream last confirmed it
    age: float = 0.0  # for a fresh upstream fetch: the age upstream reported


class Manifests:
    """Manifest lookups for the read API.

    Args:
        tag_policy: (tag_ttl, tag_max_stale) of the registry owning a
            repository (mirror.upstreams overrides); None: the defaults given.
        tag_locks: one revalidation per tag across worker processes sharing
            the metadata (mirror.workers); None: a lone process.
    """

    def __init__(self, store: BlobStore, metadata: Metadata, upstream: Upstream,
                 executor: ThreadPoolExecutor, negative: NegativeCache, *,
                 tag_ttl: float, tag_max_stale: float, max_size: int, metrics: Metrics,
                 tag_policy: TagPolicy | None = None, tag_locks: TagLocks | None = None) -> None:
        self.store = store
        self.metadata = metadata
        self.upstream = upstream
        self.executor = executor
        self.negative = negative
        self.tag_ttl = tag_ttl
        self.tag_max_stale = tag_max_stale
        self.max_size = max_size
        self._flight: SingleFlight[Any] = SingleFlight()
        self._refreshes: Refreshes[TagRecord] = Refreshes()  # tag revalidations
        self.metrics = metrics
        self.hot = HotManifests(recheck=tag_ttl)  # verified bytes: a warm hit needs no thread hop
        self.tag_locks = tag_locks
        self.tag_policy: TagPolicy = tag_policy or (lambda _repo: (tag_ttl, tag_max_stale))

    def _bound(self, repo: str) -> float:
        """How long a client waits on the registry owning `repo` (its read_timeout); work goes on."""
        return self.upstream.read_timeout_of(repo)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def get(self, repo: str, reference: Reference, accepted: frozenset[str],
                  credential: Credential) -> ManifestResult:
        """The manifest to answer for this request, negotiated on `accepted`.

        Raises:
            ManifestUnknown: unknown upstream, or not acceptable to the client
                (an OCI type it did not ask for).
        """
        if isinstance(reference, Tag):
            result = await self.by_tag(repo, reference.value, credential)
        else:
            result = await self.by_digest(repo, reference, credential)
        if (isinstance(reference, Tag) and result.media_type == mediatypes.DOCKER_MANIFEST_LIST
                and not mediatypes.accepts(accepted, result.media_type)):
            result = await self._platform_child(repo, result, credential)
        if result.media_type in mediatypes.OCI_TYPES and not mediatypes.accepts(accepted, result.media_type):
            raise errors.ManifestUnknown(
                "OCI manifest found, but the Accept header does not support OCI manifests",
                detail={"mediaType": result.media_type})
        return result

    async def _platform_child(self, repo: str, result: ManifestResult,
                              credential: Credential) -> ManifestResult:
        """A manifest list for a schema2-only client: its linux/amd64 image."""
        child = manifests.parse(result.raw, result.media_type).child_for(DEFAULT_PLATFORM)
        if child is None:
            raise errors.ManifestUnknown("manifest list has no linux/amd64 image for this client")
        return await self.by_digest(repo, child.digest, credential)

    # -- by digest ------------------------------------------------------------

    async def by_digest(self, repo: str, digest: Digest, credential: Credential) -> ManifestResult:
        """A manifest by digest: from the store if linked, else fetched once."""
        local = await self._load(repo, digest)
        if local is not None:
            return local
        await self._refuse_a_held_blob(digest)
        self.negative.check(("manifest", repo, digest))
        return await within(self._flight.run(("get", repo, str(digest)),
                                             lambda: self._fetch(repo, str(digest), credential)),
                            self._bound(repo))

    async def _refuse_a_held_blob(self, digest: Digest) -> None:
        """A digest stored here as a blob (a layer, a config) is no manifest.

        distribution answers a blob's digest on the manifests route with a
        500, which would reach the client as a 503 after retries; the bytes
        here already say it is not a manifest.

        Raises:
            ManifestUnknown: `digest` is a blob this node holds.
        """
        record = await self.metadata.get_object(digest)
        if record is None or record.media_type is not None:
            return
        raw = await self._io(self.store.read, digest, record.size) if record.size <= self.max_size else None
        if not _may_be_manifest(raw):  # else (adopted at start-up, pushed as a blob too): ask upstream
            raise errors.ManifestUnknown(detail={"digest": str(digest)})

    async def _load(self, repo: str, digest: Digest, *, linked_only: bool = True) -> ManifestResult | None:
        """A stored manifest: from memory while hot, else read and re-hashed (bit rot).

        The metadata is asked first either way (its in-process maps answer a
        warm lookup without a thread hop), so whatever this process forgot,
        unlinked or quarantined is never answered from memory.
        """
        record = await self.metadata.get_object(digest)
        if record is None or record.media_type is None:
            self.hot.discard(digest)
            return None
        if linked_only and not await self.metadata.is_linked(repo, digest):
            return None
        raw = self.hot.get(digest)
        if raw is None:
            raw = await self._read_verified(digest, record.size)
            if raw is None:
                return None
        self.metadata.touch(digest)
        return ManifestResult(raw, record.media_type, digest)

    async def _read_verified(self, digest: Digest, size: int) -> bytes | None:
        """The stored bytes if they hash to `digest` (kept hot), else forgotten/quarantined."""
        raw = await self._io(self.store.read, digest, size)
        if raw is None:
            await self.metadata.forget_object(digest)
            return None
        if Digest.of(raw, digest.algorithm) != digest:
            log.error("stored manifest %s is corrupt: quarantined", digest)
            await self._io(self.store.quarantine, digest)
            await self.metadata.forget_object(digest)
            return None
        self.hot.put(digest, raw)
        return raw

    async def _fetch(self, repo: str, reference: str, credential: Credential) -> ManifestResult:
        """GET from upstream, store, link; 404s remembered briefly."""
        try:
            fetched = await self.upstream.get_manifest(repo, reference, self.max_size, credential)
        except NOT_FOUND as exc:
            key = ("manifest", repo, Digest.parse(reference)) if ":" in reference else ("tag", repo, reference)
            self.negative.remember(key, exc)
            raise
        await self.put(repo, fetched.digest, fetched.raw, fetched.media_type)
        cache = getattr(fetched, "cache", "miss")  # "hit": a zone peer's store answered (mirror.zone)
        return ManifestResult(fetched.raw, fetched.media_type, fetched.digest, cache=cache, age=fetched.age)

    async def put(self, repo: str, digest: Digest, raw: bytes, media_type: str) -> None:
        """Store a verified manifest and link it to `repo`."""
        if await self.metadata.get_object(digest) is None or await self._io(self.store.size, digest) is None:
            await self._io(self.store.put_bytes, digest, raw)
        await self.metadata.put_object(digest, len(raw), media_type)
        await self.metadata.link(repo, digest)
        self.hot.put(digest, raw)  # `raw` hashed to `digest` upstream-side (fetch) or by the writer

    # -- by tag -------------------------------------------------------------

    async def by_tag(self, repo: str, tag: str, credential: Credential) -> ManifestResult:
        """A manifest by tag, fresh within the TTL, revalidated after it."""
        record = await self.metadata.get_tag(repo, tag)
        if record is None:
            self.negative.check(("tag", repo, tag))
            return await within(self._flight.run(("tag", repo, tag),
                                                 lambda: self._fetch_tag(repo, tag, credential)),
                                self._bound(repo))
        cache = "hit"
        if time.time() - record.fetched_at >= self.tag_policy(repo)[0]:
            record, cache = await self._revalidated(repo, tag, record, credential)
        result = await self._load(repo, record.digest)
        if result is None:  # evicted or corrupt: refetch by the immutable digest
            result = await self.by_digest(repo, record.digest, credential)
            cache = result.cache
        return ManifestResult(result.raw, result.media_type, result.digest, cache=cache,
                              fetched_at=record.fetched_at)

    async def _fetch_tag(self, repo: str, tag: str, credential: Credential) -> ManifestResult:
        result = await self._fetch(repo, tag, credential)
        confirmed = time.time() - result.age
        await self.metadata.put_tag(repo, tag, TagRecord(result.digest, result.media_type, confirmed))
        return ManifestResult(result.raw, result.media_type, result.digest, cache="miss", fetched_at=confirmed)

    async def _revalidated(self, repo: str, tag: str, record: TagRecord,
                           credential: Credential) -> tuple[TagRecord, str]:
        """The tag after one coalesced revalidation, or stale when allowed.

        Within the stale window a request waits for the revalidation's first
        attempt only (at most STALE_WAIT); its retries run on in the
        background. Past the window there is nothing to serve instead, so the
        request waits for the retries, up to the client's bound.

        Returns:
            The record to serve, and the cache outcome (`revalidated`/`stale`).
        """
        stale_ok = time.time() - record.fetched_at <= sum(self.tag_policy(repo))
        try:
            revalidated = await self._refreshes.run(
                ("head", repo, tag), lambda: self._revalidate(repo, tag, record, credential),
                fallback=stale_ok, patience=STALE_WAIT, bound=self._bound(repo))
            return revalidated, "revalidated"
        except (*TRANSIENT, TimeoutError) as exc:
            if not stale_ok:
                raise
            log.warning("serving stale tag %s:%s (%s)", repo, tag, getattr(exc, "code", "slow upstream"))
            self.metrics.stale_tags.inc()
            return record, "stale"

    async def _revalidate(self, repo: str, tag: str, record: TagRecord,
                          credential: Credential) -> TagRecord:
        if self.tag_locks is None:
            return await self._revalidate_now(repo, tag, record, credential)
        async with self.tag_locks.hold(repo, tag):  # one HEAD per tag per expiry per node
            stored = await self.metadata.reload_tag(repo, tag)
            if stored is not None and time.time() - stored.fetched_at < self.tag_ttl:
                return stored  # another worker revalidated it meanwhile
            return await self._revalidate_now(repo, tag, stored or record, credential)

    async def _revalidate_now(self, repo: str, tag: str, record: TagRecord,
                              credential: Credential) -> TagRecord:
        try:
            head = await self.upstream.head_manifest(repo, tag, credential)
            confirmed = time.time() - head.age
            if head.digest != record.digest:
                fetched = await self.by_digest(repo, head.digest, credential)
                record = TagRecord(fetched.digest, fetched.media_type, confirmed)
            else:
                record = TagRecord(record.digest, record.media_type, confirmed)
        except REVOKED:
            await self.metadata.delete_tag(repo, tag)  # here: also when no client waits any more
            raise
        await self.metadata.put_tag(repo, tag, record)
        return record

    async def close(self) -> None:
        """Stop fetches and revalidations no client waits for any more (shutdown)."""
        await self._refreshes.close()
        await self._flight.cancel_all()

    async def set_tag(self, repo: str, tag: str, digest: Digest, media_type: str) -> None:
        """Point a tag now (a push through this node, a notification)."""
        await self.metadata.put_tag(repo, tag, TagRecord(digest, media_type, time.time()))
        self.negative.forget(("tag", repo, tag))


def _may_be_manifest(raw: bytes | None) -> bool:
    """True for a JSON object with `schemaVersion` 2, which every manifest and index has."""
    try:
        return raw is not None and json.loads(raw).get("schemaVersion") == 2
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return False
