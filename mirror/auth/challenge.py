"""distribution's bearer challenge and header parsing: pure functions, no crypto.

Kept apart from :mod:`mirror.auth.token` so building a challenge (every
401, forward mode, the access controllers) never imports the JWT and X.509
libraries a node without token auth does not need.
"""

from __future__ import annotations

from collections.abc import Sequence

from .access import Access, scope_param


def bearer_token(authorization: str | None) -> str | None:
    """Extract the token from ``Authorization: Bearer <token>``, else None.

    Like distribution 2.8: exactly two space-separated parts, scheme
    compared case-insensitively.
    """
    if not authorization:
        return None
    parts = authorization.split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


def _go_quote(value: str) -> str:
    """Go's ``%q`` for the strings we emit: escape ``\\``, ``"`` and control chars."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(ch)])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def challenge(
    realm: str, service: str, required: Sequence[Access] = (), error: str | None = None
) -> str:
    """distribution's ``WWW-Authenticate`` value for a token-auth 401.

    ``Bearer realm="..",service=".."`` then ``,scope="a b"`` when scopes were
    required, then ``,error=".."`` when set.
    """
    value = f"Bearer realm={_go_quote(realm)},service={_go_quote(service)}"
    scopes = scope_param(required)
    if scopes:
        value += f",scope={_go_quote(scopes)}"
    if error:
        value += f",error={_go_quote(error)}"
    return value
