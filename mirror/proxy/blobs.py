"""Blobs: served from the store when linked to the repository, else fetched once.

A client waits for upstream's answer at most `mirror.upstream.read_timeout`
(:mod:`mirror.proxy.waits`), however many retries the fetch makes meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mirror.observe.metrics import Metrics
from mirror.proxy.fetcher import BlobFetch, Fetcher
from mirror.proxy.negative import NOT_FOUND, NegativeCache
from mirror.proxy.waits import within
from mirror.registry.digest import Digest
from mirror.storage.blobstore import BlobStore
from mirror.storage.metadata import Metadata
from mirror.storage.quota import Quota
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BlobSource:
    """Where a blob response reads from: an open stored object or a fetch."""

    digest: Digest
    size: int | None
    fd: int | None = None
    fetch: BlobFetch | None = None
    cache: str = "hit"
    relay: Any = None  # a zone owner's stream (mirror.zone.relay.PeerRelay): neither fd nor fetch


class Blobs:
    """Blob lookups for the read API.

    A stored blob is served under repository R only when (R, digest) is
    linked: it was fetched through R, or upstream confirmed R holds it. That
    is what keeps a digest guessed through one repository from reading
    another's content.
    """

    def __init__(self, store: BlobStore, metadata: Metadata, upstream: Upstream,
                 executor: ThreadPoolExecutor, negative: NegativeCache, *, quota: Quota,
                 metrics: Metrics, shared: bool = False, source: Any = None, zone: Any = None) -> None:
        """`shared`: worker processes share the store (mirror.workers); see :class:`Fetcher`.
        `source`: where fills read blob bodies (default `upstream`; in a zone the owner, a peer
        holding it, else the link); `zone`: a miss another node owns is streamed from it."""
        self.store = store
        self.metadata = metadata
        self.fetcher = Fetcher(store, upstream if source is None else source, executor, on_commit=self.on_commit,
                               confirm=self.ensure_linked,  # a fill through another repository
                               quota=quota, metrics=metrics, shared=shared)
        self.upstream = upstream
        self.executor = executor
        self.negative = negative
        self.zone = zone  # mirror.zone.routing.Zone or None (alone)

    def _bound(self, repo: str) -> float:
        """How long a client waits on the registry owning `repo` (its read_timeout); work goes on."""
        return self.upstream.read_timeout_of(repo)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def open(self, repo: str, digest: Digest, credential: Credential) -> BlobSource:
        """Open a blob for a GET: stored, joined in flight, or fetched now.

        Raises:
            BlobUnknown: upstream does not have it in `repo`.
            RegistryError: upstream failures, mapped.
        """
        local = await self._open_local(repo, digest, credential)
        if local is not None:
            return local
        fetch = self.fetcher.get(digest)
        if fetch is None and self.zone is not None:
            routed = await self.zone.open_blob(repo, digest, credential, self.fetcher)  # another node owns it
            if routed is not None:
                return routed
        if fetch is not None and fetch.repo != repo:
            await self.ensure_linked(repo, digest, credential)
        self.negative.check(("blob", repo, digest))
        cache = "coalesced" if fetch is not None else "miss"
        fetch = self.fetcher.start(repo, digest, credential)  # joins (and offers the token)
        try:
            size = await within(fetch.started(), self._bound(repo))  # the fetch goes on without us
        except NOT_FOUND as exc:
            self.negative.remember(("blob", repo, digest), exc)
            raise
        return BlobSource(digest, size, fetch=fetch, cache=cache)

    async def stat(self, repo: str, digest: Digest, credential: Credential) -> BlobSource:
        """Size of a blob for a HEAD, without starting a download."""
        record = await self.metadata.get_object(digest)
        if record is not None and await self.ensure_linked(repo, digest, credential):
            size = await self._io(self.store.size, digest)
            if size == record.size:
                return BlobSource(digest, size)
        fetch = self.fetcher.get(digest)
        if fetch is not None and fetch.repo == repo:
            return BlobSource(digest, await within(fetch.started(), self._bound(repo)), cache="coalesced")
        self.negative.check(("blob", repo, digest))
        if self.zone is not None:
            routed = await self.zone.stat_blob(repo, digest, credential)  # the owner knows it (mirror.zone)
            if routed is not None:
                return routed
        try:
            size = await within(self.upstream.head_blob(repo, digest, credential), self._bound(repo))
        except NOT_FOUND as exc:
            self.negative.remember(("blob", repo, digest), exc)
            raise
        return BlobSource(digest, size, cache="miss")

    async def _open_local(self, repo: str, digest: Digest, credential: Credential) -> BlobSource | None:
        record = await self.metadata.get_object(digest)
        size = record.size if record else await self._io(self.store.size, digest)
        if size is None:
            return None
        await self.ensure_linked(repo, digest, credential)
        opened = await self._io(self.store.open_object, digest, size)
        if opened is None:
            await self.metadata.forget_object(digest)
            return None
        if record is None:  # published by another process sharing the store
            await self.metadata.put_object(digest, opened[1], None)
        self.metadata.touch(digest)
        return BlobSource(digest, opened[1], fd=opened[0])

    async def ensure_linked(self, repo: str, digest: Digest, credential: Credential) -> bool:
        """Make sure `repo` may serve `digest`: linked, or confirmed upstream.

        Raises:
            BlobUnknown: upstream says `repo` does not hold `digest`.
        """
        if await self.metadata.is_linked(repo, digest):
            return True
        self.negative.check(("blob", repo, digest))
        try:
            await within(self.upstream.head_blob(repo, digest, credential), self._bound(repo))
        except NOT_FOUND as exc:
            self.negative.remember(("blob", repo, digest), exc)
            raise
        await self.metadata.link(repo, digest)
        return True

    async def on_commit(self, fetch: BlobFetch) -> None:
        """Record a blob the fetcher just published."""
        await self.metadata.put_object(fetch.digest, fetch.written, None)
        await self.metadata.link(fetch.repo, fetch.digest)
        self.metadata.touch(fetch.digest)
