"""Gauges read from the node at scrape time (`/metrics` and the status page alike)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mirror.node import Node


async def refresh_store_gauges(node: Node) -> None:
    """Store size and object count (metadata), quota levels and disk space, at scrape time."""
    metrics, quota = node.metrics, node.quota
    count, size = await node.metadata.totals()
    metrics.store_objects.set(count)
    metrics.store_bytes.set(size)
    for level, value in (("max", quota.limit), ("high", quota.high), ("low", quota.low)):
        if value is not None:
            metrics.store_limits.labels(level).set(value)
    total, free = await asyncio.get_running_loop().run_in_executor(node.executor, quota.disk)
    metrics.disk_bytes.labels("total").set(total)
    metrics.disk_bytes.labels("free").set(free)
