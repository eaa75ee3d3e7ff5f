"""Pull events out: distribution-format `pull` notifications for what the node serves.

With `notifications.endpoints` configured, every manifest GET answered
without a GET upstream (cache outcome `hit`, `revalidated` or `stale`; a
`miss` is not sent because upstream served that GET and emits its own event)
becomes one event in distribution's format, delivered as distribution
delivers them: an envelope `{"events": [...]}` of media type
`application/vnd.docker.distribution.events.v1+json`, POSTed with the
endpoint's `headers` and `timeout`. A 2xx/3xx answer is success. After
`threshold` consecutive failures the sink backs off `backoff` between
attempts, and retries the same envelope until it is delivered (as
distribution's retrying sink does).

The queue in front of each endpoint is on local disk (a `diskcache.Deque`
under `<metadata_dir>/events/<endpoint>`): an event is written there before
the pull's response is sent, and removed only after an envelope holding it
was accepted, so events survive a restart or a `kill -9` and are delivered
at least once (a crash between delivery and removal sends an envelope again;
receivers already tolerate distribution's duplicates). Unlike distribution,
the queue is bounded (:data:`QUEUE_LIMIT` events): when an endpoint stays
down, new events are dropped, counted in
`mirror_notification_events_dropped_total{endpoint}` and logged. At shutdown
the queue gets a short while (`ops.EVENTS_FLUSH`) to be delivered; what is
left then stays on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from diskcache import Deque
from prometheus_client import CollectorRegistry, Counter

from mirror.config import NotificationEndpoint

log = logging.getLogger(__name__)

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
QUEUE_LIMIT = 10_000
BATCH = 100  # events per envelope at most
IDLE_POLL = 1.0  # seconds between looks at an empty queue (other workers append to it)


def timestamp() -> str:
    """Now in RFC 3339 with nanoseconds, as Go's time.Time marshals."""
    now = time.time_ns()
    whole = datetime.fromtimestamp(now // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{now % 1_000_000_000:09d}Z"


def source(addr: tuple[str, int], instance_id: str) -> dict[str, str]:
    """distribution's `source`: the node's `hostname:port` and instance id."""
    return {"addr": f"{socket.gethostname()}:{addr[1]}", "instanceID": instance_id}


class EventMetrics:
    """Counters of the pull-event sinks, registered in the node's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = Counter("mirror_notification_events_sent", "Pull events delivered",
                            ["endpoint"], registry=registry)
        self.dropped = Counter("mirror_notification_events_dropped",
                               "Pull events dropped (queue full)", ["endpoint"], registry=registry)
        self.failures = Counter("mirror_notification_failures", "Failed deliveries to an endpoint",
                                ["endpoint"], registry=registry)


class EndpointSink:
    """One endpoint: a bounded queue on disk and one sender with distribution's retry semantics."""

    def __init__(self, endpoint: NotificationEndpoint, metrics: EventMetrics, directory: Path,
                 limit: int | None = None) -> None:
        self.endpoint = endpoint
        self.metrics = metrics
        self.limit = limit or QUEUE_LIMIT
        self.queue = Deque(directory=str(directory / _slug(endpoint.name)))
        self.failures = 0
        self.last_failure = 0.0
        self.dropped = 0
        self._waiting = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        headers = [(name, value) for name, values in endpoint.headers.items() for value in values]
        headers.append(("Content-Type", EVENTS_MEDIA_TYPE))
        self._client = httpx.AsyncClient(timeout=endpoint.timeout, headers=headers, trust_env=False,
                                         follow_redirects=False)

    def start(self) -> None:
        if len(self.queue):
            log.info("notification endpoint %s: %d pull events queued from before, delivering",
                     self.endpoint.name, len(self.queue))
        self._task = asyncio.create_task(self._run(), name=f"events-{self.endpoint.name}")

    async def close(self, flush: float = 0.0) -> None:
        """Stop sending; first, up to `flush` s to deliver what is queued (shutdown)."""
        if self._task is not None:
            if flush > 0 and not self._task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained(), flush)
            if len(self.queue):
                log.warning("notification endpoint %s: %d pull events not delivered before shutdown "
                            "(kept on disk for the next start)", self.endpoint.name, len(self.queue))
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()
        self.queue.cache.close()

    async def _drained(self) -> None:
        while len(self.queue):
            await asyncio.sleep(0.05)

    def wants(self, event: dict[str, Any]) -> bool:
        """False for events this endpoint's `ignore` settings exclude."""
        if event["action"] in self.endpoint.ignore_actions:
            return False
        return event["target"].get("mediaType") not in self.endpoint.ignoredmediatypes

    def offer(self, event: dict[str, Any]) -> None:
        """Queue an event on disk, or drop and count it when the queue is full."""
        if len(self.queue) >= self.limit:
            self.dropped += 1
            self.metrics.dropped.labels(self.endpoint.name).inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("notification endpoint %s: queue full, %d pull events dropped so far",
                            self.endpoint.name, self.dropped)
            return
        self.queue.append(event)
        self._waiting.set()

    async def _run(self) -> None:
        while True:
            batch = await asyncio.to_thread(self._peek)
            if not batch:
                self._waiting.clear()
                if not len(self.queue):  # other workers queue on disk too: look again now and then
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._waiting.wait(), IDLE_POLL)
                continue
            body = json.dumps({"events": batch}).encode()
            await self._deliver(body)
            await asyncio.to_thread(self._remove, len(batch))
            self.metrics.sent.labels(self.endpoint.name).inc(len(batch))

    def _peek(self) -> list[dict[str, Any]]:
        return list(itertools.islice(self.queue, BATCH))

    def _remove(self, count: int) -> None:
        for _ in range(count):
            try:
                self.queue.popleft()
            except IndexError:
                return

    async def _deliver(self, body: bytes) -> None:
        """Send until accepted; back off after `threshold` consecutive failures."""
        while True:
            if self.failures >= self.endpoint.threshold:
                wait = self.last_failure + self.endpoint.backoff - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                response = await self._client.post(self.endpoint.url, content=body)
                if 200 <= response.status_code < 400:
                    self.failures = 0
                    return
                problem = f"status {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self.failures += 1
            self.last_failure = time.monotonic()
            self.metrics.failures.labels(self.endpoint.name).inc()
            if self.failures == self.endpoint.threshold:
                log.warning("notification endpoint %s failing (%s): backing off %.1fs between attempts",
                            self.endpoint.name, problem, self.endpoint.backoff)
            else:
                log.debug("notification endpoint %s: %s", self.endpoint.name, problem)
            await asyncio.sleep(0)


