"""Settings read from CNCF distribution's (registry:2) ``config.yml``, plus our ``mirror:`` section.

An operator swaps ``registry serve config.yml`` for ``mirror serve config.yml`` and keeps the file,
so every key distribution accepts is accepted here, in one of three ways:

* **used**: ``version``, ``log.level`` (or the legacy ``loglevel``), ``log.formatter``,
  ``storage.filesystem.rootdirectory``, ``http.addr``, ``http.net`` (tcp only), ``http.host``,
  ``http.debug.addr``, ``http.headers``, ``http.tls.certificate``/``key``/``clientcas``/
  ``clientauth``/``minimumtls``, ``proxy.*``, ``auth.token`` (with ``autoredirect``),
  ``auth.htpasswd`` and ``notifications.endpoints``;
* **accepted but ignored** (``storage.cache``, ``http.secret``, ``log.fields``, ``redis``, other
  storage drivers...): returned in ``Settings.ignored_keys`` so the caller logs ONE warning;
* **refused** (``_Refuse``): keys the node cannot honour whose ignoring would weaken security
  (``http.tls.ciphersuites``, ``http.tls.letsencrypt``, ``auth.silly``,
  ``auth.token.jwksrefreshinterval``), and unknown keys under ``auth.`` and ``http.tls.``: a
  ``ConfigError`` naming the key, so nothing fails open;
* **unknown** to distribution and to us: returned in ``Settings.unknown_keys`` (a warning too).

``proxy.ttl`` is parsed but only documented: content leaves the store by quota (``mirror.cache``),
not by age, and tag freshness is ``mirror.tag_ttl``. Without a ``proxy:`` section the mirror
fronts Docker Hub (distribution would instead run as a plain registry).

Our own section; unknown keys in it are errors, since nobody else reads it. Defaults shown::

    mirror:
      tag_ttl: 60s          # a cached tag -> digest answer is trusted this long
      tag_max_stale: 168h   # a cached tag may still be served this long while upstream fails
      negative_ttl: 5s      # upstream 404s are remembered this long
      metadata_dir: ~       # default <storage root>/metadata. SQLite lives here, so it MUST be
                            # a local disk: SQLite locking is unsafe on NFS/NAS. Set it when the
                            # storage root is a shared NAS mount.
      upstream:
        connect_timeout: 10s
        read_timeout: 60s   # idle time allowed between two reads, not a total
        pool_timeout: 30s   # wait for a free connection from the pool
        max_connections: 64
        max_keepalive: 32
        keepalive_expiry: 60s
        retries: 3
        max_concurrency: 0  # concurrent upstream requests; 0 = unlimited
        max_bandwidth: 0    # bytes per second ("100MB", "100MB/s"); 0 = unlimited
      cache:
        max_size: ~         # bytes, "200GiB", or a share of the disk "80%"; unset = unbounded
        high_watermark: 0.95  # eviction starts above this fraction of max_size...
        low_watermark: 0.85   # ...and runs until usage is below this one
      auth:
        mode: local           # local | forward
        token_proxy: false
        offline_grace: 24h    # with token_proxy: known users get node-signed tokens this long
                              # after their credentials last worked online; 0 = never
        offline_key: ~        # the key node tokens are signed with; give every node behind
                              # one front the same file. Default <metadata_dir>/node-token-key.pem
      admin: {token: ~, trust_loopback: true}   # the token authorizes purge, gc, prewarm...
      passthrough_writes: false
      trusted_proxies: []   # CIDRs (or single IPs) whose forwarding headers are believed
      notify: {token: ~, forward_to: [], allow_insecure_forward: false}   # /admin/notify only
      prefetch: {rules: [], keep_fresh: 0, interval: 10m}   # rules are glob strings
      client_idle_timeout: 60s
      manifest_max_size: 4MiB
      scrub: {interval: 168h}  # re-hash the whole store once per interval, paced; 0 = off
      shutdown_grace: 20s   # on SIGTERM, requests in flight get this long, then are cut
      names: []             # other registry names meaning this upstream (containerd's ?ns=)
      workers: auto         # processes serving http.addr over one store: the CPUs available; 1 = one process

Durations are Go durations ("300ms", "1h30m", plus "d" for days) or plain numbers of seconds.
Sizes are bytes or "500MB" (1000-based), "1.5GiB" (1024-based); bare K/M/G/T/P are 1024-based.

Environment overrides work as in distribution: ``REGISTRY_`` + the upper-cased key path joined by
``_`` (``REGISTRY_HTTP_DEBUG_ADDR``, ``REGISTRY_MIRROR_UPSTREAM_READ_TIMEOUT``); our keys contain
underscores, so names are resolved against the known key tree. A value is taken as text, except
that ``[...]``/``{...}`` is YAML flow (lists, mappings) and an empty value means "unset". Env wins
over the file; a variable that names no key lands in ``unknown_keys`` as ``env:REGISTRY_...``.

Scalars from the file are kept as their YAML text (``0123`` stays ``"0123"``, ``0.1`` stays
``"0.1"``), so passwords and versions survive YAML 1.1's number guessing, as in distribution.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import yaml

from mirror.zone.settings import ZONE_KEYS, zone_settings

__all__ = [
    "AdminSettings",
    "AuthSettings",
    "CacheSettings",
    "ConfigError",
    "HtpasswdSettings",
    "HttpSettings",
    "LogSettings",
    "MirrorAuthSettings",
    "MirrorSettings",
    "NotificationEndpoint",
    "NotifySettings",
    "PrefetchSettings",
    "ScrubSettings",
    "ProxySettings",
    "Settings",
    "StorageSettings",
    "TLSSettings",
    "TokenAuthSettings",
    "UpstreamSettings",
    "load_settings",
    "parse_duration",
    "parse_size",
]

DOCKER_HUB = "https://registry-1.docker.io"
_T = TypeVar("_T")
MiB = 1024 * 1024


class ConfigError(Exception):
    """A setting is missing, malformed or contradictory; ``str()`` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        # One line, always: the CLI prints it as is and exits 2.
        self.key = " ".join(str(key).splitlines())
        self.message = " ".join(message.splitlines())
        super().__init__(self.key, self.message)

    def __str__(self) -> str:
        return f"config: {self.key}: {self.message}"


