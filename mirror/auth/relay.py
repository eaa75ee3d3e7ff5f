"""Token relay: the node answers `/token` for the central auth service.

With `mirror.auth.token_proxy: true` the challenge realm is the node's own
`/token`; requests are forwarded (query string and `Authorization` intact) to
the central realm, as the source document's zone proxies relay the token
service. Successful answers are cached per (hash of `Authorization`,
service, scopes) until shortly before they expire, so the fresh token every
`docker pull` asks for does not cross the link, and pulls of cached images
keep working while the link is down.

Trade-off (documented in README): a cached token is handed out again until
it nears expiry, so a revoked password or ACL change takes effect upstream
at once but at the node only when that token expires (bounded by the auth
service's token lifetime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict

import httpx
from aiohttp import web

from mirror import errors

log = logging.getLogger(__name__)

MAX_RESPONSE = 64 * 1024
MAX_ENTRIES = 10_000
EXPIRY_MARGIN = 30.0
DEFAULT_LIFETIME = 60.0
PASSED_HEADERS = ("Content-Type", "WWW-Authenticate", "Retry-After")


class TokenRelay:
    """Forward `/token` to the central realm, caching successful answers.

    Args:
        realm: the central auth service's token URL (`auth.token.realm`).
        client: an HTTP client for the link (timeouts set by the caller).
    """

    def __init__(self, realm: str, client: httpx.AsyncClient) -> None:
        self.realm = realm
        self.client = client
        self.cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.forwarded = 0

    async def handle(self, request: web.Request) -> web.Response:
        """`GET`/`POST /token` from clients."""
        if request.method not in ("GET", "POST"):
            raise errors.Unsupported()
        key = self._key(request) if request.method == "GET" else None
        cached = self._cached(key)
        if cached is not None:
            return web.Response(body=cached, content_type="application/json")
        try:
            upstream = await self._forward(request)
        except httpx.HTTPError as exc:
            stale = self._cached(key, usable_until_expiry=True)
            if stale is not None:
                log.warning("token service unreachable: handing out a cached token")
                return web.Response(body=stale, content_type="application/json")
            raise errors.Unavailable("token service unreachable") from exc
        body = upstream.content[:MAX_RESPONSE]
        if upstream.status_code == 200 and key is not None:
            self._remember(key, body)
        headers = {h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
        return web.Response(status=upstream.status_code, body=body, headers=headers)

    @staticmethod
    def _key(request: web.Request) -> str:
        scopes = " ".join(sorted(request.query.getall("scope", [])))
        material = "\n".join((request.headers.get("Authorization", ""),
                              request.query.get("service", ""), scopes,
                              request.query.get("account", "")))
        return hashlib.sha256(material.encode()).hexdigest()

    def _cached(self, key: str | None, usable_until_expiry: bool = False) -> bytes | None:
        """A cached answer still fresh (or, when the link is down, not yet expired)."""
        entry = self.cache.get(key) if key is not None else None
        if entry is None:
            return None
        body, expires = entry
        if time.time() >= expires - (0.0 if usable_until_expiry else EXPIRY_MARGIN):
            return None
        self.cache.move_to_end(key)  # type: ignore[arg-type]
        return body

    def _remember(self, key: str, body: bytes) -> None:
        try:
            answer = json.loads(body)
            lifetime = float(answer.get("expires_in") or DEFAULT_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            return
        if lifetime <= EXPIRY_MARGIN:
            return
        self.cache[key] = (body, time.time() + lifetime)
        self.cache.move_to_end(key)
        while len(self.cache) > MAX_ENTRIES:
            self.cache.popitem(last=False)

    async def _forward(self, request: web.Request) -> httpx.Response:
        self.forwarded += 1
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type", "user-agent", "accept")}
        url = self.realm + ("&" if "?" in self.realm else "?") + request.rel_url.raw_query_string \
            if request.rel_url.raw_query_string else self.realm
        body = await request.read() if request.method == "POST" else None
        if body is not None and len(body) > MAX_RESPONSE:
            raise errors.RegistryError("token request too large", status=413)
        return await self.client.request(request.method, url, headers=headers, content=body)
