"""Where a blob comes from in a zone: this node's store, the owner, a peer that holds it, the link.

:class:`Zone` is what the node holds (`node.zone`); the blob service asks
it :meth:`Zone.open_blob` on a local miss. Two paths:

* **non-owner** (rendezvous picks another live peer): the body is streamed
  from the owner and verified as it passes (:mod:`mirror.zone.relay`),
  nothing stored unless `keep_copy`; with `keep_copy` the ordinary fetcher
  fills from the owner instead (its source routes there, below).
* **owner** (or a peer request, which is always served here): the ordinary
  fetcher fills, and its source (:class:`ZoneSource`) first asks the other
  live peers whether they hold the object, copying from one that does,
  before going to the link.

A request from a peer is never routed again (:data:`ROUTING` is off in its
context): two nodes that disagree for a moment about membership cannot
bounce a request between them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from mirror import errors
from mirror.registry.digest import Digest
from mirror.upstream.client import BlobStream, UpstreamManifest
from mirror.upstream.credential import Credential
from mirror.zone.membership import Membership, Resolver, resolve_dns
from mirror.zone.metrics import ZoneMetrics
from mirror.zone.peers import Peers, PeerUnavailable, blob_path, held_path
from mirror.config.zone import ZoneSettings

if TYPE_CHECKING:
    from mirror.proxy.blobs import BlobSource
    from mirror.proxy.fetcher import Fetcher
    from mirror.upstream.registries import Registries

log = logging.getLogger(__name__)

#: False while serving a peer's request: answer it here, never forward it again.
ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("zone_routing", default=True)


class Zone:
    """This process's view of the zone and the routing decisions made from it."""

    def __init__(self, settings: ZoneSettings, upstream: Registries, metrics_registry: Any = None,
                 resolver: Resolver = resolve_dns, transport: Any = None, *, source: Any = None,
                 store: Any = None, executor: Any = None) -> None:
        """`source`: the config file SIGHUP re-reads (`Settings.source`); `store` and `executor`
        read this node's own fill when a relay's owners before this node all died."""
        self.settings = settings
        self.upstream = upstream
        self.metrics = ZoneMetrics(metrics_registry)
        self.membership = Membership(settings, resolver)
        self.membership.on_change = self._count_members
        self.peers = Peers(self.membership, self.metrics, transport)
        self.source = source
        self.store = store
        self.executor = executor
        self._reloads: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.membership.refresh()
        self.membership.start()

    async def close(self) -> None:
        await self.membership.close()
        await self.peers.aclose()

    def reload(self) -> None:
        """SIGHUP: re-read the config file's `mirror.zone` and apply it (a bad file changes nothing)."""
        if self.source is None:
            log.info("SIGHUP: no config file to re-read mirror.zone from")
            return
        from mirror.config import load_settings

        settings = load_settings(self.source).mirror.zone  # raises ConfigError: logged, old list kept
        task = asyncio.get_running_loop().create_task(self.apply(settings))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def apply(self, settings: ZoneSettings | None) -> None:
        """A new peer list (a removed zone keeps the old one: leaving needs a restart)."""
        if settings is None:
            log.error("SIGHUP: mirror.zone is gone from the config; keeping the zone (restart to leave it)")
            return
        self.settings = settings
        await self.membership.reconfigure(settings)

    def _count_members(self, membership: Membership) -> None:
        down = len(membership.down())
        self.metrics.peers.labels("up").set(len(membership.members) - down)
        self.metrics.peers.labels("down").set(down)

    # -- routing -------------------------------------------------------------------------------

    @property
    def self_url(self) -> str:
        return self.membership.self_url

    def remote_owners(self, digest: Digest) -> list[str]:
        """The peers to stream `digest` from, in order, up to this node; [] when this node owns it."""
        if not ROUTING.get():
            return []
        order = self.membership.owners(str(digest))
        return order[: order.index(self.self_url)] if self.self_url in order else order

    async def open_blob(self, repo: str, digest: Digest, credential: Credential,
                        fill: Fetcher) -> BlobSource | None:
        """A local miss: the owner's stream for the client (non-owner, no keep_copy), else None
        (this node fills, through the fetcher, from peers or the link). `fill` is this node's
        fetcher, which the relay reads on from should every owner before this node die."""
        if self.settings.keep_copy or not self.remote_owners(digest):
            return None
        from mirror.proxy.blobs import BlobSource
        from mirror.zone.relay import PeerRelay

        relay = await PeerRelay.open(self, repo, digest, credential, fill)
        if relay is None:  # every owner before this node is down: fill here
            return None
        self.metrics.relayed.inc()
        return BlobSource(digest, relay.total, cache="peer", relay=relay)

    async def stat_blob(self, repo: str, digest: Digest, credential: Credential) -> BlobSource | None:
        """A HEAD this node cannot answer: asked of the owner (its store and links, else
        upstream's HEAD, once); None when this node owns it or no owner answers."""
        from mirror.proxy.blobs import BlobSource

        for owner in self.remote_owners(digest):
            try:
                size = await self.peers.head_blob(owner, blob_path(digest, repo), credential)
            except PeerUnavailable:
                continue
            return BlobSource(digest, size, cache="peer")
        return None

    async def holder(self, repo: str, digest: Digest, credential: Credential) -> str | None:
        """A live peer that stores `digest` and may serve it for `repo`, asked all at once.

        A holder that does not link the object to `repo` is used only after
        upstream confirms `repo` has it (a HEAD, no body), as a lone node
        confirms a cross-repository hit.
        """
        others = self.membership.others()
        if not others:
            return None
        answers = await asyncio.gather(*(self.peers.held(p, digest, repo, credential) for p in others))
        held = [(peer, answer) for peer, answer in zip(others, answers, strict=True) if answer is not None]
        if not held:
            return None
        linked = [peer for peer, (_size, is_linked) in held if is_linked]
        if linked:
            return linked[0]
        await self.upstream.head_blob(repo, digest, credential)  # raises BLOB_UNKNOWN, UNAUTHORIZED...
        return held[0][0]


