"""The node: every long-lived part, built from settings and wired once."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mirror.auth.controller import AccessController, build_access
from mirror.config import Settings
from mirror.observe.metrics import Metrics
from mirror.ops import Operations
from mirror.proxy.blobs import Blobs
from mirror.proxy.fetcher import Fetcher
from mirror.proxy.manifests import Manifests
from mirror.proxy.negative import NegativeCache
from mirror.proxy.tags import TagLists
from mirror.proxy.uploads import Uploads
from mirror.storage.blobstore import BlobStore
from mirror.storage.metadata import Metadata
from mirror.storage.quota import Quota
from mirror.storage.scrub import Integrity, Scrubber
from mirror.upstream.client import Upstream

log = logging.getLogger(__name__)

DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})


@dataclass
class Node:
    """Everything a request handler may need, owned by the application."""

    settings: Settings
    store: BlobStore
    metadata: Metadata
    upstream: Upstream
    executor: ThreadPoolExecutor
    fetcher: Fetcher
    blobs: Blobs
    manifests: Manifests
    tags: TagLists
    access: AccessController
    metrics: Metrics
    uploads: Uploads
    ops: Operations = field(init=False, repr=False)  # prewarm, notifications, keep-fresh
    quota: Quota = field(init=False, repr=False)  # disk quota, eviction, pins, open readers
    integrity: Integrity = field(init=False, repr=False)  # objects hashed on first serve, corrupt ones
    scrubber: Scrubber = field(init=False, repr=False)  # the paced background re-hash of the store

    @property
    def namespaces(self) -> frozenset[str]:
        """The `?ns=` values (containerd) that name our upstream."""
        host = urlsplit(self.upstream.base_url).netloc.lower()
        names = {host, host.split(":")[0] if host.endswith((":443", ":80")) else host}
        if host.split(":")[0] in DOCKER_HUB_HOSTS:
            names |= DOCKER_HUB_HOSTS
        return frozenset(names)


async def open_node(settings: Settings, transport: object = None) -> Node:
    """Open the store and metadata, sweep leftovers, build the services."""
    store = BlobStore(settings.storage.root)
    store.open()
    metadata = Metadata(settings.metadata_dir / "metadata.sqlite")
    await metadata.open()
    mirror = settings.mirror
    upstream = Upstream(settings.proxy.remoteurl, settings.proxy.username, settings.proxy.password,
                        mirror.upstream, transport=transport)  # type: ignore[arg-type]
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store")
    negative = NegativeCache(mirror.negative_ttl)
    blobs = Blobs(store, metadata, upstream, executor, negative, retries=mirror.upstream.retries)
    manifests = Manifests(store, metadata, upstream, executor, negative, tag_ttl=mirror.tag_ttl,
                          tag_max_stale=mirror.tag_max_stale, max_size=mirror.manifest_max_size)
    tags = TagLists(metadata, upstream, mirror.tag_ttl)
    access = build_access(settings, upstream)
    metrics = Metrics()
    metrics.track_inflight(lambda: len(blobs.fetcher.inflight))
    upstream.observe(metrics)
    blobs.fetcher.metrics = metrics
    manifests.metrics = metrics
    quota = Quota(settings, store, metadata, executor, metrics, blobs.fetcher)
    blobs.fetcher.quota = quota
    await quota.start()  # usage, space reserve; flushes access times, repairs metadata in the background
    node = Node(settings, store, metadata, upstream, executor, blobs.fetcher, blobs, manifests, tags,
                access, metrics, Uploads(store, executor))
    node.quota = quota
    node.integrity = Integrity(store, metadata, executor, metrics)
    node.scrubber = Scrubber(store, node.integrity, metrics, mirror.scrub.interval,
                             busy=lambda: node.integrity.busy or bool(blobs.fetcher.inflight))
    node.scrubber.start()
    node.ops = Operations(node)
    node.ops.start()
    return node


async def close_node(node: Node) -> None:
    """Stop fetches, close the pool, flush metadata, release the store."""
    await node.ops.close()
    await node.scrubber.close()
    await node.fetcher.close()
    await node.manifests.close()  # revalidations and fills still retrying in the background
    await node.tags.close()
    await node.quota.close()
    await node.upstream.aclose()
    await node.metadata.close()
    node.executor.shutdown(wait=True)
    node.store.close()
