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

from mirror.config.build import load_settings
from mirror.config.errors import ConfigError
from mirror.config.model import (
    DOCKER_HUB,
    AdminSettings,
    AuthSettings,
    CacheSettings,
    HtpasswdSettings,
    HttpSettings,
    LogSettings,
    MirrorAuthSettings,
    MirrorSettings,
    NotificationEndpoint,
    NotifySettings,
    PrefetchSettings,
    ProxySettings,
    RegistrySettings,
    ScrubSettings,
    Settings,
    StorageSettings,
    TLSSettings,
    TokenAuthSettings,
    UpstreamSettings,
)
from mirror.config.parsers import parse_duration, parse_size

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
