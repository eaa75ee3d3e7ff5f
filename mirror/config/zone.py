"""`mirror.zone`: the peers this node shares one cache with (absent: the node is alone).

Parsed with the config module's own scalar parsers so every bad value is one
line naming its key. `self` may come from the environment
(`REGISTRY_MIRROR_ZONE_SELF`, a pod IP) and so may the secret
(`REGISTRY_MIRROR_ZONE_SECRET`): both are ordinary env overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from mirror.config.errors import ConfigError
from mirror.config.parsers import _boolean, _http_url, _http_urls, _positive_duration, _string

#: Keys of `mirror.zone` (the config schema reads them from here: one list).
ZONE_KEYS = ("self", "peers", "secret", "connect_timeout", "read_timeout", "down_for",
             "resolve_interval", "keep_copy", "max_skew")
#: Shortest secret accepted: it is all that stands between a network and the peer interface.
MIN_SECRET = 16


@dataclass(frozen=True, slots=True, repr=False)
class ZoneSettings:
    self_url: str  # this node as its peers reach it (`mirror.zone.self`), no trailing slash
    peers: tuple[str, ...]  # the whole zone, self included; a host may be a DNS name of several
    secret: str  # authenticates node-to-node requests (HMAC); redacted in repr
    connect_timeout: float = 0.5  # seconds; a peer slower to accept is marked down
    # seconds idle between two reads from a peer; above mirror.upstream.read_timeout (60s), since an
    # owner waits that long for upstream's headers before it answers 503 itself
    read_timeout: float = 70.0
    down_for: float = 15.0  # seconds a peer that failed is skipped
    resolve_interval: float = 30.0  # seconds between DNS re-resolutions of peer names
    keep_copy: bool = False  # a non-owner also stores what it streams from the owner
    max_skew: float = 60.0  # seconds a signed peer request's timestamp may be off

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={'***' if f.name == 'secret' else repr(getattr(self, f.name))}"
                          for f in fields(self))
        return f"ZoneSettings({shown})"


def zone_settings(section: Any) -> ZoneSettings | None:
    """`mirror.zone` from its config section (a `_Section`); None when absent.

    Raises:
        ConfigError: a bad value, or peers without a secret or without `self`.
    """
    peers = section.get("peers", _http_urls, ())
    self_url = section.get("self", _http_url)
    secret = section.get("secret", _string)
    if not peers and self_url is None and secret is None and not section.data:
        return None
    if not peers:
        raise ConfigError(section.key("peers"), "required: the whole zone, this node included")
    if self_url is None:
        raise ConfigError(section.key("self"), "required: this node's URL as its peers reach it "
                            "(or REGISTRY_MIRROR_ZONE_SELF)")
    if secret is None:
        raise ConfigError(section.key("secret"), "required with peers: it authenticates "
                            "node-to-node requests (or REGISTRY_MIRROR_ZONE_SECRET)")
    if len(secret.strip()) < MIN_SECRET:
        raise ConfigError(section.key("secret"), f"too short: at least {MIN_SECRET} characters")
    for i, url in enumerate(peers):
        if urlsplit(url).path.strip("/"):
            raise ConfigError(section.key(f"peers[{i}]"), f"expected a base URL without a path, got {url!r}")
    values = {
        "connect_timeout": section.get("connect_timeout", _positive_duration),
        "read_timeout": section.get("read_timeout", _positive_duration),
        "down_for": section.get("down_for", _positive_duration),
        "resolve_interval": section.get("resolve_interval", _positive_duration),
        "keep_copy": section.get("keep_copy", _boolean),
        "max_skew": section.get("max_skew", _positive_duration),
    }
    return ZoneSettings(self_url=normalized(self_url), peers=tuple(normalized(p) for p in peers),
                        secret=secret.strip(),
                        **{name: value for name, value in values.items() if value is not None})


def normalized(url: str) -> str:
    """A peer's base URL as compared and signed: lower-case scheme and host, no trailing slash."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"
