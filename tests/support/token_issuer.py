"""A stand-in for the central docker auth service, for tests.

* ``make_ca`` generates signing keys and certificates as PEM files (the cert
  file is usable as distribution's ``rootcertbundle``);
* ``mint`` crafts tokens, valid or broken in any one chosen way;
* ``TokenIssuer`` serves the docker token endpoint (``GET /token``, and the
  OAuth2 ``POST /token`` containerd tries first) from a background thread,
  granting requested ∩ allowed actions like docker_auth.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from mirror.auth.access import Access, parse_scopes
from mirror.auth.keys import jwk_thumbprint, libtrust_key_id, public_jwk

ISSUER = "caas-issuer"
SERVICE = "caas-registry"

_counter = itertools.count()


# ---------------------------------------------------------------------------
# Keys and certificates
# ---------------------------------------------------------------------------


def new_key(key_type: str = "rsa") -> Any:
    """A private key: ``rsa``, ``ec256``, ``ec384``, ``ec521`` or ``ed25519``."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curves = {"ec256": ec.SECP256R1, "ec384": ec.SECP384R1, "ec521": ec.SECP521R1}
    if key_type in curves:
        return ec.generate_private_key(curves[key_type]())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}")


def default_alg(key: Any) -> str:
    """The natural JWS algorithm for a (private or public) key."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    return "EdDSA"


def _hash_for(key: Any) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_cert(
    subject_key: Any,
    common_name: str,
    issuer_key: Any | None = None,
    issuer_cert: x509.Certificate | None = None,
    *,
    ca: bool = True,
    path_length: int | None = None,
    extensions: bool = True,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A certificate for ``subject_key``; self-signed unless an issuer is given.

    By default valid from a day before to 30 days after now: a test clock read
    long before or after this call (a slow run) still falls inside it.

    With ``extensions=False`` the certificate carries none at all (a v3
    certificate without basicConstraints), to exercise lenient paths.
    """
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer = issuer_key or subject_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
    )
    if extensions:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length), critical=True
        )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False
        )
        if not ca:
            builder = builder.add_extension(_signing_usage(), critical=True)
    return builder.sign(signer, _hash_for(signer))


def _signing_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertBundle:
    """A token-signing identity: key, x5c chain, and the trust-anchor PEM file."""

    key: Any
    chain: tuple[x509.Certificate, ...]  # x5c order: signing cert first, no root
    root: x509.Certificate
    cert_path: Path  # PEM with the root only: use as rootcertbundle
    key_path: Path
    chain_keys: tuple[Any, ...] = ()  # private keys of ``chain``, same order
    root_key: Any = None

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def public_key(self) -> Any:
        return self.key.public_key()

    @property
    def alg(self) -> str:
        return default_alg(self.key)

    @property
    def kid(self) -> str:
        """libtrust key ID of the signing key (what distribution 2.8 expects in kid)."""
        return libtrust_key_id(self.public_key)

    @property
    def thumbprint(self) -> str:
        return jwk_thumbprint(self.public_key)

    def jwk(self, **extra: Any) -> dict[str, Any]:
        return {**public_jwk(self.public_key), **extra}

    def mint(self, **kwargs: Any) -> str:
        return mint(self.key, self.chain, **kwargs)


