"""Scalar parsers: (value, key) -> parsed value, raising ConfigError naming the key.

Each parser reads one YAML (or environment) value; the key is only for the
error message, so every failure is one line naming what to fix.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mirror.config.errors import ConfigError

_Number = TypeVar("_Number", int, float)

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
#: A name that can lead a repository path (`/v2/ghcr.io/org/app/...`): no port, lower case.
_REPOSITORY_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


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


def _positive(parse: Callable[[Any, str], _Number]) -> Callable[[Any, str], _Number]:
    """`parse`, refusing zero: where zero would mean "wait forever" or "never", which we never want."""

    def positive(value: Any, key: str) -> _Number:
        number = parse(value, key)
        if number <= 0:
            raise ConfigError(key, f"must be greater than zero, got {value!r}")
        return number

    return positive


_positive_duration = _positive(parse_duration)
_positive_size = _positive(parse_size)


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


_positive_int = _positive(_integer)


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


def _as_mapping(value: Any, key: str) -> Mapping[str, Any]:
    """An empty YAML section (``log:``) is an empty mapping; anything else must be a mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {_kind(value)}")
    return value


def _headers(value: Any, key: str) -> Mapping[str, tuple[str, ...]]:
    """Go's http.Header: each name maps to a list of values (one string is accepted too)."""
    headers = _as_mapping(value, key)
    return MappingProxyType(
        {
            str(name): (values,) if isinstance(values, str) else _strings(values, f"{key}.{name}")
            for name, values in headers.items()
        }
    )


def _no_headers() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


def _percent(value: str, key: str) -> float:
    number = value.strip()[:-1].strip()
    if not _NUMBER.fullmatch(number) or not 0 < float(number) <= 100:
        raise ConfigError(key, f"expected a percentage in (0%, 100%], got {value!r}")
    return float(number)


def _bind(addr: str, key: str) -> tuple[str, int]:
    host, port = _host_port(addr, key)
    return host or "0.0.0.0", port