# --- scalar parsers: (value, key) -> parsed value, raising ConfigError naming the key ----------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# "kb" is 1000-based, "kib" and bare "k" are 1024-based (as nginx and docker --memory read "k").
_SIZE_UNITS = {"": 1, "b": 1} | {
    f"{prefix}{suffix}": base ** (power + 1)
    for power, prefix in enumerate("kmgtp")
    for suffix, base in (("", 1024), ("ib", 1024), ("b", 1000))
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})


def _kind(value: Any) -> str:
    """Names a YAML value's type for error messages."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else type(value).__name__


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a Go duration ("300ms", "1h30m", "7d") or a plain number of seconds.

    Raises:
        ConfigError: on anything else, on negative or non-finite values.
    """
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(key, f"invalid duration {value!r} (examples: 30s, 5m, 1h)")
    return seconds


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a size string ("500MB" = 500*1000**2, "1.5GiB" = 1.5*1024**3).

    Raises:
        ConfigError: on unknown units, negative numbers, or fractional bytes without a unit.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    unit = _SIZE_UNITS.get(match[2].lower()) if match else None
    if match is None or unit is None or (unit == 1 and "." in match[1]):
        raise ConfigError(key, f"invalid size {value!r} (examples: 4096, 500MB, 1.5GiB)")
    return int(Fraction(match[1]) * unit)


def _positive_duration(value: Any, key: str) -> float:
    """A duration where zero would mean "wait forever" or "never", which we never want."""
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return seconds


def _positive_size(value: Any, key: str) -> int:
    size = parse_size(value, key)
    if size <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return size


def _bandwidth(value: Any, key: str) -> int:
    """Bytes per second; a "/s" suffix is allowed since people write rates that way."""
    if isinstance(value, str) and value.strip().lower().endswith("/s"):
        value = value.strip()[:-2]
    return parse_size(value, key)


def _integer(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value)
    raise ConfigError(key, f"expected an integer, got {value!r}")


def _non_negative_int(value: Any, key: str) -> int:
    number = _integer(value, key)
    if number < 0:
        raise ConfigError(key, f"must not be negative, got {value!r}")
    return number


def _positive_int(value: Any, key: str) -> int:
    number = _integer(value, key)
    if number <= 0:
        raise ConfigError(key, f"must be greater than zero, got {value!r}")
    return number


def _workers(value: Any, key: str) -> int:
    """`mirror.workers`: a count of processes, or "auto" (0: the CPUs this process may use)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    try:
        return _positive_int(value, key)
    except ConfigError:
        raise ConfigError(key, f"expected auto or a count of processes (1 or more), got {value!r}") from None


def _boolean(value: Any, key: str) -> bool:
    """YAML 1.1 booleans, as distribution's yaml.v2 reads them."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _fraction(value: Any, key: str) -> float:
    """A number in (0, 1], for watermarks."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0 < number <= 1:
        raise ConfigError(key, f"expected a number between 0 and 1, got {value!r}")
    return number


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_kind(value)}")
    return value


def _path(value: Any, key: str) -> Path:
    return Path(_string(value, key))


def _strings(value: Any, key: str) -> tuple[str, ...]:
    """A list of strings; one comma-separated string is accepted too, which suits env variables."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of strings, got {_kind(value)}")
    items = tuple(_string(item, f"{key}[{i}]").strip() for i, item in enumerate(value))
    if "" in items:
        raise ConfigError(f"{key}[{items.index('')}]", "must not be empty")
    return items


def _http_url(value: Any, key: str) -> str:
    text = _string(value, key).strip()
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(key, f"invalid port in URL {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http(s) URL with a host, got {text!r}")
    return text


def _http_urls(value: Any, key: str) -> tuple[str, ...]:
    return tuple(_http_url(url, f"{key}[{i}]") for i, url in enumerate(_strings(value, key)))


def _remote_url(value: Any, key: str) -> str:
    """The upstream base URL, without a trailing slash so paths can be appended."""
    return _http_url(value, key).rstrip("/")


def _registry_names(value: Any, key: str) -> tuple[str, ...]:
    """Registry host names ("hub.example.com", "10.0.0.5:5000"), lower-cased, as containerd's ?ns=."""
    names = _strings(value, key)
    for i, name in enumerate(names):
        if not _is_registry_host(name):
            raise ConfigError(f"{key}[{i}]",
                              f"expected a registry host name (host or host:port), got {name!r}")
    return tuple(name.lower() for name in names)


def _is_registry_host(text: str) -> bool:
    """`host` or `host:port`, nothing more (no scheme, path or credentials)."""
    parts = urlsplit(f"//{text}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    plain = re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", text) is not None
    return plain and bool(parts.hostname) and parts.netloc == text


def _networks(value: Any, key: str) -> tuple[str, ...]:
    """CIDRs in canonical form; host bits are dropped ("10.1.2.3/8" -> "10.0.0.0/8")."""
    networks = []
    for i, text in enumerate(_strings(value, key)):
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{key}[{i}]", f"invalid CIDR {text!r}") from None
    return tuple(networks)


def _host_port(value: Any, key: str) -> tuple[str, int]:
    """Splits Go's "host:port" / ":port" / "[v6]:port"; host "" means every interface."""
    text = _string(value, key).strip()
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    valid_host = _is_ipv6(host) if bracketed else ":" not in host
    if not sep or not valid_host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError(key, f"expected host:port or :port with a port 0-65535, got {text!r}")
    return host, int(port)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _address(value: Any, key: str) -> str:
    _host_port(value, key)
    return _string(value, key).strip()


def _one_of(*choices: str, aliases: Mapping[str, str] | None = None) -> Callable[[Any, str], str]:
    """A parser accepting the given words case-insensitively, mapping aliases to their meaning."""

    def parse(value: Any, key: str) -> str:
        text = _string(value, key).strip().lower()
        if text not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return (aliases or {}).get(text, text)

    return parse


