"""Counter totals that outlive the process, for `mirror stats`.

Prometheus counters start again at zero with the process, as they should
(`rate()` knows about resets). `mirror stats` answers another question, what
has this store served so far, so the same counters are added to the
metadata's `counters` table every FLUSH_INTERVAL seconds and at close. Each
process adds what it counted since its last flush, never overwrites, so
processes sharing a store add up, and a crash loses one interval at most.

Names: `cache:<kind>:<outcome>`, `evictions:objects`, `evictions:bytes`,
`bytes_saved`, `upstream_bytes`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from mirror.observe.metrics import Metrics, sample_sum
from mirror.web.keys import NODE

if TYPE_CHECKING:
    from mirror.storage.metadata import Metadata

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 30.0


def process_counts(metrics: Metrics) -> dict[str, float]:
    """This process's counts, from the metric objects `/metrics` exposes."""
    counts: dict[str, float] = {}
    for family in metrics.cache.collect():
        for sample in family.samples:
            if sample.name == family.name + "_total":
                key = f"cache:{sample.labels['kind']}:{sample.labels['outcome']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    counts["evictions:objects"] = sample_sum(metrics.evictions, "_total")
    counts["evictions:bytes"] = sample_sum(metrics.evicted_bytes, "_total")
    counts["bytes_saved"] = sample_sum(metrics.bytes_saved, "_total")
    counts["upstream_bytes"] = sample_sum(metrics.upstream_bytes, "_total")
    return counts


class LifetimeCounters:
    """Adds this process's counts to the stored totals, and reads them back."""

    def __init__(self, metrics: Metrics, metadata: Metadata, interval: float = FLUSH_INTERVAL) -> None:
        self.metrics = metrics
        self.metadata = metadata
        self.interval = interval
        self._flushed: dict[str, float] = {}  # what this process has already added
        self._lock = asyncio.Lock()  # a read must not see a flush half-way
        self._task: asyncio.Task[None] | None = None

    def _unflushed(self) -> tuple[dict[str, float], dict[str, float]]:
        now = process_counts(self.metrics)
        return now, {name: value - self._flushed.get(name, 0.0) for name, value in now.items()}

    async def flush(self) -> None:
        """Add what was counted since the last flush."""
        async with self._lock:
            now, deltas = self._unflushed()
            await self.metadata.add_counters(deltas)
            self._flushed = now

    async def totals(self) -> dict[str, float]:
        """Stored totals plus what this process has not flushed yet."""
        async with self._lock:
            totals = await self.metadata.counters()
            for name, delta in self._unflushed()[1].items():
                totals[name] = totals.get(name, 0.0) + delta
        return totals

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # the next round retries; the counts stay in memory
                log.exception("could not store the lifetime counters")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="lifetime-counters")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except Exception as exc:  # metadata already closed (an embedding that stopped the node first)
            log.warning("lifetime counters not stored at close: %s", exc)


LIFETIME: web.AppKey[LifetimeCounters] = web.AppKey("lifetime_counters", LifetimeCounters)


async def running(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx of the debug application: flush periodically and at shutdown."""
    node = app[NODE]
    counters = LifetimeCounters(node.metrics, node.metadata)
    app[LIFETIME] = counters
    counters.start()
    yield
    await counters.close()
