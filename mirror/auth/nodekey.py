"""The node's own token-signing key, for the tokens it issues while the link is down.

Generated on first start (EC P-256, ES256) and kept on local disk next to the
metadata, readable by the node's user only (0600), so a node restarted during
a cut still accepts the tokens it issued before. Created with a link-into-place
so that several processes starting at once end up with one key.

Several nodes behind one front (nginx hashing requests over them) must accept
each other's tokens: give them one key with ``mirror.auth.offline_key`` (a PEM
file the operator distributes like a TLS key, or lets the first node write to
a path they share).

The key signs as its own issuer (``mirror-node/<thumbprint>``): the central
auth service's issuer and keys are never borrowed, so a node token can never
pass for a central one, here or upstream.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mirror.config import Settings

from .access import Access, KeyLoadError
from .keys import TrustedKeys, jwk_thumbprint, libtrust_key_id
from .token import TokenVerifier

KEY_FILE = "node-token-key.pem"
ALGORITHM = "ES256"


@dataclass(frozen=True)
class NodeKey:
    """The private key, its key ID and the issuer name tokens signed with it carry."""

    private: ec.EllipticCurvePrivateKey
    kid: str
    issuer: str

    @classmethod
    def for_settings(cls, settings: Settings) -> NodeKey:
        """``mirror.auth.offline_key``, else ``<metadata_dir>/node-token-key.pem``."""
        return cls.load_or_create(settings.mirror.auth.offline_key
                                  or settings.metadata_dir / KEY_FILE)

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """The key in ``path``, generating it first if there is none.

        Raises:
            OSError: the directory or key file cannot be read or written.
            KeyLoadError: the key file holds something other than an EC P-256 key.
        """
        if not path.exists():
            _create(path)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise KeyLoadError(f"node token key {path}: unreadable: {exc}") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
            raise KeyLoadError(f"node token key {path}: not an EC P-256 private key")
        public = private.public_key()
        return cls(private, libtrust_key_id(public), f"mirror-node/{jwk_thumbprint(public)}")

    def sign(self, subject: str, audience: str, access: list[Access], lifetime: float) -> str:
        """A compact JWS with the claims distribution reads, signed ES256."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": subject, "aud": audience,
            "exp": now + int(lifetime), "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "access": [{"type": a.type, "name": a.name, "actions": sorted(a.actions)}
                       for a in access],
        }
        return jwt.encode(claims, self.private, algorithm=ALGORITHM, headers={"kid": self.kid})

    def verifier(self, service: str) -> TokenVerifier:
        """A verifier that accepts this key's tokens only: its issuer, its key, ES256."""
        keys = TrustedKeys(keys=MappingProxyType({self.kid: self.private.public_key()}),
                           sources=("node key",))
        # No leeway: the node checks its own clock, and a token must end with the user's grace.
        return TokenVerifier(self.issuer, service, keys, signing_algorithms=(ALGORITHM,),
                             leeway=0.0)


def _create(path: Path) -> None:
    """Write a fresh key to a private temp file, then link it into place (first writer wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        temp.unlink(missing_ok=True)