# --- settings ---------------------------------------------------------------------------------


def _redacting_repr(obj: Any, secrets: frozenset[str]) -> str:
    """A dataclass repr that shows '***' for secrets, so settings can be logged whole."""

    def show(name: str) -> str:
        value = getattr(obj, name)
        return "'***'" if name in secrets and value else repr(value)

    shown = ", ".join(f"{f.name}={show(f.name)}" for f in fields(obj))
    return f"{type(obj).__name__}({shown})"


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"  # panic|fatal|error|warn|info|debug|trace ("warning" reads as "warn")
    formatter: str = "text"  # text|json ("logstash" reads as "json")


@dataclass(frozen=True, slots=True)
class StorageSettings:
    # Default ./data without a file; /var/lib/registry when `storage.filesystem` omits the
    # rootdirectory, which is where distribution's filesystem driver would have put the data.
    root: Path = Path("data")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    certificate: Path
    key: Path
    clientcas: tuple[Path, ...] = ()  # CA files client certificates must chain to; () = no mTLS
    clientauth: str = "require-and-verify-client-cert"  # or verify-client-cert-if-given
    minimumtls: str = "tls1.2"  # tls1.0/tls1.1 still mean 1.2 (never weaker); tls1.3


@dataclass(frozen=True, slots=True)
class HttpSettings:
    addr: str = ":5000"  # Go listen address: "host:port", ":port" or "[v6]:port"
    host: str | None = None  # externally visible base URL, used to build absolute URLs
    debug_addr: str | None = None  # metrics/debug listener; None = off
    tls: TLSSettings | None = None  # None = plain HTTP (TLS usually ends at nginx)
    # distribution's http.headers: added to every response that does not set them itself
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _no_headers())

    @property
    def bind(self) -> tuple[str, int]:
        """(host, port) for the listener; ":5000" binds every IPv4 interface."""
        return _bind(self.addr, "http.addr")

    @property
    def debug_bind(self) -> tuple[str, int] | None:
        return _bind(self.debug_addr, "http.debug.addr") if self.debug_addr else None


def _bind(addr: str, key: str) -> tuple[str, int]:
    host, port = _host_port(addr, key)
    return host or "0.0.0.0", port


@dataclass(frozen=True, slots=True, repr=False)
class ProxySettings:
    remoteurl: str = DOCKER_HUB  # upstream registry, no trailing slash
    username: str | None = None  # upstream credentials; both or neither
    password: str | None = None  # redacted in repr
    ttl: float | None = None  # parsed, not enforced: eviction is by quota, tags use mirror.tag_ttl

    def __repr__(self) -> str:
        return _redacting_repr(self, frozenset({"password"}))


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 60.0  # seconds idle between two reads, not a total
    pool_timeout: float = 30.0  # seconds waiting for a free pooled connection
    max_connections: int = 64
    max_keepalive: int = 32  # at most max_connections
    keepalive_expiry: float = 60.0  # seconds
    retries: int = 3
    max_concurrency: int = 0  # concurrent upstream requests; 0 = unlimited
    max_bandwidth: int = 0  # bytes per second; 0 = unlimited


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_size: int | None = None  # bytes; None = no byte quota
    max_size_percent: float | None = None  # from "80%": percent of the store's disk, in (0, 100]
    high_watermark: float = 0.95  # eviction starts above this fraction of the quota
    low_watermark: float = 0.85  # and stops below this one; 0 < low < high <= 1


@dataclass(frozen=True, slots=True)
class MirrorAuthSettings:
    mode: str = "local"  # local | forward
    token_proxy: bool = False
    offline_grace: float = 86400.0  # seconds credentials learned online serve offline; 0 = off
    offline_key: Path | None = None  # node token key; None = <metadata_dir>/node-token-key.pem


@dataclass(frozen=True, slots=True, repr=False)
class AdminSettings:
    token: str | None = None  # None = admin API off; redacted in repr
    # Without a token, loopback callers are trusted. False where "loopback" is every process of a
    # host (hostNetwork): then the admin API answers only with the token.
    trust_loopback: bool = True

    def __repr__(self) -> str:
        return _redacting_repr(self, frozenset({"token"}))


@dataclass(frozen=True, slots=True, repr=False)
class NotifySettings:
    forward_to: tuple[str, ...] = ()  # https URLs (http only with allow_insecure_forward)
    token: str | None = None  # bearer secret of /admin/notify alone (not the admin one); redacted
    allow_insecure_forward: bool = False  # let forward_to use plain http

    def __repr__(self) -> str:
        return _redacting_repr(self, frozenset({"token"}))


@dataclass(frozen=True, slots=True)
class PrefetchSettings:
    rules: tuple[str, ...] = ()  # glob strings
    keep_fresh: int = 0
    interval: float = 600.0  # seconds


@dataclass(frozen=True, slots=True)
class ScrubSettings:
    interval: float = 7 * 86400.0  # seconds for one paced pass over the whole store; 0 = off


@dataclass(frozen=True, slots=True, repr=False)
class RegistrySettings:
    """One of `mirror.upstreams`: a registry besides `proxy.remoteurl`, with its own client."""

    names: tuple[str, ...]  # lower case; `prefix` is the first one that is a repository component
    remoteurl: str
    username: str | None = None  # both or neither; redacted in repr
    password: str | None = None
    tag_ttl: float | None = None  # None: mirror.tag_ttl
    tag_max_stale: float | None = None  # None: mirror.tag_max_stale
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)  # over mirror.upstream

    @property
    def prefix(self) -> str:
        """The name its repositories are keyed under (`<prefix>/<repo>`) and addressed by."""
        return next(name for name in self.names if _REPOSITORY_COMPONENT.fullmatch(name))

    def __repr__(self) -> str:
        return _redacting_repr(self, frozenset({"password"}))


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    tag_ttl: float = 60.0  # seconds a cached tag is trusted without asking upstream
    tag_max_stale: float = 7 * 86400.0  # seconds a cached tag may be served while upstream fails
    negative_ttl: float = 5.0  # seconds an upstream 404 is remembered
    metadata_dir: Path | None = None  # None = <storage root>/metadata; must be local disk (SQLite)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    auth: MirrorAuthSettings = field(default_factory=MirrorAuthSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    passthrough_writes: bool = False
    trusted_proxies: tuple[str, ...] = ()  # canonical CIDR strings
    notify: NotifySettings = field(default_factory=NotifySettings)
    prefetch: PrefetchSettings = field(default_factory=PrefetchSettings)
    client_idle_timeout: float = 60.0  # seconds
    manifest_max_size: int = 4 * MiB  # bytes
    scrub: ScrubSettings = field(default_factory=ScrubSettings)
    shutdown_grace: float = 20.0  # seconds in-flight requests get on SIGTERM (platforms kill at 30)
    names: tuple[str, ...] = ()  # extra registry names (lower case) meaning proxy.remoteurl
    upstreams: tuple[RegistrySettings, ...] = ()  # further registries served by this node (README)
    workers: int = 0  # worker processes serving http.addr; 0 ("auto", the default) = the CPUs available
    zone: Any = None  # mirror.zone.settings.ZoneSettings; None = the node is alone (mirror.zone)


