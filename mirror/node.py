"""The node: every long-lived part, built from settings and wired once."""

from __future__ import annotations

import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

from mirror.auth.controller import AccessController, build_access
from mirror.config import Settings
from mirror.observe.metrics import Metrics
from mirror.ops import Operations
from mirror.proxy.blobs import Blobs
from mirror.proxy.fetcher import Fetcher
from mirror.proxy.manifests import Manifests
from mirror.proxy.negative import NegativeCache
from mirror.proxy.taglocks import TagLocks
from mirror.proxy.tags import TagLists
from mirror.proxy.uploads import Uploads
from mirror.storage.blobstore import BlobStore
from mirror.storage.metadata import Metadata
from mirror.storage.quota import Quota
from mirror.storage.scrub import Integrity, Scrubber
from mirror.upstream.client import Upstream
from mirror.upstream.registries import Registries, Registry, default_names
from mirror.workers import current_role, is_leader, link_share, worker_count
from mirror.zone.routing import Zone, ZoneSource, open_zone

log = logging.getLogger(__name__)

#: Distinct unknown `?ns=` values logged (each once); later ones are only counted.
UNKNOWN_NAMESPACES_LOGGED = 100


@dataclass
class Node:
    """Everything a request handler may need, owned by the application."""

    settings: Settings
    store: BlobStore
    metadata: Metadata
    upstream: Registries  # every upstream, routed by repository (mirror.upstream.registries)
    executor: ThreadPoolExecutor
    fetcher: Fetcher
    blobs: Blobs
    manifests: Manifests
    tags: TagLists
    access: AccessController
    metrics: Metrics
    uploads: Uploads
    quota: Quota = field(repr=False)  # disk quota, eviction, pins, open readers
    integrity: Integrity = field(repr=False)  # objects hashed on first serve, corrupt ones
    scrubber: Scrubber = field(repr=False)  # the paced background re-hash of the store
    ops: Operations = field(repr=False)  # prewarm, notifications, pull events, keep-fresh
    zone: Zone | None = field(default=None, repr=False)  # the zone's view and routing; None = alone
    draining: bool = field(default=False, init=False)  # SIGTERM received: readiness answers 503
    unknown_namespaces: set[str] = field(default_factory=set, init=False, repr=False)  # logged once

    @property
    def namespaces(self) -> frozenset[str]:
        """The `?ns=` values (containerd) that name our upstream, with `mirror.names`."""
        return default_names(self.upstream.base_url, self.settings.mirror.names)

    def serves_namespace(self, ns: str) -> bool:
        """Whether `?ns=ns` names our upstream; an unknown value is counted, and logged once.

        containerd quietly moves on to its next host (across the link) on our
        404, so an operator who forgot `mirror.names` needs the log to say why.
        """
        if ns.lower() in self.namespaces or self.upstream.named(ns) is not None:
            return True
        self.metrics.unknown_namespaces.inc()
        seen = ns[:100].lower()
        if seen not in self.unknown_namespaces and len(self.unknown_namespaces) < UNKNOWN_NAMESPACES_LOGGED:
            self.unknown_namespaces.add(seen)
            log.warning("a client asked for registry %r (?ns=), which is not this node's upstream %s: "
                        "answered 404; add it to mirror.names if it means this upstream, "
                        "or to mirror.upstreams to serve that registry too",
                        seen, self.upstream.base_url)
        return False

    def repository_key(self, name: str, ns: str | None) -> str | None:
        """The node's key for a request's repository `name` and `?ns=` (None: unknown `ns`)."""
        if ns is not None and not self.serves_namespace(ns):
            return None
        return self.upstream.resolve(name, ns)


def warn_unnamed_upstream(settings: Settings) -> None:
    """At start: an upstream addressed by IP matches no `?ns=` name containerd sends."""
    host = urlsplit(settings.proxy.remoteurl).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return
    if not settings.mirror.names:
        log.warning("proxy.remoteurl addresses the upstream by IP (%s) and mirror.names is empty: "
                    "containerd asks for the registry by name (?ns=) and gets 404 for any other; "
                    "list the registry's names in mirror.names", host)


