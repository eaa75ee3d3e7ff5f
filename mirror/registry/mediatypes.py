"""Manifest and blob media types, and Accept-header negotiation helpers."""

from __future__ import annotations

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: Every manifest type this node stores and serves; always asked of upstream.
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
OCI_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, "application/json"})
UPSTREAM_ACCEPT = ", ".join(MANIFEST_TYPES)


def parse_accept(values: list[str]) -> frozenset[str]:
    """The set of media types named in one or more Accept headers.

    Parameters (`;q=0.5`) are dropped, as distribution does: it only checks
    membership. A wildcard is kept as `*/*` so callers can test for it.
    """
    accepted: set[str] = set()
    for header in values:
        for part in header.split(","):
            media_type = part.split(";", 1)[0].strip().lower()
            if media_type in ("*/*", "application/*"):
                media_type = "*/*"
            if media_type:
                accepted.add(media_type)
    return frozenset(accepted)


def accepts(accepted: frozenset[str], media_type: str) -> bool:
    """True when a client with this Accept set may receive `media_type`."""
    return media_type in accepted or "*/*" in accepted