@dataclass(frozen=True, slots=True)
class TokenAuthSettings:
    realm: str  # where clients get tokens (sent in the WWW-Authenticate challenge)
    service: str  # expected token audience
    issuer: str  # expected token issuer
    rootcertbundle: Path | None = None  # certificates whose keys sign tokens; this or jwks
    jwks: Path | None = None
    signingalgorithms: tuple[str, ...] = ()  # () = the verifier's default set
    autoredirect: bool = False  # realm = this node's external base + autoredirectpath
    autoredirectpath: str = "/auth/token"


@dataclass(frozen=True, slots=True)
class HtpasswdSettings:
    realm: str
    path: Path


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """At most one provider, as in distribution; both None = no client auth."""

    token: TokenAuthSettings | None = None
    htpasswd: HtpasswdSettings | None = None


def _no_headers() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, repr=False)
class NotificationEndpoint:
    """One webhook; non-positive timeout/threshold/backoff take distribution's defaults."""

    name: str
    url: str
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=_no_headers)  # redacted in repr
    timeout: float = 1.0  # seconds
    threshold: int = 10  # failures before backing off
    backoff: float = 1.0  # seconds
    ignoredmediatypes: tuple[str, ...] = ()  # ignoredmediatypes + ignore.mediatypes
    ignore_actions: tuple[str, ...] = ()  # ignore.actions
    disabled: bool = False

    def __repr__(self) -> str:
        return _redacting_repr(self, frozenset({"headers"}))


