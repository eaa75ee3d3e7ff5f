"""Local verification of registry bearer tokens, as distribution 2.8 does it.

The mirror must accept exactly the tokens the central registry (distribution
2.8, ``auth.token``) accepts, and nothing more, so a client can reuse the
token it got from the central auth service.  Deviations from 2.8 are all
"hardening" rejections: HMAC/``none`` algorithms, algorithm/key mismatches,
``crit`` headers, malformed claims that Go would silently zero.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .access import (
    Access,
    MalformedAccess,
    grants,
    parse_access_claim,
)
from .keys import (
    ChainError,
    PublicKey,
    TrustedKeys,
    check_supported_key,
    libtrust_key_id,
    public_key_from_jwk,
    same_key,
    verify_chain,
)

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "Claims",
    "InvalidToken",
    "TokenVerifier",
    "algorithms_for_key",
]

#: Leeway applied to ``exp`` and ``nbf`` (distribution's ``token.Leeway``).
DEFAULT_LEEWAY = 60.0
#: Verified tokens remembered (by SHA-256), so a pull's many requests cost one verification.
VERIFIED_CACHE_SIZE = 4096

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
SUPPORTED_ALGORITHMS = _RSA_ALGS | frozenset(_EC_ALGS.values()) | {"EdDSA"}

#: ``crit`` extensions we implement: none, so any ``crit`` header is rejected.
_UNDERSTOOD_CRIT: frozenset[str] = frozenset()

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(Exception):
    """The token must not be honoured.  ``reason`` is for logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of a token."""

    subject: str
    issuer: str
    audience: tuple[str, ...]
    expires_at: int
    not_before: int | None
    issued_at: int | None
    access: tuple[Access, ...]
    jti: str | None
    kid: str | None

    def grants(self, type: str, name: str, action: str) -> bool:
        """True if the token allows ``action`` on the resource."""
        return grants(self.access, type, name, action)


def algorithms_for_key(key: PublicKey) -> frozenset[str]:
    """JWS algorithms that are legitimate for ``key``'s type (and curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGS:
        return frozenset({_EC_ALGS[key.curve.name]})
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


