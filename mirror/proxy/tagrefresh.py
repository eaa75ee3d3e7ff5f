"""Refreshing a tag on request: HEAD upstream, fetch what moved, then point the tag.

A pull revalidates a tag once its `tag_ttl` has passed (:mod:`mirror.proxy.manifests`);
a refresh does it now, for a push notification (:mod:`mirror.ops.notify`) or
for keep-fresh's popular tags (:mod:`mirror.ops.popularity`), and also
fetches the new version before the tag points at it, so the first pull after
the move is already a hit. Fetching the new version (its manifests, and the
blobs of the platforms the node held of the old one) is the prewarm job
machinery's (`warm`, :meth:`mirror.ops.prewarm.Warmer.warm_digest`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from mirror import errors
from mirror.proxy.manifests import Manifests
from mirror.proxy.negative import NOT_FOUND
from mirror.registry import manifest
from mirror.registry.digest import Digest
from mirror.storage.metadata import Metadata
from mirror.upstream.credential import Credential
from mirror.upstream.registries import Registries

log = logging.getLogger(__name__)


class Warm(Protocol):
    """Fetch a manifest by digest and what it needs; the result lists its `errors`."""

    async def __call__(self, repo: str, digest: Digest, platforms: list[manifest.Platform] | None,
                       *, blobs: bool) -> Any: ...


class TagRefresher:
    """Re-resolves tags upstream with the node's own account, as background work does."""

    def __init__(self, manifests: Manifests, metadata: Metadata, upstream: Registries, warm: Warm) -> None:
        self.manifests = manifests
        self.metadata = metadata
        self.upstream = upstream
        self.warm = warm

    async def warmed_platforms(self, repo: str, digest: Digest | None) -> list[manifest.Platform] | None:
        """The platforms of `digest` (an index) this node holds: what to warm of its successor.

        None (warm every platform) when the old version is unknown or not an index.
        """
        if digest is None:
            return None
        record = await self.metadata.get_object(digest)
        if record is None or record.media_type is None:
            return None
        try:
            old = await self.manifests.by_digest(repo, digest, Credential.node())
            parsed = manifest.parse(old.raw, old.media_type)
        except (errors.RegistryError, ValueError):
            return None
        if not parsed.is_index:
            return None
        held = []
        for child in parsed.children:
            if child.platform is not None and await self.metadata.get_object(child.digest) is not None:
                held.append(child.platform)
        return held or None

    async def refresh(self, repo: str, tag: str, *, expect: Digest | None = None,
                          settle: float = 0.0, warm: bool = True) -> dict[str, Any]:
        """Re-resolve a tag upstream (HEAD); fetch what moved, then point the tag.

        Args:
            expect: a digest the tag is said to have moved to (a push
                event). Upstream may not show it yet (distribution sends the
                event before it moves the tag), so HEADs are retried for up to
                `settle` seconds until upstream shows `expect` or anything
                other than the digest cached before.
            warm: fetch the new version's blobs too, not only its manifests
                (an index's children: the platforms of the old version this
                node held, all platforms if unknown).

        Returns:
            What happened: `{"digest", "previous", "changed"}`.
        """
        record = await self.metadata.get_tag(repo, tag)
        previous = record.digest if record is not None else None
        deadline = time.monotonic() + settle
        delay = 0.1
        while True:
            try:
                head = await self.upstream.head_manifest(repo, tag, Credential.node())
            except NOT_FOUND:  # a new tag may not be there yet either
                head = None
            settled = head is not None and (expect is None or head.digest == expect
                                            or (previous is not None and head.digest != previous))
            if settled or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        if head is None:
            if record is not None:
                await self.metadata.delete_tag(repo, tag)
            return {"digest": None, "previous": str(previous) if previous else None,
                    "changed": record is not None}
        digest = head.digest
        if digest == previous:
            assert record is not None
            await self.manifests.set_tag(repo, tag, digest, record.media_type)
            return {"digest": str(digest), "previous": str(previous), "changed": False}
        platforms = await self.warmed_platforms(repo, previous)
        result = await self.manifests.by_digest(repo, digest, Credential.node())
        job = await self.warm(repo, digest, platforms, blobs=warm)
        if job.errors:
            log.warning("prefetch of %s@%s: %s", repo, digest, job.errors)
        await self.manifests.set_tag(repo, tag, digest, result.media_type)
        log.info("tag %s:%s now %s (was %s)", repo, tag, digest, previous)
        return {"digest": str(digest), "previous": str(previous) if previous else None, "changed": True}
