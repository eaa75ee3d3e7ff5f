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
    """The client's address, from `X-Forwarded-For` only through trusted proxies.

    The header is read from the right: each hop appended by a trusted proxy is
    skipped, and the first address a trusted proxy did not vouch for is the
    client. A client-forged left part of the header is never believed.
    """
    peer = request.transport.get_extra_info("peername") if request.transport else None
    address = str(peer[0]) if peer else "-"
    if not from_trusted_proxy(request, trusted):
        return address
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        address = hop
        if not _is_trusted(hop, trusted):
            break
    return address


def _is_trusted(hop: str, trusted: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return False
    return any(address in network for network in _networks(trusted))
