"""Forward-mode auth: let upstream judge tokens whose keys this node does not hold.

Used only when configured (`mirror.auth.mode: forward`), e.g. in front of
Docker Hub. The node relays upstream's own challenge, and validates a
presented token by one upstream `HEAD` with that token for the requested
resource (no GET). Verdicts are cached per (token hash, repository) until
the token's `exp` (read, not trusted) or a short bound; negative verdicts
briefly too. Garbage is refused before it costs a HEAD, identical checks are
coalesced, and verification HEADs are rate-limited. With upstream unreachable
and no cached verdict, access is denied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from aiohttp import web

from mirror import errors
from mirror.auth import access as auth_access
from mirror.auth.access import Access
from mirror.auth.challenge import bearer_token, challenge
from mirror.auth.controller import deny
from mirror.proxy.singleflight import SingleFlight
from mirror.upstream.auth import Challenge
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential

log = logging.getLogger(__name__)

ALLOW_FOR = 300.0  # longest a positive verdict is trusted
DENY_FOR = 30.0  # how long a negative verdict is remembered
MAX_VERDICTS = 50_000
HEADS_PER_SECOND = 10.0
HEAD_BURST = 20.0
LEEWAY = 60.0


class _Bucket:
    """A token bucket bounding verification HEADs."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def token_claims(raw: str) -> dict[str, object] | None:
    """The unverified claims of a JWT-shaped token, or None for garbage."""
    parts = raw.split(".")
    if len(parts) != 3 or len(raw) > 8192:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None


class ForwardAccess:
    """Upstream decides; the node remembers its verdicts.

    Args:
        upstream: the registry whose challenge is relayed and which judges.
    """

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.verdicts: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._flight: SingleFlight[bool] = SingleFlight()
        self._bucket = _Bucket(HEADS_PER_SECOND, HEAD_BURST)
        self.heads = 0

    async def authorize(self, request: web.Request, required: Sequence[Access]) -> str | None:
        authorization = request.headers.get("Authorization")
        upstream_challenge = await self.upstream.challenge()  # unknown upstream: UNAVAILABLE
        if upstream_challenge is None:
            return None  # upstream asks nobody for credentials
        claims: dict[str, object] = {}
        if upstream_challenge.scheme == "basic":
            raw = authorization if authorization and authorization.lower().startswith("basic ") else None
        else:
            raw = bearer_token(authorization)
        if raw is None:
            raise self._deny(None, required, upstream_challenge, "no credentials")
        if upstream_challenge.scheme != "basic":
            claims = token_claims(raw) or {}
            if not self._plausible(claims, upstream_challenge.params.get("service", "")):
                raise self._deny("invalid_token", required, upstream_challenge, "not a usable token")
        key = (hashlib.sha256(raw.encode()).hexdigest(), required[0].name if required else "")
        allowed = self._cached(key)
        if allowed is None:
            allowed = await self._flight.run(key, lambda: self._verify(key, request.rel_url.raw_path,
                                                                       authorization, claims))
        if not allowed:
            raise self._deny("insufficient_scope", required, upstream_challenge, "upstream refused the token")
        return authorization

    @staticmethod
    def _plausible(claims: dict[str, object], service: str) -> bool:
        """A JWT-shaped token that has not expired and is meant for upstream's service."""
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires + LEEWAY < time.time():
            return False
        audience = claims.get("aud")
        if audience is None or not service:
            return True
        audiences = [audience] if isinstance(audience, str) else audience
        return isinstance(audiences, list) and service in audiences

    def _cached(self, key: tuple[str, str]) -> bool | None:
        entry = self.verdicts.get(key)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self.verdicts[key]
            return None
        return entry[0]

    async def _verify(self, key: tuple[str, str], path: str, authorization: str | None,
                      claims: dict[str, object]) -> bool:
        if not self._bucket.take():
            raise errors.TooManyRequests("token verifications are rate-limited", headers={"Retry-After": "1"})
        self.heads += 1
        try:
            status = await self.upstream.probe(path, Credential.client(authorization or ""))
        except errors.Unavailable:
            log.warning("cannot verify a token: upstream unreachable; denying")
            return False
        if status >= 500 or status == 429:
            log.warning("cannot verify a token: upstream answered %s; denying, not remembered", status)
            return False
        # 404: the token was accepted, the content is just not there; 405: distribution
        # answers HEAD on tags/list and _catalog with 405 after checking the token.
        allowed = status < 400 or status in (404, 405)
        exp = claims.get("exp")
        lifetime = ALLOW_FOR if allowed else DENY_FOR
        if allowed and isinstance(exp, int | float):
            lifetime = max(0.0, min(lifetime, float(exp) - time.time()))
        self.verdicts[key] = (allowed, time.monotonic() + lifetime)
        while len(self.verdicts) > MAX_VERDICTS:
            self.verdicts.popitem(last=False)
        return allowed

    @staticmethod
    def _deny(error: str | None, required: Sequence[Access], upstream_challenge: Challenge,
              reason: str) -> errors.RegistryError:
        params = upstream_challenge.params
        if upstream_challenge.scheme == "basic":
            value = f'Basic realm="{params.get("realm", "")}"'
        else:
            value = challenge(params.get("realm", ""), params.get("service", ""), required, error)
        return deny(auth_access.Unauthorized(error, reason, value), required)