def open_registries(settings: Settings, transport: object = None,
                    metrics: Metrics | None = None) -> Registries:
    """The default upstream and each of `mirror.upstreams`, every one with its own client
    (its requests counted in `metrics`, labelled with its prefix or the default's host)."""
    mirror = settings.mirror
    proxy = settings.proxy
    share = worker_count(settings) if current_role() else 1  # a node's link budget, split over workers
    link = partial(link_share, count=share)
    client = Upstream(proxy.remoteurl, proxy.username, proxy.password, link(mirror.upstream),
                      transport=transport, metrics=metrics)  # type: ignore[arg-type]
    default = Registry(None, default_names(proxy.remoteurl, mirror.names), client, mirror.tag_ttl,
                       mirror.tag_max_stale)
    others = [Registry(r.prefix, frozenset(r.names),
                       Upstream(r.remoteurl, r.username, r.password, link(r.upstream),
                                transport=transport, metrics=metrics,  # type: ignore[arg-type]
                                label=r.prefix),
                       mirror.tag_ttl if r.tag_ttl is None else r.tag_ttl,
                       mirror.tag_max_stale if r.tag_max_stale is None else r.tag_max_stale)
              for r in mirror.upstreams]
    return Registries(default, others)


async def open_node(settings: Settings, transport: object = None) -> Node:
    """Open the store and metadata, sweep leftovers, build the services.

    Each service is built once its parts exist and receives them in its
    constructor: metrics first (everything counts), then storage, upstream,
    the quota, the proxy services over them, access control, integrity, the
    operations over those, and last the node that holds them all. The leader worker (`mirror.workers`)
    also starts the node's single-instance loops.
    """
    mirror = settings.mirror
    shared = current_role() is not None  # worker processes share the store and metadata
    leader = is_leader()  # one process of the node runs the single-instance services
    if leader:  # once per node, not once per worker
        warn_unnamed_upstream(settings)
    metrics = Metrics()
    store = BlobStore(settings.storage.root)
    store.open()
    metadata = Metadata(settings.metadata_dir / "metadata.sqlite")
    await metadata.open()
    upstream = open_registries(settings, transport, metrics)
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store")
    quota = Quota(settings, store, metadata, executor, metrics)
    zone = source = None  # alone: objects come from the upstream registries
    if mirror.zone is not None:  # per process (each worker routes on its own view): mirror.zone
        zone = await open_zone(settings, upstream, metrics.registry, store, executor)
        source = ZoneSource(upstream, zone)  # by digest: the owner, a peer holding it, else the link
    negative = NegativeCache(mirror.negative_ttl)
    blobs = Blobs(store, metadata, upstream, executor, negative, quota=quota, metrics=metrics,
                  shared=shared, source=source, zone=zone)
    metrics.track_inflight(lambda: len(blobs.fetcher.inflight))
    manifests = Manifests(store, metadata, source or upstream, executor, negative, tag_ttl=mirror.tag_ttl,
                          tag_max_stale=mirror.tag_max_stale, max_size=mirror.manifest_max_size,
                          metrics=metrics, tag_policy=upstream.tag_policy,  # per registry
                          tag_locks=TagLocks(settings.metadata_dir / "locks") if shared else None)
    tags = TagLists(metadata, upstream, mirror.tag_ttl)
    access = build_access(settings, upstream)
    await quota.start(housekeeping=leader)  # usage, reserve; the leader flushes, repairs, evicts
    integrity = Integrity(store, metadata, executor, metrics)
    scrubber = Scrubber(store, integrity, metrics, mirror.scrub.interval,
                        busy=lambda: integrity.busy or bool(blobs.fetcher.inflight))
    ops = Operations(settings, upstream=upstream, metadata=metadata, store=store, executor=executor,
                     blobs=blobs, manifests=manifests, metrics=metrics)
    node = Node(settings, store, metadata, upstream, executor, blobs.fetcher, blobs, manifests, tags,
                access, metrics, Uploads(store, executor), quota, integrity, scrubber, ops, zone)
    if leader:
        scrubber.start()
    ops.start(leader=leader, shared=shared)
    return node


async def close_node(node: Node) -> None:
    """Stop fetches, close the pool, flush metadata, release the store."""
    await node.ops.close()
    await node.scrubber.close()
    await node.fetcher.close()
    await node.manifests.close()  # revalidations and fills still retrying in the background
    await node.tags.close()
    await node.quota.close()
    if node.zone is not None:  # after the fetches: they may be reading from a peer
        await node.zone.close()
    await node.upstream.aclose()
    await node.metadata.close()
    node.executor.shutdown(wait=True)
    node.store.close()
