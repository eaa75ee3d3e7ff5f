"""Trusted token-signing keys: distribution's ``rootcertbundle`` and ``jwks``.

Loaded once into an immutable ``TrustedKeys``; a reload (SIGHUP) builds a new
object and the server swaps the reference, so verifiers never see a
half-loaded key set.

Key IDs indexed, so that every ``kid`` a real auth service emits resolves:

* libtrust key ID of each bundle certificate's key (what distribution 2.8
  and docker_auth put in ``kid``),
* RFC 7638 JWK thumbprint of each bundle certificate's key (what distribution
  3.x indexes),
* each JWKS key by its ``kid`` and by its thumbprint.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_NAMES = {cls.name: jwk_name for jwk_name, cls in _CURVES.items()}


from .access import KeyLoadError  # noqa: E402 - defined crypto-free for the CLI to catch

# ---------------------------------------------------------------------------
# Key identifiers
# ---------------------------------------------------------------------------


def check_supported_key(key: Any) -> PublicKey:
    """Return ``key`` if it is a key type tokens may be signed with, else raise ValueError."""
    if isinstance(key, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVE_NAMES:
        return key
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def libtrust_key_id(key: PublicKey) -> str:
    """libtrust ``KeyID``: base32(SHA-256(DER SPKI)[:30]) in 12 ``:``-joined groups of 4.

    distribution 2.8 indexes trusted keys by this and docker_auth emits it as
    ``kid``; 30 bytes give exactly 48 unpadded base32 characters.
    """
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint_bytes(value: int, length: int | None = None) -> bytes:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(size, "big")


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The RFC 7638 required members of the key's public JWK (thumbprint input)."""
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {"e": _b64url(_uint_bytes(nums.e)), "kty": "RSA", "n": _b64url(_uint_bytes(nums.n))}
    if isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        return {
            "crv": _CURVE_NAMES[key.curve.name],
            "kty": "EC",
            "x": _b64url(_uint_bytes(nums.x, size)),
            "y": _b64url(_uint_bytes(nums.y, size)),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint: base64url(SHA-256(canonical JSON of required members))."""
    canonical = json.dumps(public_jwk(key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _b64url_decode(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError("JWK member is not a non-empty string")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """Build a public key from a JWK (RSA, EC P-256/384/521, OKP Ed25519).

    Only public members are read, so a JWK that also carries private parts
    still yields just the public key.  Raises ValueError on anything else.
    """
    kty = jwk.get("kty")
    if kty == "RSA":
        n = int.from_bytes(_b64url_decode(jwk.get("n")), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e")), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if kty == "EC":
        curve = _CURVES.get(jwk.get("crv"))  # type: ignore[arg-type]
        if curve is None:
            raise ValueError(f"unsupported EC curve {jwk.get('crv')!r}")
        x = int.from_bytes(_b64url_decode(jwk.get("x")), "big")
        y = int.from_bytes(_b64url_decode(jwk.get("y")), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk.get("x")))
    raise ValueError(f"unsupported JWK kty/crv {kty!r}/{jwk.get('crv')!r}")


def same_key(a: PublicKey, b: PublicKey) -> bool:
    """Compare keys by their DER SubjectPublicKeyInfo."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


# ---------------------------------------------------------------------------
# The trusted set
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedKeys:
    """Immutable trust material: bundle certificates plus a key-ID map."""

    certificates: tuple[x509.Certificate, ...] = ()
    keys: Mapping[str, PublicKey] = field(default_factory=lambda: MappingProxyType({}))
    sources: tuple[str, ...] = ()
    #: DER encodings of the bundle certificates, for the leaf-in-bundle check.
    bundle_der: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        der = frozenset(c.public_bytes(serialization.Encoding.DER) for c in self.certificates)
        object.__setattr__(self, "bundle_der", der)

    def lookup(self, key_id: str) -> PublicKey | None:
        """The trusted key for a libtrust ID, thumbprint or JWKS ``kid``."""
        return self.keys.get(key_id)

    def __len__(self) -> int:
        return len(self.keys)


def load_trusted_keys(
    rootcertbundle: Path | str | None, jwks: Path | str | None = None
) -> TrustedKeys:
    """Load the bundle and/or JWKS into a new ``TrustedKeys``.

    Raises ``KeyLoadError`` (one line, names the file) when a file is
    unreadable, holds no usable key, or nothing was configured at all; as
    distribution refuses to start without a signing key.
    """
    if rootcertbundle is None and jwks is None:
        raise KeyLoadError("token auth needs a rootcertbundle or a jwks file")
    index: dict[str, PublicKey] = {}
    certs: tuple[x509.Certificate, ...] = ()
    sources: list[str] = []
    if rootcertbundle is not None:
        certs = _load_bundle(Path(rootcertbundle))
        for cert in certs:
            key = check_supported_key(cert.public_key())
            _index_key(index, libtrust_key_id(key), key, rootcertbundle)
            _index_key(index, jwk_thumbprint(key), key, rootcertbundle)
        sources.append(str(rootcertbundle))
    if jwks is not None:
        for kid, key in _load_jwks(Path(jwks)):
            if kid:
                _index_key(index, kid, key, jwks)
            _index_key(index, jwk_thumbprint(key), key, jwks)
        sources.append(str(jwks))
    return TrustedKeys(certs, MappingProxyType(index), tuple(sources))


def _index_key(
    index: dict[str, PublicKey], key_id: str, key: PublicKey, source: Path | str
) -> None:
    """Add ``key_id``; the same ID for a different key is a configuration error."""
    existing = index.get(key_id)
    if existing is not None and not same_key(existing, key):
        raise KeyLoadError(f"{source}: key id {key_id!r} names two different keys")
    index[key_id] = key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyLoadError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _load_bundle(path: Path) -> tuple[x509.Certificate, ...]:
    """Parse every CERTIFICATE block; other PEM blocks are skipped like distribution does."""
    data = _read(path, "rootcertbundle")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise KeyLoadError(f"rootcertbundle {path} contains no PEM certificate")
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise KeyLoadError(f"rootcertbundle {path}: unparsable certificate: {exc}") from None
    for cert in certs:
        try:
            check_supported_key(cert.public_key())
        except ValueError as exc:
            raise KeyLoadError(f"rootcertbundle {path}: {exc}") from None
    return certs


def _load_jwks(path: Path) -> list[tuple[str | None, PublicKey]]:
    """Parse a JWK Set file into (kid, key) pairs."""
    try:
        doc = json.loads(_read(path, "jwks"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyLoadError(f"jwks {path} is not valid JSON: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise KeyLoadError(f'jwks {path} has no "keys" list or it is empty')
    out: list[tuple[str | None, PublicKey]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise KeyLoadError(f"jwks {path}: key #{i} is not an object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise KeyLoadError(f"jwks {path}: key #{i} has a non-string kid")
        try:
            out.append((kid, public_key_from_jwk(entry)))
        except ValueError as exc:
            raise KeyLoadError(f"jwks {path}: key #{i}: {exc}") from None
    return out


# ---------------------------------------------------------------------------
# x5c chain verification
# ---------------------------------------------------------------------------

#: Longest x5c chain considered (leaf + intermediates); real ones have 1-3.
MAX_CHAIN_LENGTH = 8

#: Signature checks one chain may cost, as Go's verifier bounds them
#: (``maxChainSignatureChecks``); a real chain of 3 needs at most a handful.
MAX_SIGNATURE_CHECKS = 32

_WEAK_HASHES = ("md5", "sha1")


class ChainError(ValueError):
    """An x5c chain does not lead to a bundle certificate."""


def verify_chain(
    chain: Sequence[x509.Certificate],
    trusted: TrustedKeys,
    now: datetime,
    max_checks: int = MAX_SIGNATURE_CHECKS,
) -> PublicKey:
    """Verify ``chain`` (leaf first) up to a bundle certificate; return the leaf key.

    Same acceptance as distribution's ``x509.Verify`` with Roots=bundle,
    Intermediates=rest of chain, ExtKeyUsageAny: a leaf that is itself in the
    bundle is trusted; otherwise each link must be signed by a CA (v1, or
    basicConstraints CA with certSign usage if keyUsage is present), within
    path-length limits, every certificate valid at ``now``.

    The search is bounded as Go's is: at most ``max_checks`` signature
    checks, each (child, parent) pair checked at most once, no key twice in a
    path, and the first complete path ends it. So a hostile ``x5c`` (say
    eight CA certificates sharing one key and subject, each an apparent
    issuer of every other) costs a few checks, not every ordering.

    ``cryptography.x509.verification`` is not used: it enforces the CA/B web
    PKI profile (its extension policies can relax much of it, but not the v1
    roots and extension-less certificates 2.8 accepts) and rejects the plain
    self-signed certificates (``openssl req -x509``) auth services sign with.
    """
    if not chain or len(chain) > MAX_CHAIN_LENGTH:
        raise ChainError("empty or overlong certificate chain")
    leaf = chain[0]
    _check_usable(leaf, now)
    try:
        key = check_supported_key(leaf.public_key())
    except ValueError as exc:
        raise ChainError(f"leaf certificate: {exc}") from None
    if leaf.public_bytes(serialization.Encoding.DER) in trusted.bundle_der:
        return key
    search = _PathSearch(chain[1:], trusted, now, max_checks)
    if not search.complete([leaf], {_spki(leaf) or b""}):
        raise ChainError(f"certificate chain for {leaf.subject.rfc4514_string()!r} is not trusted"
                         + (" (signature-check budget spent)" if search.spent else ""))
    return key


def _spki(cert: x509.Certificate) -> bytes | None:
    """The certificate's DER SubjectPublicKeyInfo; None when its key cannot be read."""
    try:
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except Exception:  # noqa: BLE001 - unsupported or malformed key: never a usable issuer
        return None


class _PathSearch:
    """Depth-first search from a leaf to a bundle certificate, with a signature budget."""

    def __init__(self, pool: Sequence[x509.Certificate], trusted: TrustedKeys, now: datetime,
                 max_checks: int) -> None:
        self.pool = [(c, spki) for c in pool
                     if _usable_quietly(c, now) and (spki := _spki(c)) is not None]
        self.roots = [r for r in trusted.certificates if _valid_at(r, now)]
        self.left = max_checks
        self.checks = 0
        self.spent = False
        self._verdicts: dict[tuple[int, int], bool] = {}

    def complete(self, path: list[x509.Certificate], keys: frozenset[bytes] | set[bytes]) -> bool:
        """True when ``path`` extends to a root; never tries a key already on the path."""
        child, below = path[-1], len(path) - 1
        if any(self._issued_by(child, root, below) for root in self.roots):
            return True
        if len(path) >= MAX_CHAIN_LENGTH:
            return False
        for candidate, spki in self.pool:
            if self.spent:
                return False
            if spki in keys or not self._issued_by(child, candidate, below):
                continue
            if self.complete([*path, candidate], keys | {spki}):
                return True
        return False

    def _issued_by(self, child: x509.Certificate, parent: x509.Certificate, below: int) -> bool:
        """``_issued_by``, each pair's signature verified once and charged to the budget."""
        if self.spent or not _may_sign_quietly(parent, below) or child.issuer != parent.subject:
            return False  # no signature check needed to say no
        pair = (id(child), id(parent))
        if pair not in self._verdicts:
            if self.left <= 0:
                self.spent = True
                return False
            self.left -= 1
            self.checks += 1
            self._verdicts[pair] = _issued_by(child, parent, below)
        return self._verdicts[pair]


def _may_sign_quietly(parent: x509.Certificate, below: int) -> bool:
    try:
        return _may_sign(parent, below)
    except ValueError:  # malformed extensions
        return False


def _issued_by(child: x509.Certificate, parent: x509.Certificate, intermediates_below: int) -> bool:
    """True when ``parent`` may sign certificates and did sign ``child``."""
    try:
        if not _may_sign(parent, intermediates_below):
            return False
        hash_alg = child.signature_hash_algorithm
        if hash_alg is not None and hash_alg.name in _WEAK_HASHES:
            return False
        child.verify_directly_issued_by(parent)
    except Exception:  # noqa: BLE001 - any parse/verify failure means "not issued by"
        return False
    return True


def _may_sign(parent: x509.Certificate, intermediates_below: int) -> bool:
    """Go's CheckSignatureFrom constraints plus the basicConstraints path length."""
    exts = parent.extensions
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return parent.version == x509.Version.v1
    if not bc.ca or (bc.path_length is not None and intermediates_below > bc.path_length):
        return False
    try:
        usage = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _check_usable(cert: x509.Certificate, now: datetime) -> None:
    """Raise ChainError unless ``cert`` is in its validity period and has no unknown critical extension."""
    if not _valid_at(cert, now):
        raise ChainError(
            f"certificate {cert.subject.rfc4514_string()!r} is expired or not yet valid"
        )
    try:
        extensions = list(cert.extensions)
    except ValueError as exc:
        raise ChainError(f"certificate has malformed extensions: {exc}") from None
    for ext in extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise ChainError(
                f"certificate has unhandled critical extension {ext.oid.dotted_string}"
            )


def _usable_quietly(cert: x509.Certificate, now: datetime) -> bool:
    try:
        _check_usable(cert, now)
    except ChainError:
        return False
    return True