class ZoneSource:
    """The fetcher's upstream in a zone: the owner (keep_copy), else a peer holding it, else the link.

    Everything but `stream_blob` is the registries' own (head, manifests,
    timeouts, retries): a peer is one more source of blob bytes, and the
    fetcher verifies what any source sends.
    """

    def __init__(self, upstream: Registries, zone: Zone) -> None:
        self.upstream = upstream
        self.zone = zone

    def __getattr__(self, name: str) -> Any:
        return getattr(self.upstream, name)

    async def get_manifest(self, repo: str, reference: str, max_size: int,
                           credential: Credential) -> UpstreamManifest:
        """A manifest by digest from its owner (tags are resolved by every node itself)."""
        if ":" in reference:
            digest = Digest.parse(reference)
            for owner in self.zone.remote_owners(digest):
                try:
                    return await self.zone.peers.get_manifest(owner, repo, digest, max_size, credential)
                except PeerUnavailable:
                    continue
        return await self.upstream.get_manifest(repo, reference, max_size, credential)

    @asynccontextmanager
    async def stream_blob(self, repo: str, digest: Digest, offset: int,
                          credential: Credential) -> AsyncIterator[BlobStream]:
        async with AsyncExitStack() as stack:
            stream = await self._open(stack, repo, digest, offset, credential)
            yield stream

    async def _open(self, stack: AsyncExitStack, repo: str, digest: Digest, offset: int,
                    credential: Credential) -> BlobStream:
        peers = self.zone.peers
        for owner in self.zone.remote_owners(digest):  # keep_copy: fill from the owner
            try:
                return await stack.enter_async_context(
                    peers.stream_blob(owner, blob_path(digest, repo), digest, offset, credential))
            except PeerUnavailable:
                continue
        holder = await self.zone.holder(repo, digest, credential)
        if holder is not None:
            try:
                stream = await stack.enter_async_context(
                    peers.stream_blob(holder, held_path(digest, repo), digest, offset, credential))
                if offset == 0:
                    self.zone.metrics.peer_sourced.inc()
                log.info("blob %s: copying from peer %s, not the link", digest, holder)
                return stream
            except (PeerUnavailable, errors.BlobUnknown):
                pass  # gone meanwhile: the link
        return await stack.enter_async_context(self.upstream.stream_blob(repo, digest, offset, credential))


async def open_zone(settings: Any, upstream: Registries, metrics_registry: Any, store: Any,
                    executor: Any) -> Zone:
    """Join the zone (`mirror.zone`): resolve the peers and start re-resolving them."""
    zone = Zone(settings.mirror.zone, upstream, metrics_registry, source=settings.source,
                store=store, executor=executor)
    await zone.start()
    return zone
