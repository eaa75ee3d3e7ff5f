"""Helpers for the auth tests: nodes with an ``auth:`` section, a "central" side
(token-auth distribution + the token service stand-in), tokens and challenges.

    with Central(tmp, ca, users={...}) as central:
        central.registry.url          # distribution 2.8 with auth.token
        central.issuer.url            # its realm (TokenIssuer)
        central.token_block           # the same auth.token block, for a node's config
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import httpx

from tests.conftest import mirror_config
from tests.support.registry import Registry, run_registry
from tests.support.token_issuer import ISSUER, SERVICE, CertBundle, TokenIssuer

__all__ = [
    "Central",
    "basic",
    "bearer",
    "challenge_params",
    "error_body",
    "flip_signature",
    "node_config",
    "pull_access",
    "swap_payload",
    "token_block",
]


def token_block(cert_path: Path | str, realm: str, *, service: str = SERVICE,
                issuer: str = ISSUER) -> dict[str, str]:
    """An ``auth.token`` section (distribution's keys)."""
    return {"realm": realm, "service": service, "issuer": issuer, "rootcertbundle": str(cert_path)}


def node_config(base: Path, remote_url: str, *, auth: Mapping[str, Any] | None = None,
                proxy: Mapping[str, Any] | None = None, http: Mapping[str, Any] | None = None,
                mirror_auth: Mapping[str, Any] | None = None, **mirror: Any) -> dict[str, Any]:
    """A full node config (for ``make_mirror(url, config=...)``) with auth and extras.

    The store goes into a fresh directory under ``base``, so several nodes may
    share one ``tmp_path``.
    """
    root = base / f"authnode-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    if mirror_auth:
        mirror["auth"] = dict(mirror_auth)
    config = mirror_config(root, remote_url, **mirror)
    if auth:
        config["auth"] = copy.deepcopy(dict(auth))
    config["proxy"].update(proxy or {})
    config["http"].update(http or {})
    return config


def pull_access(repo: str, *actions: str) -> list[tuple[str, str, list[str]]]:
    """The ``access`` argument of ``mint`` for one repository (pull by default)."""
    return [("repository", repo, list(actions or ("pull",)))]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def challenge_params(header: str | None) -> tuple[str, dict[str, str]]:
    """``Bearer realm="r",service="s"`` -> ("bearer", {"realm": "r", "service": "s"})."""
    from mirror.upstream.auth import Challenge

    parsed = Challenge.parse(header or "")
    assert parsed is not None, f"unparseable challenge {header!r}"
    return parsed.scheme, parsed.params


def error_body(response: httpx.Response) -> tuple[str, Any]:
    """(code, detail) of the first error of a JSON error body; detail None when absent."""
    entry = response.json()["errors"][0]
    return entry["code"], entry.get("detail")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def flip_signature(token: str) -> str:
    """The same token with one bit of its signature flipped."""
    head, payload, sig = token.split(".")
    raw = bytearray(_unb64url(sig))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{_b64url(bytes(raw))}"


def swap_payload(token: str, **claims: Any) -> str:
    """The token with claims changed and its original signature kept (forgery)."""
    head, payload, sig = token.split(".")
    body = json.loads(_unb64url(payload))
    body.update(claims)
    return f"{head}.{_b64url(json.dumps(body, separators=(',', ':')).encode())}.{sig}"


class Central:
    """The central side: a token service and a distribution 2.8 trusting its CA.

    ``users``/``anonymous`` as for :class:`TokenIssuer`; ``service`` is both
    the issuer's audience and the registry's ``auth.token.service``.
    """

    def __init__(self, tmp: Path, ca: CertBundle, *, users: Mapping[str, Any] | None = None,
                 anonymous: Mapping[str, Iterable[str]] | None = None,
                 service: str = SERVICE) -> None:
        self.tmp = Path(tmp)
        self.ca = ca
        self.service = service
        self.issuer = TokenIssuer(ca, users=users, anonymous=anonymous, service=service)
        self._stack = ExitStack()
        self.registry: Registry

    @property
    def token_block(self) -> dict[str, str]:
        return token_block(self.ca.cert_path, self.issuer.url, service=self.service)

    def admin_token(self, repo: str) -> str:
        """A push+pull token for seeding the registry."""
        return self.ca.mint(audience=self.service, subject="admin",
                            access=pull_access(repo, "pull", "push"))

    def __enter__(self) -> Self:
        try:
            self._stack.enter_context(self.issuer)
            self.registry = self._stack.enter_context(
                run_registry(self.tmp, auth_token=self.token_block, name=f"central-{self.service}"))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def iter_log(self) -> Iterator[tuple[str | None, int]]:
        """(user, status) of every token request the issuer answered."""
        for user, _requested, status in list(self.issuer.log):
            yield user, status
