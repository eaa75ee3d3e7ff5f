"""Token relay: the node answers `/token` for the central auth service.

With `mirror.auth.token_proxy: true` the challenge realm is the node's own
`/token`; both token flows are forwarded to the central realm as the client
sent them: docker's `GET` (query string and Basic `Authorization` intact) and
the OAuth2 `POST` form containerd tries first. Successful answers of either
are cached per (method, credentials, every parameter) until shortly before
they expire, so the fresh token every pull asks for does not cross the link.

When the auth service cannot be reached (or answers 5xx), the node answers:
a cached answer still within its lifetime, else an offline token for a known
user (:mod:`.offline`), else 401 with the spec's error body. Never 503: a
client told "unavailable" retries or, for containerd, never falls back from
POST to GET; a 401 makes every client report an authentication failure.

Trade-off (documented in README): a cached token is handed out again until
it nears expiry, so a revoked password or ACL change takes effect upstream
at once but at the node only when that token expires (bounded by the auth
service's token lifetime); offline tokens widen this to `offline_grace`
while the link is down.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import httpx
from aiohttp import web

from mirror import errors

from .tokenrequest import TokenRequest, read_token_request

if TYPE_CHECKING:
    from .offline import OfflineAuthority

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
        offline: answers for the auth service while it is unreachable
            (None: `mirror.auth.offline_grace: 0`).
    """

    def __init__(self, realm: str, client: httpx.AsyncClient,
                 offline: OfflineAuthority | None = None) -> None:
        self.realm = realm
        self.client = client
        self.offline = offline
        self.cache: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.forwarded = 0

    async def handle(self, request: web.Request) -> web.Response:
        """`GET`/`POST /token` from clients."""
        asked = await read_token_request(request)
        key = asked.cache_key
        cached = self._cached(key)
        if cached is not None:
            return web.Response(body=cached, content_type="application/json")
        try:
            upstream = await self.forward(asked)
            if upstream.status_code >= 500:
                raise httpx.HTTPStatusError("auth service failing", request=upstream.request,
                                            response=upstream)
        except httpx.HTTPError as exc:
            return await self._unreachable(asked, key, exc)
        body = upstream.content[:MAX_RESPONSE]
        if upstream.status_code == 200:
            self._remember(key, body)
            if self.offline is not None:
                self.offline.learned(asked, body, self.forward)
        elif upstream.status_code == 401 and self.offline is not None:
            self.offline.refused(asked)
        headers = {h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
        return web.Response(status=upstream.status_code, body=body, headers=headers)

    async def _unreachable(self, asked: TokenRequest, key: str, exc: Exception) -> web.Response:
        """No answer from the auth service: a cached answer, an offline token, or 401."""
        stale = self._cached(key, usable_until_expiry=True)
        if stale is not None:
            log.warning("token service unreachable: handing out a cached token")
            return web.Response(body=stale, content_type="application/json")
        if self.offline is None:
            log.warning("token service unreachable (%s) and offline tokens are off", exc)
            raise errors.Unauthorized("authentication service unreachable") from exc
        answer = await self.offline.answer(asked)  # raises Unauthorized for whom it cannot vouch
        return web.json_response(answer)

    def _cached(self, key: str, usable_until_expiry: bool = False) -> bytes | None:
        """A cached answer still fresh (or, when the link is down, not yet expired)."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        body, expires = entry
        if time.time() >= expires - (0.0 if usable_until_expiry else EXPIRY_MARGIN):
            return None
        self.cache.move_to_end(key)
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

    async def forward(self, asked: TokenRequest) -> httpx.Response:
        """Send a token request to the central realm as the client made it."""
        self.forwarded += 1
        url = self.realm
        if asked.query:
            url += ("&" if "?" in url else "?") + urlencode(asked.query)
        return await self.client.request(asked.method, url, headers=dict(asked.headers),
                                         content=asked.body)
