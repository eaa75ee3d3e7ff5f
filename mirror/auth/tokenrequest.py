"""What a client asked `/token` for, in either of the two token flows.

* ``GET`` (docker's token protocol): ``?service=&scope=...`` with optional
  Basic credentials in ``Authorization``;
* ``POST`` (the OAuth2 form containerd tries first): ``grant_type=password``
  with ``username``/``password``, or ``grant_type=refresh_token`` with
  ``refresh_token``; ``scope`` holds the scopes space-separated.

Both are read into one :class:`TokenRequest`, so the relay caches them alike and
the offline authority checks the same credentials whichever flow brought them.
The secret stays in memory only, and is kept out of ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from mirror import errors

from .access import Access, parse_scopes, scope_param

MAX_BODY = 64 * 1024
#: Headers passed on to the central auth service.
FORWARDED_HEADERS = ("authorization", "content-type", "user-agent", "accept")

ANONYMOUS, BASIC, PASSWORD, REFRESH, OTHER = "anonymous", "basic", "password", "refresh", "other"


@dataclass(frozen=True)
class TokenRequest:
    """One `/token` request, parsed.

    Attributes:
        flow: ``anonymous``, ``basic`` (GET with Basic), ``password`` / ``refresh``
            (OAuth2 POST grants), or ``other`` (nothing the node can check itself).
        scopes: the requested access; None when a scope could not be parsed.
        query: the GET query pairs, as sent; body: the POST form, as sent.
    """

    method: str
    flow: str
    username: str
    secret: str = field(repr=False)
    service: str
    scopes: tuple[Access, ...] | None
    query: tuple[tuple[str, str], ...] = ()
    body: bytes | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def credentials_key(self) -> str:
        """Where the verifier for these credentials is filed (no secret in it).

        Basic and password grants share the key, so a password learned from
        docker also serves containerd's POST, and the other way round.
        """
        if self.flow in (BASIC, PASSWORD):
            return f"user:{self.username}"
        if self.flow == REFRESH:
            return refresh_key(self.secret)
        return ""

    @property
    def cache_key(self) -> str:
        """The relay's cache key: method, credentials, service and every parameter."""
        params = self.query
        if self.method == "POST":
            params = tuple(parse_qsl((self.body or b"").decode("utf-8", "replace")))
        material = "\n".join((self.method, dict(self.headers).get("authorization", ""),
                              *sorted(f"{k}={v}" for k, v in params)))
        return hashlib.sha256(material.encode()).hexdigest()

    def asking_for(self, scopes: tuple[Access, ...]) -> TokenRequest:
        """The same credentials asking for other scopes (for learning grants).

        Password grants are asked the docker way (GET with Basic), which every
        token service answers; refresh tokens can only be asked by POST.
        """
        query: list[tuple[str, str]] = [("service", self.service)]
        if self.flow == REFRESH:
            form = {"grant_type": "refresh_token", "refresh_token": self.secret,
                    "service": self.service, "client_id": "mirror", "scope": scope_param(scopes)}
            headers = (("content-type", "application/x-www-form-urlencoded"),)
            return replace(self, method="POST", scopes=scopes, query=(),
                           body=urlencode(form).encode(), headers=headers)
        query += [("scope", a.scope) for a in scopes]
        raw = base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()
        return replace(self, method="GET", flow=BASIC, scopes=scopes, query=tuple(query), body=None,
                       headers=(("authorization", f"Basic {raw}"),))


def refresh_key(refresh_token: str) -> str:
    """Where a refresh token's verifier is filed: a short prefix of its hash, not the token."""
    return "refresh:" + hashlib.sha256(refresh_token.encode()).hexdigest()[:16]


async def read_token_request(request: web.Request) -> TokenRequest:
    """Parse a client's `/token` request.

    Raises:
        errors.Unsupported: neither GET nor POST.
        errors.RegistryError: a POST body larger than 64 KiB (413).
    """
    if request.method not in ("GET", "POST"):
        raise errors.Unsupported()
    headers = tuple((k.lower(), v) for k, v in request.headers.items()
                    if k.lower() in FORWARDED_HEADERS)
    query = tuple(request.rel_url.query.items())
    if request.method == "GET":
        flow, username, secret = _basic(request.headers.get("Authorization"))
        scopes = _scopes(v for k, v in query if k == "scope")
        return TokenRequest("GET", flow, username, secret, request.query.get("service", ""),
                            scopes, query, None, headers)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise errors.RegistryError("token request too large", status=413)
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise errors.RegistryError("token request too large", status=413)
    form = dict(parse_qsl(body.decode("utf-8", "replace")))
    flow, username, secret = _grant(form)
    return TokenRequest("POST", flow, username, secret, form.get("service", ""),
                        _scopes([form.get("scope", "")]), query, body, headers)


def _basic(header: str | None) -> tuple[str, str, str]:
    """(flow, username, password) from an ``Authorization`` header."""
    if not header:
        return ANONYMOUS, "", ""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return OTHER, "", ""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
        username, sep, password = decoded.partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return OTHER, "", ""
    return (BASIC, username, password) if sep and username else (OTHER, "", "")


def _grant(form: dict[str, str]) -> tuple[str, str, str]:
    """(flow, username, secret) of an OAuth2 form."""
    grant = form.get("grant_type")
    if grant == "password" and form.get("username") and form.get("password"):
        return PASSWORD, form["username"], form["password"]
    if grant == "refresh_token" and form.get("refresh_token"):
        return REFRESH, "", form["refresh_token"]
    return OTHER, "", ""


def _scopes(values: Iterable[str]) -> tuple[Access, ...] | None:
    """The scopes asked for; None when one is malformed (the node then vouches for nothing)."""
    try:
        return tuple(a for value in values for a in parse_scopes(value))
    except ValueError:
        return None
