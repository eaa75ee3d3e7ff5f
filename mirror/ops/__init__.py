"""Operating the cache: prewarm, notifications in and out, popular tags kept warm.

:class:`Operations` is built once per node (`node.ops`) and owns the
background parts: the prewarm jobs (:mod:`.prewarm`), the push-notification
receiver (:mod:`.notify`), the pull-event sinks (:mod:`.events`) and the pull
counts with the keep-fresh loop (:mod:`.popularity`). The manifest handler
reports every manifest it serves through :meth:`Operations.manifest_served`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from urllib.parse import urlsplit
from typing import TYPE_CHECKING

from aiohttp import web

from mirror.ops.events import PullEvents, source
from mirror.ops.notify import Notifications
from mirror.ops.popularity import HAND_OFF_INTERVAL, KeepFresh, Popularity
from mirror.ops.prewarm import Warmer
from mirror.proxy.tagrefresh import TagRefresher
from mirror.registry.digest import Digest
from mirror.registry.reference import Tag
from mirror.storage.pins import PinKey, Pins
from mirror.web.external import client_address, external_base

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from mirror.config import Settings
    from mirror.observe.metrics import Metrics
    from mirror.proxy.blobs import Blobs
    from mirror.proxy.manifests import ManifestResult, Manifests
    from mirror.storage.blobstore import BlobStore
    from mirror.storage.metadata import Metadata
    from mirror.upstream.registries import Registries

log = logging.getLogger(__name__)

#: Cache outcomes for which a pull event is sent: upstream did not see a GET.
EVENT_OUTCOMES = frozenset({"hit", "revalidated", "stale"})
#: Seconds queued pull events get to be delivered at shutdown (inside cli.FLUSH_BUDGET).
EVENTS_FLUSH = 2.0


class Operations:
    """The node's operator-facing background services."""

    def __init__(self, settings: Settings, *, upstream: Registries, metadata: Metadata, store: BlobStore,
                 executor: ThreadPoolExecutor, blobs: Blobs, manifests: Manifests, metrics: Metrics) -> None:
        self.settings = settings
        self.upstream = upstream
        self.instance_id = str(uuid.uuid4())
        self.registry = urlsplit(upstream.base_url).netloc.lower()
        self.pins = Pins(metadata)
        self.warmer = Warmer(settings, upstream, metadata, store, executor, blobs, manifests, pin=self.pin)
        self.jobs = self.warmer.jobs
        self.refresher = TagRefresher(manifests, metadata, upstream, self.warmer.warm_digest)
        self.notifications = Notifications(settings, metadata, manifests, self.warmer, self.refresher)
        self.events = PullEvents(settings.notifications, source(settings.http.bind, self.instance_id),
                                 metrics.registry, settings.metadata_dir / "events")
        self.popularity = Popularity(settings.metadata_dir / "popularity.json")
        prefetch = settings.mirror.prefetch
        self.keep_fresh = KeepFresh(self.popularity, prefetch.keep_fresh, prefetch.interval,
                                    self.refresher.refresh)
        self._hand_off: asyncio.Task[None] | None = None  # a non-leader worker's pull counts to the leader

    def start(self, leader: bool = True, shared: bool = False) -> None:
        """Start the background loops (inside the running event loop).

        Args:
            leader: this process runs the node's single-instance loops (resumed
                prewarm jobs, event delivery, keep-fresh); other workers only
                queue their pull events and pull counts on disk for it.
            shared: worker processes serve this node (`mirror.workers`).
        """
        if shared:
            self.popularity.share(self.settings.metadata_dir / "popularity-inbox", leader)
        self.popularity.load()
        if not leader:
            self._hand_off = asyncio.create_task(self._hand_off_forever(), name="popularity-hand-off")
            return
        self.warmer.resume()
        self.events.start()
        self.keep_fresh.start()

    async def _hand_off_forever(self) -> None:
        while True:
            await asyncio.sleep(HAND_OFF_INTERVAL)
            try:
                await asyncio.to_thread(self.popularity.hand_off)
            except Exception:  # noqa: BLE001 - counts are best effort; serving goes on
                log.exception("could not hand pull counts to the leader")

    async def close(self) -> None:
        if self._hand_off is not None:
            self._hand_off.cancel()
            await asyncio.gather(self._hand_off, return_exceptions=True)
        await self.keep_fresh.close()
        await self.notifications.close()
        await self.jobs.close()
        self.popularity.save()  # before anything that may be slow: the pull counts come first
        await self.events.close(flush=EVENTS_FLUSH)

    # -- the manifest handler's hook ---------------------------------------------

    def manifest_served(self, request: web.Request, repo: str, reference: Tag | Digest,
                        result: ManifestResult) -> None:
        """Count a pull by tag; send a pull event for a GET upstream did not see."""
        tag = reference.value if isinstance(reference, Tag) else None
        if tag is not None:
            self.popularity.record(repo, tag)
        if request.method != "GET" or not self.events.enabled or result.cache not in EVENT_OUTCOMES:
            return
        try:
            self.events.pulled(repository=repo, digest=str(result.digest), media_type=result.media_type,
                               size=len(result.raw), tag=tag, url=self._url(request, repo, result),
                               request=self._request(request))
        except Exception:  # never fail a pull over its notification
            log.exception("could not queue a pull event")

    def _url(self, request: web.Request, repo: str, result: ManifestResult) -> str:
        mirror = self.settings.mirror
        base = external_base(request, self.settings.http.host, mirror.trusted_proxies)
        return f"{base}/v2/{repo}/manifests/{result.digest}"

    def _request(self, request: web.Request) -> dict[str, str]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        addr = client_address(request, self.settings.mirror.trusted_proxies)
        if peer and addr == str(peer[0]):
            addr = f"{peer[0]}:{peer[1]}"
        return {
            "id": request.headers.get("X-Request-Id", "")[:64] or str(uuid.uuid4()),
            "addr": addr,
            "host": request.host,
            "method": request.method,
            "useragent": request.headers.get("User-Agent", ""),
        }

    # -- pins (mirror.storage.pins; eviction skips what a pin holds) -----------------------

    def pin_key(self, repo: str, reference: str) -> PinKey:
        """The pin of `repo:reference` (a node repository key) on the registry owning it."""
        registry, name = self.upstream.display(repo)
        return PinKey(registry, name, reference)

    async def pin(self, repo: str, reference: str, digest: Digest, objects: list[Digest]) -> None:
        """Pin one image (prewarm --pin) with the objects it is made of."""
        count = await self.pins.pin(self.pin_key(repo, reference), digest, objects)
        log.info("pinned %s (%d objects)", self.pin_key(repo, reference), count)

    async def unpin(self, repo: str, reference: str) -> list[dict[str, object]]:
        """Unpin the pins of `repo` named by `reference`; what other pins share stays pinned."""
        key = self.pin_key(repo, reference)
        removed = await self.pins.unpin(key.registry, key.repo, reference)
        for entry in removed:
            log.info("unpinned %s: %d objects released, %d still pinned by other images", entry["pin"],
                     len(entry["released"]), len(entry["kept"]))
        return removed
