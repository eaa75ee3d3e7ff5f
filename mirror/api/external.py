"""The node as clients see it: external base URL and client address.

Absolute URLs the node generates (token realm, Location, Link) must match
what clients use, or a client following them loses its credentials (the
source document's "must be https + domain name to avoid http patch 401
error"). `http.host` wins; otherwise the request's own scheme and Host, with
`X-Forwarded-Proto`/`X-Forwarded-Host`/`X-Forwarded-For` believed only from
peers in `mirror.trusted_proxies`.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from aiohttp import web


@lru_cache(maxsize=16)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def from_trusted_proxy(request: web.BaseRequest, trusted: tuple[str, ...]) -> bool:
    """True when the TCP peer is one of the configured trusted proxies."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not trusted or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    return any(address in network for network in _networks(trusted))


def _first(value: str | None) -> str | None:
    return value.split(",")[0].strip() or None if value else None


def external_base(request: web.BaseRequest, http_host: str | None, trusted: tuple[str, ...]) -> str:
    """`scheme://host[:port]` clients reach this node at (no trailing slash)."""
    if http_host:
        return http_host.rstrip("/")
    scheme, host = request.scheme, request.host
    if from_trusted_proxy(request, trusted):
        scheme = _first(request.headers.get("X-Forwarded-Proto")) or scheme
        host = _first(request.headers.get("X-Forwarded-Host")) or host
    return f"{scheme}://{host}"


def client_address(request: web.BaseRequest, trusted: tuple[str, ...]) -> str:
    """The client's address: `X-Forwarded-For`'s first hop only from a trusted proxy."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    address = str(peer[0]) if peer else "-"
    if from_trusted_proxy(request, trusted):
        return _first(request.headers.get("X-Forwarded-For")) or address
    return address
