"""Prometheus metrics of one node, in a registry of its own (no global state).

Names follow Prometheus conventions with a `mirror_` prefix; every family is
created here, once, so the set is documented in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every metric family the node exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, ...], Any] = {}
        r = self.registry
        self.requests = Counter("mirror_http_requests", "API requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("mirror_http_request_duration_seconds", "API request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("mirror_cache_requests", "Cache outcomes by kind (manifest, blob)",
                             ["kind", "outcome"], registry=r)
        self.bytes_served = Counter("mirror_bytes_served", "Body bytes sent to clients", ["kind"], registry=r)
        self.bytes_saved = Counter("mirror_upstream_bytes_saved",
                                   "Blob bytes served from the store instead of upstream", registry=r)
        self.upstream_requests = Counter("mirror_upstream_requests", "Requests sent upstream",
                                         ["method", "status"], registry=r)
        self.upstream_errors = Counter("mirror_upstream_errors", "Upstream failures by kind",
                                       ["kind"], registry=r)
        self.upstream_seconds = Histogram("mirror_upstream_request_duration_seconds",
                                          "Time to upstream response headers", ["method"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_bytes = Counter("mirror_upstream_bytes", "Blob bytes received from upstream",
                                      registry=r)
        self.stale_tags = Counter("mirror_stale_tags_served", "Tags served stale while upstream failed",
                                  registry=r)
        self.evictions = Counter("mirror_evictions", "Objects evicted from the store", registry=r)
        self.evicted_bytes = Counter("mirror_evicted_bytes", "Bytes evicted from the store", registry=r)
        self.store_bytes = Gauge("mirror_store_bytes", "Bytes of objects in the store", registry=r)
        self.store_objects = Gauge("mirror_store_objects", "Objects in the store", registry=r)
        self.inflight = Gauge("mirror_inflight_fetches", "Blob fetches in progress", registry=r)
        self.fill_failures = Counter("mirror_fill_failures", "Blob fetches (cache fills) that ended in an error",
                                     ["code"], registry=r)
        self.upstream_up = Gauge("mirror_upstream_up", "1 when upstream answered the last probe of /v2/",
                                 registry=r)
        self.upstream_probe_seconds = Gauge("mirror_upstream_probe_seconds",
                                            "Duration of the last upstream probe of /v2/", registry=r)
        self.store_limits = Gauge("mirror_store_limit_bytes",
                                  "Store quota and watermarks (level: max, high, low); absent when unbounded",
                                  ["level"], registry=r)
        self.disk_bytes = Gauge("mirror_disk_bytes", "The store's file system (kind: total, free)", ["kind"],
                                registry=r)
        self.corrupt = Counter("mirror_corrupt_objects", "Stored objects found corrupt and quarantined, "
                               "by what found them (serve: hashed while first served; scrub)",
                               ["found_by"], registry=r)
        self.scrub_objects = Counter("mirror_scrub_objects", "Objects re-hashed by the background scrub",
                                     registry=r)
        self.scrub_bytes = Counter("mirror_scrub_bytes", "Bytes re-hashed by the background scrub",
                                   registry=r)
        self.scrub_last_pass = Gauge("mirror_scrub_last_complete_pass_timestamp_seconds",
                                     "When the background scrub last finished a pass over the whole store",
                                     registry=r)
        self.unknown_namespaces = Counter("mirror_unknown_namespace",
                                          "Requests whose ?ns= names a registry other than the upstream "
                                          "(404; see mirror.names)", registry=r)
        self.registry_requests = Counter("mirror_registry_requests",
                                         "Requests sent upstream, by registry (proxy.remoteurl's host, "
                                         "or a mirror.upstreams prefix)", ["upstream", "method", "status"],
                                         registry=r)
        self.registry_cache = Counter("mirror_registry_cache_requests",
                                      "Cache outcomes by registry (proxy.remoteurl's host, or a "
                                      "mirror.upstreams prefix) and kind", ["upstream", "kind", "outcome"],
                                      registry=r)
        self.offline_tokens = Counter("mirror_offline_tokens_issued",
                                      "Tokens the node signed itself while the auth service was unreachable",
                                      registry=r)

    def child(self, family: str, *labels: str) -> Any:
        """`self.<family>.labels(*labels)`, bound once per label set.

        `labels()` validates and looks up under a lock on every call; on the
        hot path (every request's counters) that shows in a profile.
        """
        key = (family, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, family).labels(*labels)
        return found

    def track_inflight(self, count: Callable[[], int]) -> None:
        """Read the in-flight gauge from the fetcher at scrape time."""
        self.inflight.set_function(lambda: float(count()))

    def exposition(self) -> bytes:
        """The text format for `/metrics`."""
        return generate_latest(self.registry)


def sample_sum(metric: Any, suffix: str = "", **labels: str) -> float:
    """The sum of a family's samples named `<name><suffix>` whose labels match.

    The status page reads its figures through this, from the very objects
    `/metrics` exposes, so the two never disagree.
    """
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