def make_ca(
    tmp_dir: Path | str,
    *,
    key_type: str = "rsa",
    depth: int = 0,
    name: str = "caas-token",
    extensions: bool = True,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertBundle:
    """Generate a signing identity and write ``<name>-N-cert.pem``/``-key.pem``.

    ``depth=0``: a self-signed certificate (the usual setup: the auth service
    signs with the certificate the registry has as rootcertbundle).
    ``depth=1``: root CA -> signing cert; ``depth=2``: root -> intermediate ->
    signing cert.  Chained roots are RSA; the signing key is ``key_type``.
    The validity bounds apply to the signing certificate.
    """
    tmp = Path(tmp_dir)
    key = new_key(key_type)
    validity = {"not_before": not_before, "not_after": not_after}
    if depth == 0:
        cert = make_cert(key, name, extensions=extensions, **validity)
        chain, chain_keys, root, root_key = (cert,), (key,), cert, key
    else:
        root_key = new_key("rsa")
        root = make_cert(root_key, f"{name} root CA")
        issuer_key, issuer_cert, rest, rest_keys = root_key, root, (), ()
        if depth >= 2:
            inter_key = new_key("rsa")
            inter = make_cert(inter_key, f"{name} intermediate", root_key, root, path_length=0)
            issuer_key, issuer_cert, rest, rest_keys = inter_key, inter, (inter,), (inter_key,)
        leaf = make_cert(
            key, name, issuer_key, issuer_cert, ca=False, extensions=extensions, **validity
        )
        chain, chain_keys = (leaf, *rest), (key, *rest_keys)
    stem = f"{name}-{next(_counter)}"
    cert_path, key_path = tmp / f"{stem}-cert.pem", tmp / f"{stem}-key.pem"
    cert_path.write_bytes(pem(root))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return CertBundle(key, chain, root, cert_path, key_path, chain_keys, root_key)


def write_bundle(path: Path | str, *certs: x509.Certificate) -> Path:
    """Concatenate certificates into one PEM bundle file."""
    out = Path(path)
    out.write_bytes(b"".join(pem(c) for c in certs))
    return out


# ---------------------------------------------------------------------------
# Minting
# ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _access_json(access: Iterable[Any]) -> list[Any]:
    out = []
    for item in access:
        if isinstance(item, Access):
            out.append({"type": item.type, "name": item.name, "actions": sorted(item.actions)})
        elif isinstance(item, tuple):
            rtype, name, actions = item
            out.append({"type": rtype, "name": name, "actions": list(actions)})
        else:
            out.append(item)  # raw dicts / junk for malformed-claim tests
    return out


def sign(signing_input: bytes, key: Any, alg: str, hmac_secret: bytes | None = None) -> bytes:
    """Sign with any JWS alg, including the ones a verifier must refuse."""
    if alg.lower() == "none":
        return b""
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        return hmac.new(hmac_secret or b"", signing_input, digest).digest()
    return jwt.algorithms.get_default_algorithms()[alg].sign(signing_input, key)


def mint(
    key: Any,
    cert_chain: Iterable[x509.Certificate] = (),
    *,
    header_mode: str = "x5c",
    issuer: str = ISSUER,
    audience: str | list[str] = SERVICE,
    subject: str = "alice",
    access: Iterable[Any] | None = (),
    exp_delta: float = 300,
    nbf_delta: float | None = None,
    iat_delta: float = 0,
    alg: str | None = None,
    sign_alg: str | None = None,
    extra_header: Mapping[str, Any] | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    drop_claims: Iterable[str] = (),
    kid: str | None = None,
    jwk: Mapping[str, Any] | None = None,
    jti: str | None = None,
    now: float | None = None,
    hmac_secret: bytes | None = None,
) -> str:
    """Mint a compact JWS token; every knob exists to break one rule.

    ``header_mode``: ``x5c`` (chain), ``kid`` (libtrust ID unless ``kid``
    given), ``jwk`` (embedded public JWK unless ``jwk`` given), ``none-key``
    (no key reference at all).  ``alg`` is the header value; ``sign_alg`` the
    algorithm really used to sign (defaults to ``alg``).  ``access=None``
    omits the claim.
    """
    now = time.time() if now is None else now
    alg = alg or default_alg(key)
    header: dict[str, Any] = {"typ": "JWT", "alg": alg}
    if header_mode == "x5c":
        header["x5c"] = [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
            for c in cert_chain
        ]
    elif header_mode == "kid":
        header["kid"] = kid or libtrust_key_id(key.public_key())
    elif header_mode == "jwk":
        header["jwk"] = dict(jwk) if jwk is not None else public_jwk(key.public_key())
    elif header_mode != "none-key":
        raise ValueError(f"unknown header_mode {header_mode!r}")
    header.update(extra_header or {})
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": int(now + exp_delta),
        "iat": int(now + iat_delta),
        "jti": jti or f"jti-{next(_counter)}",
    }
    if nbf_delta is not None:
        claims["nbf"] = int(now + nbf_delta)
    if access is not None:
        claims["access"] = _access_json(access)
    claims.update(extra_claims or {})
    for name in drop_claims:
        claims.pop(name, None)
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    ).encode()
    signature = sign(signing_input, key, sign_alg or alg, hmac_secret)
    return f"{signing_input.decode()}.{_b64url(signature)}"


# ---------------------------------------------------------------------------
# Token server
# ---------------------------------------------------------------------------

Acl = Mapping[str, Iterable[str]]


def _allowed(acl: Acl, rtype: str, name: str) -> set[str]:
    """ACL keys are repository names, or ``type:name`` for other resource types."""
    actions = acl.get(f"{rtype}:{name}")
    if actions is None and rtype == "repository":
        actions = acl.get(name)
    return set(actions or ())


def grant(requested: Iterable[Access], allowed_acls: Iterable[Acl]) -> list[Access]:
    """requested ∩ allowed per resource, ``*`` in the ACL allowing anything; empty grants dropped."""
    acls = list(allowed_acls)
    granted = []
    for req in requested:
        allowed = set().union(*(_allowed(acl, req.type, req.name) for acl in acls))
        actions = set(req.actions) if "*" in allowed else set(req.actions) & allowed
        if actions:
            granted.append(Access(req.type, req.name, frozenset(actions)))
    return granted


