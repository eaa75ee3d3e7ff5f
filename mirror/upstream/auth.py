"""Upstream authentication as an httpx auth flow: basic, or the token dance.

On a 401 with a `Bearer realm=…,service=…,scope=…` challenge the flow gets a
token from the realm (with `proxy.username`/`proxy.password`, or anonymously),
caches it per scope until shortly before it expires, and retries once. After
the first challenge the realm is remembered, so later scopes fetch their
token before the request instead of paying a 401 round trip each. A request
that already carries an `Authorization` header (a client's own token, passed
through) is sent as it is and its token never enters this cache.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

# `(?<!\w)`: a name starts at a word boundary, so a long run of word characters
# with no `=` costs linear time, not quadratic (a hostile 16 KiB header).
_PARAM = re.compile(r'(?<!\w)(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_SCOPE_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags)/")
TOKEN_MARGIN = 30.0
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_TOKEN_RESPONSE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed `WWW-Authenticate` header."""

    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        """Parse `Scheme k="v",k2=v2`; None when the header is unusable."""
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
        return cls(scheme.lower(), params)


def scope_for(url: httpx.URL, method: str) -> str | None:
    """The token scope a registry request needs, from its path."""
    match = _SCOPE_PATH.match(url.path)
    if match is None:
        return None
    actions = "pull" if method in ("GET", "HEAD") else "pull,push"
    return f"repository:{match.group(1)}:{actions}"


class RegistryAuth(httpx.Auth):
    """Basic or bearer-token auth against the upstream registry.

    Args:
        username: `proxy.username` (None for anonymous tokens).
        password: `proxy.password`.
        upstream_host: the configured upstream's host; a realm on another
            host only receives credentials because upstream challenged with it.
    """

    requires_response_body = True

    def __init__(self, username: str | None, password: str | None, upstream_host: str) -> None:
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username else None
        )
        self.upstream_host = upstream_host
        self._bearer: Challenge | None = None
        self._use_basic = False
        self._tokens: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if "authorization" in request.headers:
            yield request
            return
        scope = scope_for(request.url, request.method)
        for attempt in range(2):
            if self._use_basic:
                self._apply(request, self._basic)
            elif self._bearer is not None:
                token = self._cached(scope)
                if token is None:
                    async with self._lock(scope or ""):
                        token = self._cached(scope)
                        token_request = None if token else self._token_request(scope)
                        if token_request is not None:
                            token = await self._store_token(scope, (yield token_request))
                self._apply(request, f"Bearer {token}" if token else None)
            response = yield request
            if response.status_code != 401 or attempt == 1:
                return
            challenge = Challenge.parse(response.headers.get("www-authenticate", ""))
            if challenge is None or not self._learn(challenge):
                return
            scope = challenge.params.get("scope") or scope
            self._tokens.pop(scope or "", None)  # a cached token was refused: get a new one

    def _learn(self, challenge: Challenge) -> bool:
        """Remember how upstream wants to be authenticated."""
        if challenge.scheme == "bearer" and "realm" in challenge.params:
            self._bearer = challenge
            return True
        if challenge.scheme == "basic" and self._basic:
            self._use_basic = True
            return True
        return False

    def _lock(self, scope: str) -> asyncio.Lock:
        return self._locks.setdefault(scope, asyncio.Lock())

    def _cached(self, scope: str | None) -> str | None:
        entry = self._tokens.get(scope or "")
        if entry and entry[1] > time.monotonic():
            return entry[0]
        return None

    def _token_request(self, scope: str | None) -> httpx.Request | None:
        if self._bearer is None:
            return None
        params = {"service": self._bearer.params.get("service", "")}
        if scope:
            params["scope"] = scope
        headers = {}
        if self._basic:
            headers["Authorization"] = self._basic
        realm = self._bearer.params["realm"]
        if urlsplit(realm).scheme not in ("http", "https"):
            log.warning("upstream challenged with a non-http realm; ignoring it")
            return None
        return httpx.Request("GET", realm, params=params, headers=headers)

    async def _store_token(self, scope: str | None, response: httpx.Response) -> str | None:
        await response.aread()
        if response.status_code != 200 or len(response.content) > MAX_TOKEN_RESPONSE:
            log.warning("token request to upstream realm failed with %s", response.status_code)
            return None
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            log.warning("upstream realm answered a token response that is not JSON")
            return None
        if not isinstance(token, str) or not token:
            return None
        self._tokens[scope or ""] = (token, time.monotonic() + max(lifetime - TOKEN_MARGIN, lifetime / 2))
        return token

    @staticmethod
    def _apply(request: httpx.Request, value: str | None) -> None:
        if value:
            request.headers["Authorization"] = value
