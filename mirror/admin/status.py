"""Admin API: the status page (`GET /`) and the figures it draws (`GET /admin/status`).

    GET /               -> the page (HTML with inline CSS, JS and SVG; nothing fetched elsewhere)
    GET /admin/status   -> {"time", "upstream", "link", "cache", "history", "inflight", "store",
                            "top", "errors", "jobs", "events"}

Every count on the page is read from the node's Prometheus metric objects
(:func:`mirror.observe.metrics.sample_sum`), the ones `/metrics` exposes, so
the page and a dashboard never disagree. The page adds what a scrape cannot
hold: a ring of per-minute samples (hit ratio and link bytes over the last
hours), the rate of each fetch in flight, the last errors logged, and the
prewarm jobs.

`mirror_upstream_up` is kept current at scrape time (:meth:`Sampler.upstream_health`):
from the node's own upstream traffic when there is some, else from a probe of
`/v2/`, so an alert sees an unreachable upstream even when no client pulls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from mirror.node import Node
from mirror.observe.gauges import refresh_store_gauges  # the same refresh `/metrics` does
from mirror.observe.metrics import sample_sum
from mirror.web.keys import NODE

SAMPLE_INTERVAL = 60.0  # seconds per history point
PROBE_AFTER = 60.0  # seconds without upstream traffic before a scrape probes it
PROBE_TIMEOUT = 5.0  # seconds; Prometheus' default scrape timeout is 10
HISTORY = 6 * 60  # points kept: six hours of minutes
RECENT_ERRORS = 50
TOP_IMAGES = 10
SERVED_LOCALLY = ("hit", "revalidated", "stale")  # cache outcomes answered from the store


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counters at one instant; history points are differences of two."""

    time: float
    served_locally: float
    requests: float
    saved: float
    fetched: float


class RecentErrors(logging.Handler):
    """The last warnings and errors the node logged, for the page."""

    def __init__(self, limit: int = RECENT_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=limit)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        self.records.append({"time": record.created, "level": record.levelname, "logger": record.name,
                             "message": message[:500]})


class Sampler:
    """Per-minute samples, upstream probes and fetch rates of one node."""

    def __init__(self, node: Node, interval: float = SAMPLE_INTERVAL, limit: int = HISTORY) -> None:
        self.node = node
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=limit)
        self.errors = RecentErrors()
        self.checked_at: float | None = None  # wall time upstream's state was last known
        self.checked_by: str | None = None  # "traffic" or "probe"
        self._answered = 0.0  # upstream responses below 500 counted at the last check
        self._checked = -math.inf  # monotonic time of the last check
        self._probing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def current(self) -> Sample:
        """The counters now, from the metric objects."""
        metrics = self.node.metrics
        local = sum(sample_sum(metrics.cache, "_total", outcome=o) for o in SERVED_LOCALLY)
        return Sample(time.time(), local, sample_sum(metrics.cache, "_total"),
                      sample_sum(metrics.bytes_saved, "_total"), sample_sum(metrics.upstream_bytes, "_total"))

    def _answered_now(self) -> float:
        counts = _by_label(self.node.metrics.upstream_requests, "status")
        return sum(count for status, count in counts.items() if not status.startswith("5"))

    async def upstream_health(self) -> None:
        """Keep `mirror_upstream_up` current, at scrape time.

        Upstream answering the node's own requests since the last check is
        proof enough; only a node with no such traffic for PROBE_AFTER seconds
        probes `/v2/` (one probe at a time, at most PROBE_TIMEOUT long).
        So a busy node adds no requests, and an idle one one per minute at
        most, driven by whoever watches it.
        """
        answered = self._answered_now()
        if answered != self._answered:
            self._answered, self._checked = answered, time.monotonic()
            self.node.metrics.upstream_up.set(1)
            self.checked_at, self.checked_by = time.time(), "traffic"
            return
        async with self._probing:
            if time.monotonic() - self._checked < PROBE_AFTER:
                return
            await self.probe()
            self._answered, self._checked = self._answered_now(), time.monotonic()

    async def probe(self) -> None:
        """Ask upstream's `/v2/`; record reachability and latency as gauges.

        Bounded by PROBE_TIMEOUT, well under a scrape's timeout: an upstream
        that accepts and never answers reads as down, not as a failed scrape.
        """
        started = time.perf_counter()
        link = await self.node.upstream.health.report(PROBE_TIMEOUT)  # waits for one probe at most that long
        up = link.get("reachable") is True and "probe_pending_seconds" not in link
        self.node.metrics.upstream_up.set(1 if up else 0)
        self.node.metrics.upstream_probe_seconds.set(time.perf_counter() - started)
        self.checked_at, self.checked_by = time.time(), "probe"

    async def _loop(self) -> None:
        while True:
            self.samples.append(self.current())
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        logging.getLogger("mirror").addHandler(self.errors)
        self._task = asyncio.create_task(self._loop(), name="status-sampler")

    async def close(self) -> None:
        logging.getLogger("mirror").removeHandler(self.errors)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def history(self) -> list[dict[str, Any]]:
        """Per-interval points: hit ratio, bytes saved and fetched (the last one partial)."""
        points = [*self.samples, self.current()]
        return [{"time": b.time, "requests": b.requests - a.requests,
                 "hit_ratio": _ratio(b.served_locally - a.served_locally, b.requests - a.requests),
                 "saved": b.saved - a.saved, "fetched": b.fetched - a.fetched}
                for a, b in zip(points, points[1:], strict=False)]

    def inflight(self) -> list[dict[str, Any]]:
        """Each fetch in progress with its size, bytes so far and mean rate since it started."""
        now = time.monotonic()
        rows = []
        for fetch in self.node.fetcher.inflight.values():
            elapsed = now - fetch.began
            rows.append({"digest": str(fetch.digest), "repository": fetch.repo, "size": fetch.size,
                         "written": fetch.written, "rate": fetch.written / elapsed if elapsed > 0 else None})
        return sorted(rows, key=lambda r: r["digest"])


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _by_label(metric: Any, label: str, suffix: str = "_total") -> dict[str, float]:
    found: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                found[sample.labels[label]] = found.get(sample.labels[label], 0.0) + sample.value
    return found


