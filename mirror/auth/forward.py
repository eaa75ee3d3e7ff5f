"""Forward-mode auth: let upstream judge tokens whose keys this node does not hold.

Used only when configured (`mirror.auth.mode: forward`), e.g. in front of
Docker Hub. The node relays upstream's own challenge, and validates a
presented token by one upstream `HEAD` with that token for the requested
resource (no GET). Verdicts are cached per (token hash, repository) until
the token's `exp` (read, not trusted) or a short bound; negative verdicts
briefly too. Garbage is refused before it costs a HEAD, identical checks are
coalesced, and verification HEADs are rate-limited. With upstream unreachable
and no cached verdict, access is denied.

Forged tokens cannot lock honest clients out. A token whose header names its
key (`x5c` leaf or `jwk`, as Docker Hub's and distribution's token services
send) has its signature checked with that key first: a token with edited
claims or a made-up signature is refused at once, costing nothing upstream.
Keys upstream has accepted a token from (and the key of an anonymous token
fetched from upstream's own realm at the first need) are "vouched": tokens
they signed draw on a generous budget of their own. Everything else (tokens
naming their key by `kid` only, keys never seen) shares the small budget, so
a flood of self-signed tokens spends only that.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import httpx
from aiohttp import web

from mirror import errors
from mirror.auth import access as auth_access
from mirror.auth.access import Access
from mirror.auth.challenge import bearer_token, challenge
from mirror.auth.controller import deny, verify_off_loop
from mirror.proxy.singleflight import SingleFlight
from mirror.upstream.auth import Challenge
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential
from mirror.upstream.registries import Registries
from mirror.upstream.tls import verify_setting

log = logging.getLogger(__name__)

ALLOW_FOR = 300.0  # longest a positive verdict is trusted
DENY_FOR = 30.0  # how long a negative verdict is remembered
MAX_VERDICTS = 50_000
HEADS_PER_SECOND = 10.0  # checks of tokens no vouched key signed
HEAD_BURST = 20.0
VOUCHED_HEADS_PER_SECOND = 100.0  # checks of tokens signed by a vouched key
VOUCHED_HEAD_BURST = 400.0  # hundreds of machines starting with fresh tokens
MAX_VOUCHED_KEYS = 64
LEARN_EVERY = 60.0  # seconds between attempts to learn the issuer's key from its realm
LEARN_TIMEOUT = 5.0
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
        share: worker processes sharing the node's verification rate (each
            gets an equal part, so the node's total stays the documented one).
    """

    def __init__(self, upstream: Upstream, share: int = 1) -> None:
        self.upstream = upstream
        self.verdicts: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._flight: SingleFlight[bool] = SingleFlight()
        self._bucket = _Bucket(HEADS_PER_SECOND / share, max(1.0, HEAD_BURST / share))
        self._vouched_bucket = _Bucket(VOUCHED_HEADS_PER_SECOND / share, max(1.0, VOUCHED_HEAD_BURST / share))
        self.vouched: OrderedDict[bytes, None] = OrderedDict()
        self._learning: asyncio.Task[None] | None = None
        self._learned_at = -LEARN_EVERY
        self.heads = 0

    async def authorize(self, request: web.Request, required: Sequence[Access],
                        path: str | None = None) -> str | None:
        """`path`: what upstream is probed with (default: the request's own path)."""
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
        signer: bytes | None = None
        if upstream_challenge.scheme != "basic":
            claims = token_claims(raw) or {}
            if not self._plausible(claims, upstream_challenge.params.get("service", "")):
                raise self._deny("invalid_token", required, upstream_challenge, "not a usable token")
        key = (hashlib.sha256(raw.encode()).hexdigest(), required[0].name if required else "")
        allowed = self._cached(key)
        if allowed is None and upstream_challenge.scheme != "basic":
            signer = await self._signer(raw, required, upstream_challenge)
        if allowed is None:
            path = path or request.rel_url.raw_path
            allowed = await self._flight.run(
                key, lambda: self._verify(key, path, authorization, claims, signer))
        if not allowed:
            raise self._deny("insufficient_scope", required, upstream_challenge, "upstream refused the token")
        return authorization

    async def _signer(self, raw: str, required: Sequence[Access],
                      upstream_challenge: Challenge) -> bytes | None:
        """The key the token names, its signature checked; a forgery is refused here."""
        from mirror.auth.token import InvalidToken, named_signer

        try:
            signer = await verify_off_loop(named_signer, raw)
        except InvalidToken as exc:
            raise self._deny("invalid_token", required, upstream_challenge, exc.reason) from None
        if signer is not None and not self.vouched:
            await self._learn_issuer_key(upstream_challenge)
        return signer

    def _vouch(self, signer: bytes) -> None:
        self.vouched[signer] = None
        self.vouched.move_to_end(signer)
        while len(self.vouched) > MAX_VOUCHED_KEYS:
            self.vouched.popitem(last=False)

    async def _learn_issuer_key(self, upstream_challenge: Challenge) -> None:
        """Vouch for the key of an anonymous token from upstream's own realm (at most once a
        minute, shared by concurrent callers), so the first honest tokens after a start never
        wait behind forged ones."""
        if self._learning is None or self._learning.done():
            if time.monotonic() - self._learned_at < LEARN_EVERY:
                return
            self._learned_at = time.monotonic()
            self._learning = asyncio.create_task(self._fetch_issuer_key(upstream_challenge.params))
        await asyncio.shield(self._learning)

    async def _fetch_issuer_key(self, params: dict[str, str]) -> None:
        from mirror.auth.token import InvalidToken, named_signer

        realm, service = params.get("realm", ""), params.get("service", "")
        if not realm.lower().startswith(("https://", "http://")):
            return
        try:
            async with asyncio.timeout(LEARN_TIMEOUT), httpx.AsyncClient(
                    timeout=LEARN_TIMEOUT, trust_env=False, verify=verify_setting()) as client:
                response = await client.get(realm, params={"service": service} if service else None)
                response.raise_for_status()
                body = response.json()
            token = body.get("token") or body.get("access_token")
            signer = await verify_off_loop(named_signer, token)
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError, InvalidToken) as exc:
            log.info("upstream's token signing key not learned from %s: %s", realm, exc)
            return
        if signer is not None:
            self._vouch(signer)
            log.info("upstream's token signing key learned from %s", realm)

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
                      claims: dict[str, object], signer: bytes | None = None) -> bool:
        vouched = signer is not None and signer in self.vouched
        if not (self._vouched_bucket if vouched else self._bucket).take():
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
        if allowed and signer is not None:
            self._vouch(signer)  # upstream accepts this key's tokens: its next ones are known
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


