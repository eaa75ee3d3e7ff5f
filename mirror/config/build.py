"""Building the settings: one function per section, then load_settings over them all."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.config.document import _expand_shorthands, _read_file
from mirror.config.environment import _apply_env
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
from mirror.config.parsers import (
    _REPOSITORY_COMPONENT,
    _address,
    _boolean,
    _headers,
    _http_url,
    _integer,
    _no_headers,
    _one_of,
    _path,
    _percent,
    _positive_size,
    _registry_names,
    _remote_url,
    _string,
    _strings,
    parse_duration,
)
from mirror.config.section import _Section
from mirror.config.tree import (
    _ADMIN_FIELDS,
    _AUTH_PROVIDERS,
    _CACHE_FIELDS,
    _MIRROR_AUTH_FIELDS,
    _MIRROR_FIELDS,
    _NOTIFY_FIELDS,
    _PREFETCH_FIELDS,
    _REGISTRY_FIELDS,
    _SCRUB_FIELDS,
    _STORAGE_DRIVERS,
    _TOKEN_FIELDS,
    _UPSTREAM_FIELDS,
    _classify,
    _schema,
)
from mirror.config.zone import zone_settings

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