class TokenIssuer:
    """docker token endpoint on 127.0.0.1:<free port>, run in its own thread and loop.

    ``users``: ``{"alice": ("pw", {"team/app": {"pull", "push"}})}``;
    ``anonymous``: ACL applied to everyone (also to authenticated users).
    """

    def __init__(
        self,
        bundle: CertBundle,
        *,
        users: Mapping[str, tuple[str, Acl]] | None = None,
        anonymous: Acl | None = None,
        issuer: str = ISSUER,
        service: str = SERVICE,
        header_mode: str = "x5c",
        ttl: int = 300,
    ) -> None:
        self.bundle = bundle
        self.users = dict(users or {})
        self.anonymous = dict(anonymous or {})
        self.issuer = issuer
        self.service = service
        self.header_mode = header_mode
        self.ttl = ttl
        self.requests = 0
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user, handed out on request
        self.log: list[tuple[str | None, tuple[Access, ...], int]] = []  # (user, requested, status)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The token endpoint: use as the ``realm``."""
        return f"http://127.0.0.1:{self.port}/token"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="token-issuer", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._handle)
        app.router.add_post("/token", self._handle_oauth)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    # -- endpoint --------------------------------------------------------------------

    def mint_for(self, subject: str, access: Iterable[Access]) -> str:
        """A token as this issuer would hand it out."""
        return self.bundle.mint(
            header_mode=self.header_mode,
            issuer=self.issuer,
            audience=self.service,
            subject=subject,
            access=list(access),
            exp_delta=self.ttl,
        )

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        service = request.query.get("service")
        if service is not None and service != self.service:
            return web.json_response({"details": f"unknown service {service!r}"}, status=400)
        try:
            requested = tuple(a for s in request.query.getall("scope", []) for a in parse_scopes(s))
        except ValueError as exc:
            return web.json_response({"details": str(exc)}, status=400)
        user, acls = self._authenticate(request.headers.get("Authorization"))
        if acls is None:
            self.log.append((user, requested, 401))
            return web.json_response(
                {"details": "incorrect username or password"},
                status=401,
                headers={"WWW-Authenticate": f'Basic realm="{self.url}"'},
            )
        token = self.mint_for(user or "", grant(requested, acls))
        self.log.append((user, requested, 200))
        issued = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued}
        if request.query.get("offline_token") == "true" and user:
            body["refresh_token"] = self.new_refresh_token(user)
        return web.json_response(body)

    async def _handle_oauth(self, request: web.Request) -> web.Response:
        """OAuth2 password and refresh_token grants (distribution's oauth.md)."""
        self.requests += 1
        form = await request.post()
        service = form.get("service")
        if service is not None and service != self.service:
            return web.json_response({"details": f"unknown service {service!r}"}, status=400)
        try:
            requested = parse_scopes(str(form.get("scope", "")))
        except ValueError as exc:
            return web.json_response({"details": str(exc)}, status=400)
        grant_type = form.get("grant_type")
        if grant_type == "password":
            user, acls = self._check_password(str(form.get("username", "")),
                                              str(form.get("password", "")))
        elif grant_type == "refresh_token":
            user = self.refresh_tokens.get(str(form.get("refresh_token", "")))
            acls = [self.users[user][1], self.anonymous] if user in self.users else None
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if acls is None:
            self.log.append((user, requested, 401))
            return web.json_response({"error": "invalid_grant", "details": "incorrect credentials"},
                                     status=401)
        token = self.mint_for(user or "", grant(requested, acls))
        self.log.append((user, requested, 200))
        issued = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"access_token": token, "expires_in": self.ttl, "issued_at": issued,
                "scope": " ".join(a.scope for a in requested)}
        if form.get("access_type") == "offline" and user:
            body["refresh_token"] = self.new_refresh_token(user)
        return web.json_response(body)

    def new_refresh_token(self, user: str) -> str:
        """A refresh token for ``user`` (valid until the user is removed or it is revoked)."""
        refresh = base64.urlsafe_b64encode(hashlib.sha256(f"{user}{time.time_ns()}{next(_counter)}"
                                                          .encode()).digest()).decode().rstrip("=")
        self.refresh_tokens[refresh] = user
        return refresh

    def _check_password(self, user: str, password: str) -> tuple[str | None, list[Acl] | None]:
        entry = self.users.get(user)
        if entry is None or not hmac.compare_digest(entry[0], password):
            return user, None
        return user, [entry[1], self.anonymous]

    def _authenticate(self, header: str | None) -> tuple[str | None, list[Acl] | None]:
        """(user, ACLs) for the request; ACLs None means "wrong credentials"."""
        if not header:
            return None, [self.anonymous]
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, None
        return self._check_password(user, password)