class PullEvents:
    """Builds pull events and hands them to every configured endpoint."""

    def __init__(self, endpoints: tuple[NotificationEndpoint, ...], source: dict[str, str],
                 registry: CollectorRegistry, directory: Path) -> None:
        self.source = source
        metrics = EventMetrics(registry)
        self.sinks = [EndpointSink(e, metrics, directory) for e in endpoints if not e.disabled and e.url]

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    async def close(self, flush: float = 0.0) -> None:
        """Close every sink, each first delivering its queue for up to `flush` s (concurrently)."""
        await asyncio.gather(*(sink.close(flush) for sink in self.sinks))

    def pulled(self, *, repository: str, digest: str, media_type: str, size: int, tag: str | None,
               url: str, request: dict[str, str], actor: str | None = None) -> None:
        """One manifest pull served by this node."""
        if not self.sinks:
            return
        target: dict[str, Any] = {"mediaType": media_type, "size": size, "digest": digest,
                                  "length": size, "repository": repository, "url": url}
        if tag:
            target["tag"] = tag
        event = {
            "id": str(uuid.uuid4()),
            "timestamp": timestamp(),
            "action": "pull",
            "target": target,
            "request": request,
            "actor": {"name": actor} if actor else {},
            "source": self.source,
        }
        for sink in self.sinks:
            if sink.wants(event):
                sink.offer(event)


def _slug(name: str) -> str:
    """An endpoint's name as a directory name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"
