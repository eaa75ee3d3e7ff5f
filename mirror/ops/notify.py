"""Push notifications in: distribution's webhook envelopes keep tags current.

The central registry's `notifications.endpoints` points at this node's
`POST /admin/notify`. Of the events in an envelope, only two kinds matter:

* `push` of a manifest (a manifest media type) with a `target.tag`: the
  cached tag is invalidated at once (the next client revalidates it), then
  re-resolved by HEAD upstream, as background work. Event order is never
  trusted (retries reorder deliveries) and the event's digest is never taken
  as the tag's value: distribution 2.8 even sends the event *before* it moves
  the tag, so the HEAD is retried (backoff, up to :data:`SETTLE` seconds)
  until upstream shows the event's digest or anything other than the digest
  cached before. Then the new manifest (an index with its children for the
  platforms held before) is fetched and the tag pointed at it. A tag this
  node never cached is left alone, unless its repository matches
  `mirror.prefetch.rules`.
* `delete`: a `target.tag` forgets that tag; a `target.digest` alone forgets
  the repository's link to that digest and every tag pointing at it.

For a push to a repository matching one of `mirror.prefetch.rules` (fnmatch
globs), the manifest named by the event's `target.digest` and its blobs are
fetched too, whatever the tag does. Everything else (layer pushes, pulls,
mounts) is ignored; `target.url` is never used. Duplicate deliveries are
harmless: work for one tag is coalesced and idempotent.

Each received envelope is also forwarded, as received, to every
`mirror.notify.forward_to` URL (edge zones), with this node's notify token
(`mirror.notify.token`, which authorizes nothing but `/admin/notify`) as a
bearer token when one is set; the admin token never leaves the node. Plain
http targets are refused at start unless `allow_insecure_forward` says so.
A hop counter header stops loops.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx

from mirror import errors
from mirror.registry import mediatypes
from mirror.registry.digest import Digest, is_digest
from mirror.registry.reference import RepositoryName, Tag
from mirror.storage.metadata import TagRecord
from mirror.upstream.budget import background

if TYPE_CHECKING:
    from mirror.config import Settings
    from mirror.ops.prewarm import Warmer
    from mirror.proxy.manifests import Manifests
    from mirror.storage.metadata import Metadata
    from mirror.proxy.tagrefresh import TagRefresher
    from mirror.upstream.registries import Registry

log = logging.getLogger(__name__)

SETTLE = 5.0  # seconds a pushed tag is re-resolved before upstream is believed as it is
HOPS_HEADER = "X-Mirror-Notify-Hops"
MAX_HOPS = 4
FORWARD_QUEUE = 1000
FORWARD_ATTEMPTS = 3
FORWARD_TIMEOUT = 5.0
MAX_EVENTS = 10_000


def parse_envelope(body: bytes) -> list[dict[str, Any]]:
    """The events of a notification envelope.

    Raises:
        RegistryError: 400 when the body is not an envelope.
    """
    try:
        document = json.loads(body)
        events = document["events"]
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.RegistryError("body is not a notification envelope {\"events\": [...]}",
                                   status=400) from exc
    if not isinstance(events, list):
        raise errors.RegistryError("\"events\" must be a list", status=400)
    return [e for e in events[:MAX_EVENTS] if isinstance(e, dict)]


class Notifications:
    """Acts on received envelopes and forwards them to the edge zones."""

    def __init__(self, settings: Settings, metadata: Metadata, manifests: Manifests, warmer: Warmer,
                 refresher: TagRefresher) -> None:
        self.settings = settings
        self.metadata = metadata
        self.manifests = manifests
        self.warmer = warmer
        self.refresher = refresher
        self.rules = settings.mirror.prefetch.rules
        self.forward_to = settings.mirror.notify.forward_to
        self.settle = SETTLE
        self.received = 0
        self._tags: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._again: dict[tuple[str, str], Digest] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._forward_queue: asyncio.Queue[tuple[bytes, int, str]] = asyncio.Queue(maxsize=FORWARD_QUEUE)
        self._forwarder: asyncio.Task[None] | None = None
        self.forward_dropped = 0

    def matches_rules(self, repo: str) -> bool:
        return any(fnmatch.fnmatchcase(repo, rule) for rule in self.rules)

    async def close(self) -> None:
        tasks = [*self._tasks, *self._tags.values()]
        if self._forwarder is not None:
            tasks.append(self._forwarder)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until every piece of work started by received events is done (tests)."""
        while self._tasks or self._tags:
            await asyncio.gather(*self._tasks, *self._tags.values(), return_exceptions=True)

    # -- receiving ------------------------------------------------------------

    def receive(self, body: bytes, hops: int = 0, registry: Registry | None = None) -> dict[str, int]:
        """Act on one envelope; returns counts of what was taken and ignored.

        `registry` is the one that sent it (`/admin/notify/<name>`): its
        repositories are that registry's keys; None is the default upstream.
        """
        events = parse_envelope(body)
        self.received += 1
        acted = ignored = 0
        for event in events:
            if self._act(event, registry):
                acted += 1
            else:
                ignored += 1
        if self.forward_to and hops < MAX_HOPS:
            self._forward(body, hops + 1, f"/{registry.prefix}" if registry and registry.prefix else "")
        return {"events": len(events), "acted": acted, "ignored": ignored}

    def _act(self, event: dict[str, Any], registry: Registry | None = None) -> bool:
        target = event.get("target")
        if not isinstance(target, dict):
            return False
        try:
            repo = RepositoryName.parse(str(target.get("repository", ""))).value
            if registry is not None:
                repo = RepositoryName.parse(registry.key(repo)).value
        except errors.RegistryError:
            return False
        action = event.get("action")
        tag = target.get("tag") or None
        raw_digest = target.get("digest") or ""
        digest = Digest.parse(raw_digest) if isinstance(raw_digest, str) and is_digest(raw_digest) else None
        if tag is not None:
            try:
                tag = Tag.parse(str(tag)).value
            except errors.RegistryError:
                return False
        if action == "push":
            if target.get("mediaType") not in mediatypes.MANIFEST_TYPES or digest is None:
                return False
            if tag is None and not self.matches_rules(repo):
                return False
            if self.matches_rules(repo):
                self._spawn(self._prefetch(repo, digest))
            if tag is not None:
                self._tag_pushed(repo, tag, digest)
            return True
        if action == "delete" and (tag is not None or digest is not None):
            self._spawn(self._deleted(repo, tag, digest))
            return True
        return False

    def _spawn(self, coro: Any) -> None:
        with background():
            task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- pushes -----------------------------------------------------------------

    def _tag_pushed(self, repo: str, tag: str, digest: Digest) -> None:
        """Coalesce: one worker per tag; an event during its run makes it run once more."""
        key = (repo, tag)
        if key in self._tags:
            self._again[key] = digest
            return
        with background():
            self._tags[key] = asyncio.create_task(self._tag_worker(key, digest))

    async def _tag_worker(self, key: tuple[str, str], digest: Digest) -> None:
        try:
            next_digest: Digest | None = digest
            while next_digest is not None:
                try:
                    await self._resolve(*key, next_digest)
                except errors.RegistryError as exc:
                    log.warning("notification for %s:%s: %s", *key, exc)
                except Exception:
                    log.exception("notification for %s:%s failed", *key)
                next_digest = self._again.pop(key, None)
        finally:
            self._tags.pop(key, None)

    async def _resolve(self, repo: str, tag: str, digest: Digest) -> None:
        record = await self.metadata.get_tag(repo, tag)
        if record is None and not self.matches_rules(repo):
            return  # never served here: nothing to keep current
        if record is not None:
            await self._invalidate(repo, tag)
        outcome = await self.refresher.refresh(repo, tag, expect=digest, settle=self.settle,
                                               warm=self.matches_rules(repo))
        log.info("push notification %s:%s -> %s", repo, tag, outcome)

    async def _invalidate(self, repo: str, tag: str) -> None:
        """Expire the cached tag now, keeping its stale window: clients revalidate meanwhile."""
        record = await self.metadata.get_tag(repo, tag)
        if record is None:
            return
        expired = min(record.fetched_at, time.time() - self.manifests.tag_ttl)
        await self.metadata.put_tag(repo, tag, TagRecord(record.digest, record.media_type, expired))

    async def _prefetch(self, repo: str, digest: Digest) -> None:
        try:
            job = await self.warmer.warm_digest(repo, digest, None)
        except Exception:
            log.exception("prefetch of %s@%s failed", repo, digest)
            return
        if job.errors:
            log.warning("prefetch of %s@%s: %s", repo, digest, job.errors)

    # -- deletes ----------------------------------------------------------------

    async def _deleted(self, repo: str, tag: str | None, digest: Digest | None) -> None:
        metadata = self.metadata
        if tag is not None:
            await metadata.delete_tag(repo, tag)
            log.info("delete notification: forgot tag %s:%s", repo, tag)
        elif digest is not None:
            await metadata.delete_tags_to(repo, digest)
            await metadata.unlink(repo, digest)
            log.info("delete notification: forgot %s@%s", repo, digest)

    # -- forwarding -------------------------------------------------------------

    def _forward(self, body: bytes, hops: int, suffix: str = "") -> None:
        if self._forwarder is None:
            self._forwarder = asyncio.create_task(self._forward_loop(), name="notify-forward")
        try:
            self._forward_queue.put_nowait((body, hops, suffix))  # suffix: the registry's endpoint
        except asyncio.QueueFull:
            self.forward_dropped += 1
            log.warning("notification forwarding queue full: envelope dropped (%d so far)",
                        self.forward_dropped)

    async def _forward_loop(self) -> None:
        token = self.settings.mirror.notify.token  # never the admin token
        headers = {"Content-Type": "application/vnd.docker.distribution.events.v1+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT, trust_env=False, headers=headers) as client:
            while True:
                body, hops, suffix = await self._forward_queue.get()
                await asyncio.gather(*(self._forward_one(client, url.rstrip("/") + suffix, body, hops)
                                       for url in self.forward_to))

    async def _forward_one(self, client: httpx.AsyncClient, url: str, body: bytes, hops: int) -> None:
        for attempt in range(FORWARD_ATTEMPTS):
            try:
                response = await client.post(url, content=body, headers={HOPS_HEADER: str(hops)})
                if 200 <= response.status_code < 400:
                    return
                problem = f"status {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < FORWARD_ATTEMPTS:
                await asyncio.sleep(0.5 * 2**attempt)
        log.warning("forwarding notifications to %s failed: %s", url, problem)