def upstream_figures(node: Node, sampler: Sampler) -> dict[str, Any]:
    metrics = node.metrics
    count = sample_sum(metrics.upstream_seconds, "_count")
    parts = urlsplit(node.upstream.base_url)
    return {"host": parts.hostname or "", "port": parts.port,
            "up": sample_sum(metrics.upstream_up) == 1 if sampler.checked_at else None,
            "checked_at": sampler.checked_at, "checked_by": sampler.checked_by,
            "probe_seconds": sample_sum(metrics.upstream_probe_seconds) if sampler.checked_by == "probe" else None,
            "requests": sample_sum(metrics.upstream_requests, "_total"),
            "mean_seconds": sample_sum(metrics.upstream_seconds, "_sum") / count if count else None,
            "errors": _by_label(metrics.upstream_errors, "kind"),
            "fill_failures": sample_sum(metrics.fill_failures, "_total"),
            "stale_tags": sample_sum(metrics.stale_tags, "_total")}


def store_figures(node: Node) -> dict[str, Any]:
    """Store use against the quota and watermarks; gauges refreshed by the caller."""
    metrics, quota = node.metrics, node.quota
    return {"objects": sample_sum(metrics.store_objects), "bytes": sample_sum(metrics.store_bytes),
            "used": quota.used, "max_size": quota.limit, "high_watermark": quota.high,
            "low_watermark": quota.low, "disk_total": sample_sum(metrics.disk_bytes, kind="total"),
            "disk_free": sample_sum(metrics.disk_bytes, kind="free"),
            "evicted_objects": sample_sum(metrics.evictions, "_total"),
            "evicted_bytes": sample_sum(metrics.evicted_bytes, "_total")}


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "state", "images", "blobs_total", "blobs_done", "bytes_total", "bytes_done", "created",
            "started", "finished")
    return {**{k: job.get(k) for k in keys}, "errors": len(job.get("errors") or [])}


async def snapshot(node: Node, sampler: Sampler) -> dict[str, Any]:
    """Everything the page shows, at one instant."""
    await refresh_store_gauges(node)
    await sampler.upstream_health()
    metrics = node.metrics
    now = sampler.current()
    outcomes = _by_label(metrics.cache, "outcome")
    return {
        "time": now.time,
        "upstream": upstream_figures(node, sampler),
        "link": {"saved": now.saved, "fetched": now.fetched,
                 "served": _by_label(metrics.bytes_served, "kind")},
        "cache": {"requests": now.requests, "served_locally": now.served_locally,
                  "hit_ratio": _ratio(now.served_locally, now.requests), "outcomes": outcomes},
        "history": sampler.history(),
        "interval": sampler.interval,
        "inflight": sampler.inflight(),
        "inflight_count": sample_sum(metrics.inflight),
        "store": store_figures(node),
        "top": node.ops.popularity.top(TOP_IMAGES),
        "errors": list(reversed(sampler.errors.records)),
        "jobs": [job_summary(j.to_json()) for j in node.ops.jobs.all()][-20:],
        "events": event_figures(node),
    }


def event_figures(node: Node) -> dict[str, float]:
    """Pull events delivered, dropped and failed, over every endpoint."""
    sinks = node.ops.events.sinks
    if not sinks:
        return {"endpoints": 0, "sent": 0, "dropped": 0, "failures": 0}
    metrics = sinks[0].metrics  # one EventMetrics, shared by the sinks
    return {"endpoints": len(sinks), "sent": sample_sum(metrics.sent, "_total"),
            "dropped": sample_sum(metrics.dropped, "_total"), "failures": sample_sum(metrics.failures, "_total")}


@cache
def page_html() -> bytes:
    """The page, shipped as package data next to this module."""
    return resources.files("mirror.admin").joinpath("static/status.html").read_bytes()


SAMPLER: web.AppKey[Sampler] = web.AppKey("status_sampler", Sampler)


async def page(request: web.Request) -> web.Response:
    return web.Response(body=page_html(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                            "script-src 'unsafe-inline'; img-src 'self' data:"})


async def status(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response(await snapshot(node, request.app[SAMPLER]), headers={"Cache-Control": "no-store"})


def install(app: web.Application, interval: float = SAMPLE_INTERVAL) -> None:
    """Run a sampler for the debug application's lifetime."""
    async def sampling(app: web.Application) -> AsyncIterator[None]:
        sampler = Sampler(app[NODE], interval)
        app[SAMPLER] = sampler
        sampler.start()
        yield
        await sampler.close()

    app.cleanup_ctx.append(sampling)


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", page)
    router.add_get("/admin/status", status)
