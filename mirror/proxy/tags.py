"""Tag lists: asked of upstream (whole, then paginated locally), cached as a fallback.

As for tags, a cached list is served as soon as a refresh's first attempt
fails; the refresh retries in the background (:class:`~mirror.proxy.waits.Refreshes`).
"""

from __future__ import annotations

import bisect
import logging
import time

from mirror.proxy.manifests import REVOKED, STALE_WAIT, TRANSIENT
from mirror.proxy.waits import Refreshes
from mirror.storage.metadata import Metadata
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential

log = logging.getLogger(__name__)


class TagLists:
    """`tags/list` for the read API: fresh within the tag TTL, else upstream."""

    def __init__(self, metadata: Metadata, upstream: Upstream, tag_ttl: float) -> None:
        self.metadata = metadata
        self.upstream = upstream
        self.tag_ttl = tag_ttl
        self._refreshes: Refreshes[list[str]] = Refreshes()

    def _bound(self, repo: str) -> float:
        """How long a client waits on the registry owning `repo` (its read_timeout); work goes on."""
        return self.upstream.read_timeout_of(repo)

    async def list(self, repo: str, credential: Credential) -> list[str]:
        """Every tag of `repo`, sorted as distribution sorts them.

        Raises:
            NameUnknown: upstream does not know the repository.
            RegistryError: upstream is down and nothing is cached.
        """
        cached = await self.metadata.get_tag_list(repo)
        if cached is not None and time.time() - cached[1] < self.tag_ttl:
            return cached[0]
        try:
            tags = await self._refreshes.run(repo, lambda: self._fetch(repo, credential),
                                             fallback=cached is not None, patience=STALE_WAIT,
                                             bound=self._bound(repo))
        except (*TRANSIENT, TimeoutError):
            if cached is None:
                raise
            log.warning("serving cached tag list of %s: upstream unavailable", repo)
            return cached[0]
        except REVOKED:
            raise
        return tags

    async def close(self) -> None:
        """Stop refreshes still retrying in the background (shutdown)."""
        await self._refreshes.close()

    async def _fetch(self, repo: str, credential: Credential) -> list[str]:
        tags = sorted(set(await self.upstream.list_tags(repo, credential)))
        await self.metadata.put_tag_list(repo, tags)
        return tags


def paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """Distribution's `n`/`last` pagination over a sorted list.

    Returns:
        The page, and whether more entries follow (a `Link` is due).
    """
    start = 0
    if last:
        start = bisect.bisect_right(items, last)
    if n is None:
        return items[start:], False
    page = items[start:start + n]
    return page, bool(page) and start + n < len(items)  # n=0: an empty page, no Link (as distribution)

