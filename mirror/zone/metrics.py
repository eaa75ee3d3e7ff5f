"""`mirror_zone_*` metrics, registered in the node's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ZoneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.peer_fetches = Counter("mirror_zone_peer_fetches", "Blob requests sent to peers by outcome "
                                    "(ok, down, refused)", ["outcome"], registry=r)
        self.peer_bytes = Counter("mirror_zone_peer_bytes", "Blob bytes received from peers", registry=r)
        self.peer_sourced = Counter("mirror_zone_peer_sourced", "Fills an owner took from a peer holding "
                                    "the object instead of upstream", registry=r)
        self.relayed = Counter("mirror_zone_relayed", "Client blob requests a non-owner streamed from "
                               "the owner", registry=r)
        self.served = Counter("mirror_zone_served", "Peer requests this node answered, by path "
                              "(blobs, held)", ["path"], registry=r)
        self.refused = Counter("mirror_zone_refused", "Peer requests refused (bad or missing signature)",
                               registry=r)
        self.peers = Gauge("mirror_zone_peers", "Zone members by state (up, down)", ["state"], registry=r)