class TokenVerifier:
    """Verifies compact JWS tokens against a ``TrustedKeys`` set.

    ``keys`` is a plain attribute: on SIGHUP assign a freshly loaded
    ``TrustedKeys``; each ``verify`` call reads it once, so a swap never mixes
    old and new trust material within one verification.
    """

    def __init__(
        self,
        issuer: str,
        service: str,
        keys: TrustedKeys,
        signing_algorithms: Iterable[str] = (),
        leeway: float = DEFAULT_LEEWAY,
        max_token_size: int = 8192,
        clock: Callable[[], float] = time.time,
    ) -> None:
        algs = tuple(signing_algorithms)
        unknown = [a for a in algs if a not in SUPPORTED_ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported signing algorithm(s): {', '.join(unknown)}")
        self.issuer = issuer
        self.service = service
        self.keys = keys
        self.signing_algorithms = frozenset(algs)
        self.leeway = leeway
        self.max_token_size = max_token_size
        self.clock = clock
        self._verified: OrderedDict[bytes, tuple[TrustedKeys, Claims]] = OrderedDict()
        self._lock = threading.Lock()  # verify() runs in worker threads too

    def verify(self, raw: str) -> Claims:
        """Return the claims of a valid token; raise ``InvalidToken`` otherwise.

        Never raises anything else: a bug or an exotic input in a parser is
        still just an invalid token to the caller.
        """
        cached = self.cached(raw)
        if cached is not None:
            return cached
        keys = self.keys  # read once: a reload mid-verification never mixes key sets
        try:
            claims = self._verify(raw, keys)
        except InvalidToken:
            raise
        except Exception as exc:  # noqa: BLE001 - see docstring
            raise InvalidToken(f"unverifiable token ({type(exc).__name__}: {exc})") from None
        self._remember(raw, keys, claims)
        return claims

    def cached(self, raw: str) -> Claims | None:
        """The claims of a token verified before against the current keys, still in its time window.

        Cheap (one hash), so callers may try it on the event loop before
        handing the real verification to a thread. A key reload forgets all.
        """
        if not isinstance(raw, str) or len(raw) > self.max_token_size:
            return None
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            entry = self._verified.get(digest)
            if entry is None:
                return None
            keys, claims = entry
            now = self.clock()
            if keys is not self.keys or now > claims.expires_at + self.leeway:
                del self._verified[digest]
                return None
            self._verified.move_to_end(digest)
        if claims.not_before is not None and now < claims.not_before - self.leeway:
            return None
        return claims

    def _remember(self, raw: str, keys: TrustedKeys, claims: Claims) -> None:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            self._verified[digest] = (keys, claims)
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)

    # -- steps, cheapest first ------------------------------------------------

    def _verify(self, raw: str, keys: TrustedKeys) -> Claims:
        now = self.clock()
        header = self._parse_header(raw)
        alg = self._check_header(header)
        key = self._resolve_key(header, keys, now)
        if alg not in algorithms_for_key(key):
            raise InvalidToken(f"alg {alg} does not fit the signing key type")
        payload = _verified_payload(raw, key, alg)
        return self._check_claims(payload, header, now)

    def _parse_header(self, raw: str) -> dict[str, Any]:
        if not isinstance(raw, str):
            raise InvalidToken("token is not a string")
        if len(raw) > self.max_token_size:
            raise InvalidToken(f"token longer than {self.max_token_size} characters")
        parts = raw.split(".")
        # An empty signature is let through here so "alg": "none" is named as such below.
        if len(parts) != 3 or not (parts[0] and parts[1]) or not all(map(_B64URL.fullmatch, parts)):
            raise InvalidToken("malformed token: not three base64url parts")
        return _json_object(_b64url_decode(parts[0]), "header")

    def _check_header(self, header: dict[str, Any]) -> str:
        """Pin the algorithm: asymmetric, supported, allowed; no ``crit``."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise InvalidToken("missing or 'none' alg")
        if alg.upper().startswith("HS"):
            raise InvalidToken(f"HMAC alg {alg} is never accepted")
        if alg not in SUPPORTED_ALGORITHMS:
            raise InvalidToken(f"unsupported alg {alg!r}")
        if self.signing_algorithms and alg not in self.signing_algorithms:
            raise InvalidToken(f"alg {alg} not in configured signingalgorithms")
        if "crit" in header:
            crit = header["crit"]
            if (
                not isinstance(crit, list)
                or not crit
                or any(c not in _UNDERSTOOD_CRIT for c in map(str, crit))
            ):
                raise InvalidToken(f"unsupported crit header {crit!r}")
        return alg

    def _resolve_key(self, header: dict[str, Any], keys: TrustedKeys, now: float) -> PublicKey:
        """distribution's order: x5c, then jwk, then kid.  jku/x5u are never fetched."""
        when = datetime.fromtimestamp(now, tz=UTC)
        if "x5c" in header:
            return _chain_key(header["x5c"], keys, when)
        if "jwk" in header:
            return _jwk_key(header["jwk"], keys, when)
        kid = header.get("kid")
        if kid is not None:
            if not isinstance(kid, str) or not kid:
                raise InvalidToken("kid is not a non-empty string")
            key = keys.lookup(kid)
            if key is None:
                raise InvalidToken(f"token signed by untrusted key id {kid!r}")
            return key
        raise InvalidToken("no x5c, jwk or kid header to find the signing key")

    def _check_claims(self, payload: bytes, header: dict[str, Any], now: float) -> Claims:
        claims = _json_object(payload, "claims")
        issuer = _opt_str(claims, "iss")
        if issuer != self.issuer:
            raise InvalidToken(f"untrusted issuer {issuer!r}")
        audience = _audience(claims.get("aud"))
        if self.service not in audience:
            raise InvalidToken(f"token intended for audience {audience!r}")
        expires_at = _int_claim(claims, "exp")
        if expires_at is None:
            raise InvalidToken("token has no exp")
        if now > expires_at + self.leeway:
            raise InvalidToken(f"token expired at {expires_at} (now {now:.0f})")
        not_before = _int_claim(claims, "nbf")
        if not_before is not None and now < not_before - self.leeway:
            raise InvalidToken(f"token not valid before {not_before} (now {now:.0f})")
        try:
            access = parse_access_claim(claims.get("access"))
        except MalformedAccess as exc:
            raise InvalidToken(f"malformed access claim: {exc}") from None
        return Claims(
            subject=_opt_str(claims, "sub") or "",
            issuer=issuer,
            audience=audience,
            expires_at=expires_at,
            not_before=not_before,
            issued_at=_int_claim(claims, "iat"),
            access=access,
            jti=_opt_str(claims, "jti"),
            kid=header.get("kid") if isinstance(header.get("kid"), str) else None,
        )


# -- helpers --------------------------------------------------------------------


