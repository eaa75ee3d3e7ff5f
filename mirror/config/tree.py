"""The key tree: every key distribution accepts, marked used, ignored or refused, plus ours.

The parser tables (``_MIRROR_FIELDS``...) are both what the builders parse and
what the schema accepts, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mirror.config.errors import ConfigError
from mirror.config.parsers import (
    _as_mapping,
    _bandwidth,
    _boolean,
    _fraction,
    _http_urls,
    _kind,
    _networks,
    _non_negative_int,
    _one_of,
    _path,
    _positive_duration,
    _positive_int,
    _positive_size,
    _registry_names,
    _remote_url,
    _string,
    _strings,
    _workers,
    parse_duration,
)
from mirror.config.zone import ZONE_KEYS

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
