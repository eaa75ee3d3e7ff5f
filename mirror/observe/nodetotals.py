"""Node totals on `/metrics` when worker processes serve: the leader adds the others' figures.

Each worker other than the leader writes its registry's exposition to
`<metadata_dir>/workers/metrics-<index>.prom` every `PUBLISH_INTERVAL` seconds
(atomically, by rename) and once more after its drain at shutdown. The
leader's `/metrics` is its own registry plus those files: counters,
histograms and summaries are summed sample by sample; gauges are the
leader's own (store size, disk, upstream probe: one node-wide figure every
worker would report alike), except the per-process ones in `SUMMED_GAUGES`.

A worker that died keeps its last file, so what it counted still counts; its
restart overwrites the file from zero, which Prometheus sees as a counter
reset (`rate()` and `increase()` handle those). A scrape thus lags the
other workers by up to `PUBLISH_INTERVAL`. This is the "leader aggregates"
design rather than `prometheus_client`'s multiprocess mode, which supports
neither the scrape-time callback gauges nor the per-application registries
the node uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 2.0
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
SUMMED_GAUGES = frozenset({"mirror_inflight_fetches"})


def metrics_path(directory: Path, index: int) -> Path:
    return directory / "workers" / f"metrics-{index}.prom"


def clear(directory: Path) -> None:
    """At the node's start: forget figures of an earlier run (perhaps with more workers)."""
    for path in (directory / "workers").glob("metrics-*"):
        with contextlib.suppress(OSError):
            path.unlink()


def publish(registry: CollectorRegistry, directory: Path, index: int) -> None:
    """Write this worker's figures where the leader reads them (blocking)."""
    path = metrics_path(directory, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".{os.getpid()}.tmp")
    temp.write_bytes(generate_latest(registry))
    os.replace(temp, path)


async def publish_forever(registry: CollectorRegistry, directory: Path, index: int) -> None:
    """A non-leader worker's loop: publish now and then (cancelled at shutdown)."""
    while True:
        try:
            await asyncio.to_thread(publish, registry, directory, index)
        except OSError as exc:
            log.warning("could not publish this worker's metrics: %s", exc)
        await asyncio.sleep(PUBLISH_INTERVAL)


def node_exposition(registry: CollectorRegistry, directory: Path, leader_index: int = 0) -> bytes:
    """The leader's registry plus every other worker's last published figures."""
    merged = {family.name: family for family in _parse(generate_latest(registry).decode())}
    folder = directory / "workers"
    for path in sorted(folder.glob("metrics-*.prom")) if folder.is_dir() else []:
        if path.name == f"metrics-{leader_index}.prom":
            continue
        with contextlib.suppress(OSError, ValueError):
            for family in _parse(path.read_text()):
                _add(merged, family)
    return generate_latest(_Fixed(list(merged.values())))  # type: ignore[arg-type]


def _parse(text: str) -> Iterator[Metric]:
    return text_string_to_metric_families(text)


def _add(merged: dict[str, Metric], family: Metric) -> None:
    """Sum `family` into the leader's family of that name (new families are taken whole)."""
    mine = merged.get(family.name)
    if mine is None:
        if family.type in SUMMED_TYPES or family.name in SUMMED_GAUGES:
            merged[family.name] = family
        return
    if mine.type not in SUMMED_TYPES and mine.name not in SUMMED_GAUGES:
        return
    index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine.samples)}
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue  # a creation time, not a count: the leader's stands
        key = (sample.name, tuple(sorted(sample.labels.items())))
        at = index.get(key)
        if at is None:
            index[key] = len(mine.samples)
            mine.samples.append(sample)
        else:
            mine.samples[at] = mine.samples[at]._replace(value=mine.samples[at].value + sample.value)


class _Fixed:
    """A collector yielding already merged families (for `generate_latest`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)
