"""The settings: frozen dataclasses, each field's comment stating its default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mirror.config.parsers import _REPOSITORY_COMPONENT, _bind, _no_headers
from mirror.config.zone import ZoneSettings

DOCKER_HUB = "https://registry-1.docker.io"
MiB = 1024 * 1024


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
    zone: ZoneSettings | None = None  # mirror.zone (mirror.config.zone); None = the node is alone


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