@dataclass(frozen=True, slots=True)
class Settings:
    version: str = "0.1"
    log: LogSettings = field(default_factory=LogSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    notifications: tuple[NotificationEndpoint, ...] = ()
    mirror: MirrorSettings = field(default_factory=MirrorSettings)
    source: Path | None = field(default=None, compare=False)  # the file read (SIGHUP re-reads mirror.zone)
    ignored_keys: tuple[str, ...] = ()  # accepted by distribution, not used here: warn once
    unknown_keys: tuple[str, ...] = ()  # known to nobody (env ones as "env:NAME"): warn

    @property
    def metadata_dir(self) -> Path:
        return self.mirror.metadata_dir or self.storage.root / "metadata"


# --- the key tree: what distribution accepts, what we use ------------------------------------

USE = "use"  # a key we read
IGNORE = "ignore"  # a key (and its whole subtree) distribution accepts and we do not read


@dataclass(frozen=True, slots=True)
class _Refuse:
    """A key distribution accepts that the node cannot honour, and ignoring it would weaken
    security: set (non-empty), it stops the start with one line naming it."""

    reason: str


#: Sections where an unknown key is refused, not warned about: a typo there (`clientca`)
#: would silently serve with less security than the operator wrote.
_STRICT_SECTIONS = ("auth.", "http.tls.")


@dataclass(frozen=True, slots=True)
class _ListOf:
    """A list whose items all follow one mapping schema (notification endpoints)."""

    item: dict[str, Any]


_STORAGE_DRIVERS = ("filesystem", "inmemory", "s3", "s3aws", "azure", "gcs", "swift", "oss")
_STORAGE_OPTIONS = ("delete", "cache", "maintenance", "redirect", "tag")
_AUTH_PROVIDERS = ("token", "htpasswd", "silly")

_UPSTREAM_FIELDS = {
    "connect_timeout": _positive_duration,
    "read_timeout": _positive_duration,
    "pool_timeout": _positive_duration,
    "max_connections": _positive_int,
    "max_keepalive": _non_negative_int,
    "keepalive_expiry": parse_duration,
    "retries": _non_negative_int,
    "max_concurrency": _non_negative_int,
    "max_bandwidth": _bandwidth,
}
_CACHE_FIELDS = {"high_watermark": _fraction, "low_watermark": _fraction}
_MIRROR_AUTH_FIELDS = {"mode": _one_of("local", "forward"), "token_proxy": _boolean,
                       "offline_grace": parse_duration, "offline_key": _path}
_ADMIN_FIELDS = {"token": _string, "trust_loopback": _boolean}
_NOTIFY_FIELDS = {"forward_to": _http_urls, "token": _string, "allow_insecure_forward": _boolean}
_PREFETCH_FIELDS = {
    "rules": _strings,
    "keep_fresh": _non_negative_int,
    "interval": _positive_duration,
}
_SCRUB_FIELDS = {"interval": parse_duration}
_MIRROR_FIELDS = {
    "tag_ttl": parse_duration,
    "tag_max_stale": parse_duration,
    "negative_ttl": parse_duration,
    "metadata_dir": _path,
    "passthrough_writes": _boolean,
    "trusted_proxies": _networks,
    "client_idle_timeout": _positive_duration,
    "manifest_max_size": _positive_size,
    "shutdown_grace": parse_duration,
    "names": _registry_names,
    "workers": _workers,
}
_REGISTRY_FIELDS = {"names": _registry_names, "remoteurl": _remote_url, "username": _string,
                    "password": _string, "tag_ttl": parse_duration, "tag_max_stale": parse_duration}
#: A name that can lead a repository path (`/v2/ghcr.io/org/app/...`): no port, lower case.
_REPOSITORY_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TOKEN_FIELDS = {
    "realm": _string,
    "service": _string,
    "issuer": _string,
    "rootcertbundle": _path,
    "jwks": _path,
    "signingalgorithms": _strings,
    "autoredirect": _boolean,
    "autoredirectpath": _string,
}
_JWS_ALGORITHMS = (
    "EdDSA",
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
)


def _uses(*names: str) -> dict[str, Any]:
    return dict.fromkeys(names, USE)


def _ignores(*names: str) -> dict[str, Any]:
    return dict.fromkeys(names, IGNORE)


def _mirror_schema() -> dict[str, Any]:
    """Derived from the parser tables, so the accepted keys and the parsed keys cannot drift."""
    return {
        **_uses(*_MIRROR_FIELDS),
        "upstream": _uses(*_UPSTREAM_FIELDS),
        "upstreams": _ListOf({**_uses(*_REGISTRY_FIELDS), "upstream": _uses(*_UPSTREAM_FIELDS)}),
        "cache": _uses("max_size", *_CACHE_FIELDS),
        "auth": _uses(*_MIRROR_AUTH_FIELDS),
        "admin": _uses(*_ADMIN_FIELDS),
        "notify": _uses(*_NOTIFY_FIELDS),
        "prefetch": _uses(*_PREFETCH_FIELDS),
        "scrub": _uses(*_SCRUB_FIELDS),
        "zone": _uses(*ZONE_KEYS),
    }


def _schema() -> dict[str, Any]:
    """Every key of distribution 2.8/3.x's configuration.go, marked USE or IGNORE, plus ours."""
    tls = {
        **_uses("certificate", "key", "clientcas", "clientauth", "minimumtls"),
        "ciphersuites": _Refuse("not supported: the node offers OpenSSL's TLS 1.2+ defaults "
                                "(remove the key, or restrict ciphers at the TLS front)"),
        "letsencrypt": _Refuse("not supported: set http.tls.certificate and key (certificates "
                               "from certbot or the platform)"),
    }
    http = {
        **_uses("addr", "net", "host", "headers"),
        **_ignores("prefix", "secret", "relativeurls", "draintimeout", "http2", "h2c"),
        "tls": tls,
        "debug": {"addr": USE, "prometheus": IGNORE},
    }
    endpoint = {
        **_uses(
            "name",
            "disabled",
            "url",
            "headers",
            "timeout",
            "threshold",
            "backoff",
            "ignoredmediatypes",
        ),
        "ignore": _uses("mediatypes", "actions"),
    }
    return {
        **_uses("version", "loglevel"),
        "log": {
            **_uses("level", "formatter"),
            **_ignores("fields", "hooks", "accesslog", "reportcaller"),
        },
        "storage": {
            **_ignores(*_STORAGE_DRIVERS, *_STORAGE_OPTIONS),
            "filesystem": {"rootdirectory": USE, "maxthreads": IGNORE},
        },
        "auth": {
            "token": {
                **_uses(*_TOKEN_FIELDS),
                "jwksrefreshinterval": _Refuse("not supported: the node re-reads jwks on SIGHUP "
                                               "(systemctl reload); remove the key"),
            },
            "htpasswd": _uses("realm", "path"),
            "silly": _Refuse("not supported: a development-only provider that lets anyone in "
                             "(use token or htpasswd)"),
        },
        "http": http,
        "notifications": {"events": IGNORE, "endpoints": _ListOf(endpoint)},
        "proxy": _uses("remoteurl", "username", "password", "ttl"),
        "mirror": _mirror_schema(),
        **_ignores(
            "middleware",
            "reporting",
            "redis",
            "health",
            "catalog",
            "validation",
            "compatibility",
            "policy",
        ),
    }


def _as_mapping(value: Any, key: str) -> Mapping[str, Any]:
    """An empty YAML section (``log:``) is an empty mapping; anything else must be a mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {_kind(value)}")
    return value


def _classify(value: Any, node: Any, key: str, ignored: list[str], unknown: list[str]) -> None:
    """Walks the raw tree against the schema, collecting ignored and unknown dotted keys.

    Raises:
        ConfigError: where a mapping or list is expected and something else is found, and for
            unknown keys under ``mirror`` (our section: a typo there must not pass silently).
    """
    if node == IGNORE:
        ignored.append(key)
    elif isinstance(node, _Refuse):
        if value not in (None, "", [], {}):
            raise ConfigError(key, node.reason)
    elif isinstance(node, _ListOf):
        items = [] if value is None else value
        if not isinstance(items, list):
            raise ConfigError(key, f"expected a list, got {_kind(items)}")
        for i, item in enumerate(items):
            _classify(item, node.item, f"{key}[{i}]", ignored, unknown)
    elif isinstance(node, dict):
        for name, child in _as_mapping(value, key or "<document>").items():
            child_key = f"{key}.{name}" if key else str(name)
            if name in node:
                _classify(child, node[name], child_key, ignored, unknown)
            elif child_key.startswith(("mirror.", *_STRICT_SECTIONS)):
                raise ConfigError(child_key, f"unknown key (expected one of: {', '.join(node)})")
            else:
                unknown.append(child_key)


# --- reading the file and the environment -----------------------------------------------------


class _TextScalarLoader(yaml.SafeLoader):
    """Keeps numbers, booleans and dates as their text; the parsers decide what they mean."""

    yaml_constructors: ClassVar[dict[Any, Any]] = {
        **yaml.SafeLoader.yaml_constructors,
        **{
            f"tag:yaml.org,2002:{tag}": yaml.SafeLoader.construct_scalar
            for tag in ("bool", "int", "float", "timestamp")
        },
    }


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document as a mapping, with file and syntax problems as one-line ConfigErrors."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as stream:
            document = yaml.load(stream, Loader=_TextScalarLoader)  # a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(name, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, "cannot read: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, _yaml_problem(exc)) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(name, f"expected a mapping at the top level, got {_kind(document)}")
    return document


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _expand_shorthands(raw: dict[str, Any]) -> dict[str, Any]:
    """distribution accepts ``storage: inmemory`` and ``auth: silly``: a bare name, no params."""
    raw = dict(raw)
    for section in ("storage", "auth"):
        if isinstance(raw.get(section), str):
            raw[section] = {raw[section]: None}
    return raw


def _env_path(tokens: list[str], node: Any) -> tuple[str, ...] | None:
    """Resolves REGISTRY_ name parts to a key path; longest match first, since ours have "_"."""
    path: list[str] = []
    i = 0
    while i < len(tokens):
        if node == IGNORE or isinstance(node, _Refuse):  # free-form below, as distribution's
            return (*path, *(token.lower() for token in tokens[i:]))  # parameter maps are
        if not isinstance(node, dict):
            return None
        for j in range(len(tokens), i, -1):
            name = "_".join(tokens[i:j]).lower()
            if name in node:
                break
        else:
            return None
        path.append(name)
        node, i = node[name], j
    return tuple(path)


def _env_value(name: str, text: str, key: str) -> Any:
    """Text as given; "" = unset; ``[...]``/``{...}`` is YAML flow so lists can be set."""
    if not text.strip():
        return None
    if not text.lstrip().startswith(("[", "{")):
        return text
    try:
        return yaml.load(text, Loader=_TextScalarLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"{name}: {_yaml_problem(exc)}") from None


def _set_path(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Sets a nested key, copying each mapping on the way so YAML aliases are not mutated."""
    node = raw
    for name in path[:-1]:
        child = node.get(name)
        node[name] = dict(child) if isinstance(child, dict) else {}
        node = node[name]
    node[path[-1]] = value


def _apply_env(
    raw: dict[str, Any], environ: Mapping[str, str], schema: dict[str, Any]
) -> list[str]:
    """Applies REGISTRY_* overrides in place, parents before children; returns unknown names."""
    found = []
    for name, text in environ.items():
        if name.startswith("REGISTRY_"):
            found.append((_env_path(name[len("REGISTRY_") :].split("_"), schema), name, text))
    unknown = []
    for path, name, text in sorted(found, key=lambda item: (len(item[0] or ()), item[1])):
        if path is None and name.startswith(("REGISTRY_AUTH_", "REGISTRY_HTTP_TLS_")):
            raise ConfigError(f"env:{name}", "names no key of auth or http.tls the node can honour")
        if path is None or path == ("version",):  # distribution never lets env set the version
            unknown.append(f"env:{name}")
        else:
            _set_path(raw, path, _env_value(name, text, ".".join(path)))
    return unknown


# --- building the settings --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Section:
    """A mapping from the file plus its dotted key, so every error names the full key."""

    data: Mapping[str, Any]
    prefix: str = ""

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def raw(self, name: str) -> Any:
        """The value, with "" read as unset (as an empty env variable is)."""
        value = self.data.get(name)
        return None if value == "" else value

    def has(self, name: str) -> bool:
        return name in self.data

    def sub(self, name: str) -> _Section:
        value = self.data.get(name)
        return _Section(value if isinstance(value, Mapping) else {}, self.key(name))

    def get(self, name: str, parse: Callable[[Any, str], Any], default: Any = None) -> Any:
        value = self.raw(name)
        return default if value is None else parse(value, self.key(name))

    def build(self, cls: type[_T], parsers: Mapping[str, Callable[[Any, str], Any]]) -> _T:
        """``cls`` from the keys present; absent keys keep the dataclass defaults (one source)."""
        values = {name: self.get(name, parse) for name, parse in parsers.items()}
        return cls(**{name: value for name, value in values.items() if value is not None})


def _version(root: _Section) -> str:
    version: str = root.get("version", _string, "0.1").strip()
    if version != "0.1":
        raise ConfigError("version", f"unsupported version {version!r}, expected 0.1")
    return version


def _log(root: _Section) -> LogSettings:
    log = root.sub("log")
    levels = _one_of(
        "panic",
        "fatal",
        "error",
        "warn",
        "warning",
        "info",
        "debug",
        "trace",
        aliases={"warning": "warn"},
    )
    legacy = root.get("loglevel", levels)  # validated even when log.level wins, as distribution
    return LogSettings(
        level=log.get("level", levels) or legacy or "info",
        formatter=log.get(
            "formatter", _one_of("text", "json", "logstash", aliases={"logstash": "json"}), "text"
        ),
    )


def _storage(root: _Section) -> StorageSettings:
    storage = root.sub("storage")
    drivers = [name for name in _STORAGE_DRIVERS if storage.has(name)]
    if len(drivers) > 1:
        raise ConfigError(
            "storage", f"exactly one storage driver allowed, got {', '.join(drivers)}"
        )
    if drivers != ["filesystem"]:
        return StorageSettings()
    filesystem = storage.sub("filesystem")
    return StorageSettings(root=filesystem.get("rootdirectory", _path, Path("/var/lib/registry")))


def _http(root: _Section) -> HttpSettings:
    http = root.sub("http")
    net = http.get("net", _one_of("tcp", "tcp4", "tcp6"))
    if net not in (None, "tcp"):
        raise ConfigError("http.net", f"only tcp is supported, got {net!r}")
    return HttpSettings(
        addr=http.get("addr", _address, ":5000"),
        host=http.get("host", _http_url),
        debug_addr=http.sub("debug").get("addr", _address),
        tls=_tls(http.sub("tls")),
        headers=http.get("headers", _headers, _no_headers()),
    )


_CLIENT_AUTH = ("require-and-verify-client-cert", "verify-client-cert-if-given")
_TLS_VERSIONS = ("tls1.0", "tls1.1", "tls1.2", "tls1.3")


def _tls(tls: _Section) -> TLSSettings | None:
    certificate, key = tls.get("certificate", _path), tls.get("key", _path)
    clientcas = tuple(Path(p) for p in tls.get("clientcas", _strings, ()))
    if certificate is None and key is None:
        if clientcas:  # plain HTTP would serve everyone the operator meant to check
            raise ConfigError(tls.key("clientcas"), "needs http.tls.certificate and key")
        return None
    if certificate is None or key is None:
        missing = "certificate" if certificate is None else "key"
        raise ConfigError(tls.key(missing), "required: set both certificate and key, or neither")
    clientauth = tls.get("clientauth", _string, _CLIENT_AUTH[0])
    if clientauth not in _CLIENT_AUTH:  # the others accept unverified certificates
        raise ConfigError(tls.key("clientauth"), f"unsupported {clientauth!r} (one of "
                                                 f"{', '.join(_CLIENT_AUTH)})")
    minimumtls = tls.get("minimumtls", _string, "tls1.2").lower()
    if minimumtls not in _TLS_VERSIONS:
        raise ConfigError(
            tls.key("minimumtls"), f"unknown {minimumtls!r} (one of {', '.join(_TLS_VERSIONS)})"
        )
    return TLSSettings(certificate=certificate, key=key, clientcas=clientcas,
                       clientauth=clientauth, minimumtls=minimumtls)


def _proxy(root: _Section) -> ProxySettings:
    proxy = root.sub("proxy")
    settings = proxy.build(
        ProxySettings,
        {"remoteurl": _remote_url, "username": _string, "password": _string, "ttl": parse_duration},
    )
    if (settings.username is None) != (settings.password is None):
        missing = "password" if settings.password is None else "username"
        raise ConfigError(
            proxy.key(missing), "required: set both username and password, or neither"
        )
    return settings


def _auth(root: _Section) -> AuthSettings:
    auth = root.sub("auth")
    for name in auth.data:
        if name not in _AUTH_PROVIDERS:  # serving without the auth the operator asked for is worse
            raise ConfigError(auth.key(name), "unsupported auth provider (use token or htpasswd)")
    if len(auth.data) > 1:
        raise ConfigError("auth", f"exactly one provider allowed, got {', '.join(auth.data)}")
    return AuthSettings(
        token=_token(auth.sub("token")) if auth.has("token") else None,
        htpasswd=_htpasswd(auth.sub("htpasswd")) if auth.has("htpasswd") else None,
    )


def _required(section: _Section, name: str, parse: Callable[[Any, str], Any]) -> Any:
    value = section.get(name, parse)
    if value is None:
        raise ConfigError(section.key(name), "required")
    return value


def _token(token: _Section) -> TokenAuthSettings:
    for name in ("realm", "service", "issuer"):
        _required(token, name, _string)
    if token.raw("rootcertbundle") is None and token.raw("jwks") is None:
        raise ConfigError(token.key("rootcertbundle"), "required (or auth.token.jwks)")
    settings = token.build(TokenAuthSettings, _TOKEN_FIELDS)
    if not settings.autoredirectpath.startswith("/"):
        raise ConfigError(token.key("autoredirectpath"), "must be an absolute path (/auth/token)")
    for i, algorithm in enumerate(settings.signingalgorithms):
        if algorithm not in _JWS_ALGORITHMS:
            raise ConfigError(
                token.key(f"signingalgorithms[{i}]"),
                f"unknown algorithm {algorithm!r} (one of {', '.join(_JWS_ALGORITHMS)})",
            )
    return settings


def _htpasswd(htpasswd: _Section) -> HtpasswdSettings:
    return HtpasswdSettings(
        realm=htpasswd.get("realm", _string, "basic-realm"), path=_required(htpasswd, "path", _path)
    )


def _notifications(root: _Section) -> tuple[NotificationEndpoint, ...]:
    section = root.sub("notifications")
    items = section.raw("endpoints") or []  # shape already checked by _classify
    return tuple(
        _endpoint(_Section(item or {}, f"{section.key('endpoints')}[{i}]"))
        for i, item in enumerate(items)
    )


def _endpoint(endpoint: _Section) -> NotificationEndpoint:
    ignore = endpoint.sub("ignore")
    disabled = endpoint.get("disabled", _boolean, False)
    url = endpoint.get("url", _http_url) if disabled else _required(endpoint, "url", _http_url)
    return NotificationEndpoint(
        name=endpoint.get("name", _string, endpoint.prefix),
        url=url or "",
        headers=endpoint.get("headers", _headers, _no_headers()),
        # distribution replaces non-positive values with its defaults (1s, 10, 1s): so do we.
        timeout=_positive_or(endpoint.get("timeout", parse_duration), 1.0),
        threshold=_positive_or(endpoint.get("threshold", _integer), 10),
        backoff=_positive_or(endpoint.get("backoff", parse_duration), 1.0),
        ignoredmediatypes=tuple(
            dict.fromkeys(
                endpoint.get("ignoredmediatypes", _strings, ())
                + ignore.get("mediatypes", _strings, ())
            )
        ),
        ignore_actions=ignore.get("actions", _strings, ()),
        disabled=disabled,
    )


def _positive_or(value: Any, default: Any) -> Any:
    return value if value is not None and value > 0 else default


def _headers(value: Any, key: str) -> Mapping[str, tuple[str, ...]]:
    """Go's http.Header: each name maps to a list of values (one string is accepted too)."""
    headers = _as_mapping(value, key)
    return MappingProxyType(
        {
            str(name): (values,) if isinstance(values, str) else _strings(values, f"{key}.{name}")
            for name, values in headers.items()
        }
    )


def _mirror(root: _Section) -> MirrorSettings:
    mirror = root.sub("mirror")
    upstream = _upstream(mirror.sub("upstream"))
    return replace(
        mirror.build(MirrorSettings, _MIRROR_FIELDS),
        upstream=upstream,
        upstreams=_registries(mirror, upstream, root.sub("proxy").get("remoteurl", _remote_url, DOCKER_HUB)),
        cache=_cache(mirror.sub("cache")),
        auth=mirror.sub("auth").build(MirrorAuthSettings, _MIRROR_AUTH_FIELDS),
        admin=mirror.sub("admin").build(AdminSettings, _ADMIN_FIELDS),
        notify=_notify(mirror.sub("notify"), mirror.sub("admin")),
        prefetch=mirror.sub("prefetch").build(PrefetchSettings, _PREFETCH_FIELDS),
        scrub=mirror.sub("scrub").build(ScrubSettings, _SCRUB_FIELDS),
        zone=zone_settings(mirror.sub("zone")),
    )


def _notify(notify: _Section, admin: _Section) -> NotifySettings:
    """Forwarding carries the notify token and the events: https unless explicitly allowed."""
    settings = notify.build(NotifySettings, _NOTIFY_FIELDS)
    if not settings.allow_insecure_forward:
        for i, url in enumerate(settings.forward_to):
            if url.lower().startswith("http://"):
                raise ConfigError(notify.key(f"forward_to[{i}]"), "plain http forwarding needs "
                                  "mirror.notify.allow_insecure_forward: true (use https)")
    if settings.token is not None and settings.token == admin.get("token", _string):
        raise ConfigError(notify.key("token"), "must differ from mirror.admin.token")
    return settings


def _registries(mirror: _Section, defaults: UpstreamSettings, remoteurl: str) -> tuple[RegistrySettings, ...]:
    """`mirror.upstreams`: each name means one registry, and one name can prefix repositories."""
    items = mirror.raw("upstreams") or []  # shape already checked by _classify
    taken = {name: "mirror.names" for name in mirror.get("names", _registry_names, ())}
    default_host = urlsplit(remoteurl).netloc.lower()
    hub = {"docker.io", "index.docker.io", "registry-1.docker.io"}
    for name in {default_host} | (hub if default_host in hub else set()):
        taken[name] = "proxy.remoteurl"
    registries = []
    for i, item in enumerate(items):
        section = _Section(item or {}, f"{mirror.key('upstreams')}[{i}]")
        names = _required(section, "names", _registry_names)
        _required(section, "remoteurl", _remote_url)
        for j, name in enumerate(names):
            if name in taken:
                raise ConfigError(section.key(f"names[{j}]"), f"{name!r} already names {taken[name]}")
            taken[name] = section.prefix
        if not any(_REPOSITORY_COMPONENT.fullmatch(name) for name in names):
            raise ConfigError(section.key("names"), "needs one name without a port: it prefixes "
                              "this registry's repositories (/v2/<name>/<repository>/...)")
        settings = section.build(RegistrySettings, _REGISTRY_FIELDS)
        if (settings.username is None) != (settings.password is None):
            missing = "password" if settings.password is None else "username"
            raise ConfigError(section.key(missing), "required: set both username and password, or neither")
        overrides = section.sub("upstream")
        values = {name: overrides.get(name, parse) for name, parse in _UPSTREAM_FIELDS.items()}
        upstream = replace(defaults, **{k: v for k, v in values.items() if v is not None})
        if upstream.max_keepalive > upstream.max_connections:
            raise ConfigError(overrides.key("max_keepalive"),
                              f"must not exceed max_connections ({upstream.max_connections})")
        registries.append(replace(settings, upstream=upstream))
    return tuple(registries)


def _upstream(upstream: _Section) -> UpstreamSettings:
    settings = upstream.build(UpstreamSettings, _UPSTREAM_FIELDS)
    if settings.max_keepalive > settings.max_connections:
        raise ConfigError(
            upstream.key("max_keepalive"),
            f"must not exceed max_connections ({settings.max_connections})",
        )
    return settings


def _cache(cache: _Section) -> CacheSettings:
    """``max_size`` is bytes or, ending in "%", a share of the disk: two fields, one key."""
    settings = cache.build(CacheSettings, _CACHE_FIELDS)
    if settings.low_watermark >= settings.high_watermark:
        raise ConfigError(
            cache.key("low_watermark"), f"must be below high_watermark ({settings.high_watermark})"
        )
    max_size = cache.raw("max_size")
    if isinstance(max_size, str) and max_size.strip().endswith("%"):
        return replace(settings, max_size_percent=_percent(max_size, cache.key("max_size")))
    return replace(settings, max_size=cache.get("max_size", _positive_size))


def _percent(value: str, key: str) -> float:
    number = value.strip()[:-1].strip()
    if not _NUMBER.fullmatch(number) or not 0 < float(number) <= 100:
        raise ConfigError(key, f"expected a percentage in (0%, 100%], got {value!r}")
    return float(number)


def load_settings(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Reads a distribution config.yml (or none), applies REGISTRY_* overrides, validates.

    Args:
        path: the YAML file; None means defaults plus environment only.
        environ: the environment to read REGISTRY_* from; None means ``os.environ``.

    Raises:
        ConfigError: on the first unreadable file, malformed YAML, or bad value, naming its key.
    """
    schema = _schema()
    raw = _read_file(path) if path is not None else {}
    env_unknown = _apply_env(raw, os.environ if environ is None else environ, schema)
    raw = _expand_shorthands(raw)
    ignored: list[str] = []
    unknown: list[str] = []
    _classify(raw, schema, "", ignored, unknown)
    root = _Section(raw)
    settings = Settings(
        version=_version(root),
        log=_log(root),
        storage=_storage(root),
        http=_http(root),
        proxy=_proxy(root),
        auth=_auth(root),
        notifications=_notifications(root),
        mirror=_mirror(root),
        source=Path(path) if path is not None else None,
        ignored_keys=tuple(dict.fromkeys(ignored)),
        unknown_keys=tuple(dict.fromkeys(unknown + env_unknown)),
    )
    _refuse_conflicts(root, settings)
    return settings


def _refuse_conflicts(root: _Section, settings: Settings) -> None:
    """Keys that cannot both be honoured: refused rather than one silently winning."""
    token = settings.auth.token
    if token is not None and token.autoredirect and settings.mirror.auth.token_proxy:
        raise ConfigError("auth.token.autoredirect", "conflicts with mirror.auth.token_proxy "
                                                     "(both set the realm): keep one")
    readonly = root.sub("storage").sub("maintenance").sub("readonly")
    if settings.mirror.passthrough_writes and readonly.get("enabled", _boolean, False):
        raise ConfigError("storage.maintenance.readonly.enabled",
                          "a read-only registry cannot relay pushes (mirror.passthrough_writes)")