def _b64url_decode(part: str) -> bytes:
    """Unpadded base64url (the JOSE form); the charset was checked by the caller."""
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token: bad base64url") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidToken(f"malformed token: {what} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"malformed token: {what} is not a JSON object")
    return value


def _opt_str(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidToken(f"claim {name} is not a string")
    return value


def _int_claim(claims: dict[str, Any], name: str) -> int | None:
    """NumericDate claims must be JSON integers, as Go's int64 fields require."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidToken(f"claim {name} is not an integer")
    return value


def _audience(value: Any) -> tuple[str, ...]:
    """``aud`` may be a string or a list of strings (RFC 7519 4.1.3)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if value is None:
        return ()
    raise InvalidToken("claim aud is neither a string nor a list of strings")


def _parse_x5c(value: Any) -> list[x509.Certificate]:
    """x5c: non-empty list of standard-base64 DER certificates, leaf first."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise InvalidToken("x5c is not a non-empty list of strings")
    certs = []
    for item in value:
        try:
            certs.append(x509.load_der_x509_certificate(base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError):
            raise InvalidToken("x5c holds an undecodable certificate") from None
    return certs


def _chain_key(value: Any, keys: TrustedKeys, when: datetime) -> PublicKey:
    try:
        return verify_chain(_parse_x5c(value), keys, when)
    except ChainError as exc:
        raise InvalidToken(f"x5c: {exc}") from None


def _jwk_key(value: Any, keys: TrustedKeys, when: datetime) -> PublicKey:
    """Embedded JWK: trusted only through its own x5c, or if it is a bundle key.

    In the latter case the key from the trusted map is used, never the
    embedded one (they are compared anyway).
    """
    if not isinstance(value, dict):
        raise InvalidToken("jwk header is not an object")
    try:
        embedded = public_key_from_jwk(value)
    except ValueError as exc:
        raise InvalidToken(f"jwk header: {exc}") from None
    if "x5c" in value:
        leaf = _chain_key(value["x5c"], keys, when)
        if not same_key(leaf, embedded):
            raise InvalidToken("jwk does not match its x5c leaf certificate")
        return leaf
    trusted = keys.lookup(libtrust_key_id(embedded))
    if trusted is None or not same_key(trusted, embedded):
        raise InvalidToken("untrusted jwk with no certificate chain")
    return trusted


@functools.cache
def _jws_for(alg: str) -> jwt.PyJWS:
    """A PyJWS that knows only ``alg``, so no other algorithm can be substituted."""
    return jwt.PyJWS(algorithms=[alg])


def _verified_payload(raw: str, key: PublicKey, alg: str) -> bytes:
    """Check the signature with PyJWT, the algorithm pinned to ``alg``."""
    try:
        decoded = _jws_for(alg).decode_complete(raw, key=key, algorithms=[alg])
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"bad signature: {exc}") from None
    return decoded["payload"]


def named_signer(raw: str, max_size: int = 8192) -> bytes | None:
    """SHA-256 of the key a token's header names by itself (``x5c`` leaf or ``jwk``), after
    checking the token's signature with that key; None when the header names none (``kid``).

    Nothing here makes the key trusted: forward mode uses it to tell a token
    signed by a key upstream has accepted before from a forgery (claims
    edited, signature made up), which is refused without asking upstream.

    Raises:
        InvalidToken: malformed, or not signed by the key its header names.
    """
    if not isinstance(raw, str) or len(raw) > max_size:
        raise InvalidToken("token missing or oversized")
    parts = raw.split(".")
    if len(parts) != 3 or not all(parts) or not all(map(_B64URL.fullmatch, parts)):
        raise InvalidToken("malformed token: not three base64url parts")
    header = _json_object(_b64url_decode(parts[0]), "header")
    if "x5c" in header:
        try:
            key = check_supported_key(_parse_x5c(header["x5c"])[0].public_key())
        except ValueError as exc:
            raise InvalidToken(f"x5c leaf: {exc}") from None
    elif "jwk" in header:
        if not isinstance(header["jwk"], dict):
            raise InvalidToken("jwk header is not an object")
        try:
            key = public_key_from_jwk(header["jwk"])
        except ValueError as exc:
            raise InvalidToken(f"jwk header: {exc}") from None
    else:
        return None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms_for_key(key):
        raise InvalidToken(f"alg {alg!r} does not fit the key the header names")
    _verified_payload(raw, key, alg)
    return hashlib.sha256(key.public_bytes(*_SPKI)).digest()


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