#: The last fixed part of each repository route's path, after the repository name.
_ROUTE_TAILS = ("/manifests/", "/blobs/", "/tags/list")


class ForwardByRegistry:
    """Forward mode with several registries: each registry judges its own requests.

    A request for another registry than the default is judged by that
    registry alone: its challenge is relayed with the scope of its own
    repository name (`team/app`, not the node's key `ghcr.io/team/app`), so
    the client fetches a token that registry's auth service issues, and the
    token is checked by probing that registry with its own path.
    """

    def __init__(self, registries: Registries, share: int = 1) -> None:
        self.registries = registries
        self.judges = {registry.label: ForwardAccess(registry.client, share=share)
                       for registry in registries.all}

    async def authorize(self, request: web.Request, required: Sequence[Access]) -> str | None:
        registry, own_name = (self.registries.owner(required[0].name) if required
                              else (self.registries.default, ""))
        judge = self.judges[registry.label]
        if registry.prefix is None:
            return await judge.authorize(request, required)
        own = [Access(a.type, self.registries.owner(a.name)[1], a.actions) for a in required]
        raw = request.rel_url.raw_path
        tail = max(raw.rfind(marker) for marker in _ROUTE_TAILS)
        return await judge.authorize(request, own, path=f"/v2/{own_name}{raw[tail:]}")
