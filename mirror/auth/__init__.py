"""Registry authentication: distribution-compatible token and htpasswd auth."""

from .access import Access, ResourceActions, Unauthorized, format_scope, grants, parse_scope
from .keys import KeyLoadError, TrustedKeys, load_trusted_keys
from .token import Authorizer, Claims, InvalidToken, TokenVerifier, bearer_token, challenge

__all__ = [
    "Access",
    "Authorizer",
    "Claims",
    "InvalidToken",
    "KeyLoadError",
    "ResourceActions",
    "TokenVerifier",
    "TrustedKeys",
    "Unauthorized",
    "bearer_token",
    "challenge",
    "format_scope",
    "grants",
    "load_trusted_keys",
    "parse_scope",
]
