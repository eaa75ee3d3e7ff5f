"""Just enough manifest parsing: media type, referenced descriptors, platforms.

The node never rewrites a manifest (that would change its digest); it reads
them to pick a platform from an index and to know which blobs an image needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mirror.errors import ManifestInvalid, ManifestUnknown
from mirror.registry import mediatypes
from mirror.registry.digest import Digest


@dataclass(frozen=True, slots=True)
class Platform:
    """The platform of an index entry (`linux/amd64`, `linux/arm64/v8`)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, value: str) -> Platform:
        """Parse `os/arch[/variant]`."""
        parts = value.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform must be os/arch[/variant], not {value!r}")
        return cls(*parts)

    def matches(self, other: Platform) -> bool:
        """True when `other` satisfies this filter (variant only if asked for)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content reference inside a manifest."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest: an image (config + layers) or an index (children)."""

    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    children: tuple[Descriptor, ...]

    @property
    def is_index(self) -> bool:
        """True for a Docker manifest list or an OCI index."""
        return self.media_type in mediatypes.INDEX_TYPES

    def blobs(self) -> tuple[Descriptor, ...]:
        """Config and layers of an image manifest."""
        return ((self.config,) if self.config else ()) + self.layers

    def child_for(self, platform: Platform) -> Descriptor | None:
        """The first index entry for `platform`, as distribution picks it."""
        for child in self.children:
            if child.platform and platform.matches(child.platform):
                return child
        return None


def detect_media_type(raw: bytes, content_type: str | None) -> str:
    """The manifest's media type, from the header or the body's `mediaType`.

    Raises:
        ManifestUnknown: the manifest is schema1, which this node does not serve.
        ManifestInvalid: the type is not a manifest type at all.
    """
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in mediatypes.MANIFEST_TYPES:
        media_type = _body_media_type(raw) or media_type
    if media_type in mediatypes.SCHEMA1_TYPES or _is_schema1(raw):
        raise ManifestUnknown("schema1 manifests are not supported by this mirror")
    if media_type not in mediatypes.MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {media_type[:100]!r}")
    return media_type


def parse(raw: bytes, media_type: str) -> Manifest:
    """Parse a manifest of a known media type.

    Raises:
        ManifestInvalid: the body is not a manifest of that type.
    """
    document = _load(raw)
    try:
        if media_type in mediatypes.INDEX_TYPES:
            children = tuple(_descriptor(d) for d in document.get("manifests") or ())
            return Manifest(media_type, None, (), children)
        config = _descriptor(document["config"])
        layers = tuple(_descriptor(d) for d in document.get("layers") or ())
        return Manifest(media_type, config, layers, ())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestInvalid(f"malformed {media_type} manifest") from exc


def _load(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestInvalid("manifest is not JSON") from exc
    if not isinstance(document, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    return document


def _body_media_type(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("mediaType")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _is_schema1(raw: bytes) -> bool:
    try:
        return json.loads(raw).get("schemaVersion") == 1
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def _descriptor(entry: dict[str, Any]) -> Descriptor:
    platform = entry.get("platform")
    return Descriptor(
        media_type=str(entry.get("mediaType", "")),
        digest=Digest.parse(entry["digest"]),
        size=int(entry["size"]),
        platform=(
            Platform(str(platform["os"]), str(platform["architecture"]), str(platform.get("variant", "")))
            if isinstance(platform, dict)
            else None
        ),
    )
