"""The v2 route table, parsed from the right so names like `x/blobs` route correctly.

distribution's router matches `/v2/<name>/manifests/<reference>` with a name
pattern that cannot contain the route keywords as final components; here the
name is everything before the *last* keyword, and is then validated by the
name grammar, so `/v2/x/blobs/manifests/latest` is the manifest `latest` of
the repository `x/blobs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from mirror import errors

_ROUTES = (
    ("base", re.compile(r"")),
    ("catalog", re.compile(r"_catalog")),
    ("tags", re.compile(r"(?P<name>.+)/tags/list")),
    ("manifest", re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)")),
    ("upload", re.compile(r"(?P<name>.+)/blobs/uploads/(?P<upload>[^/]*)")),
    ("blob", re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)")),
)

_ENCODED_SLASH = re.compile(r"%(2[fF])")

#: Methods each route serves on the read API; anything else is UNSUPPORTED.
READ_METHODS = {"base": {"GET", "HEAD"}, "catalog": {"GET", "HEAD"}, "tags": {"GET", "HEAD"},
                "manifest": {"GET", "HEAD"}, "blob": {"GET", "HEAD"}, "upload": set()}


@dataclass(frozen=True, slots=True)
class Route:
    """A matched route: its name and the raw (unvalidated) path parameters."""

    name: str
    params: dict[str, str]


def match(path: str) -> Route:
    """Match a raw (still percent-encoded) request path that starts with `/v2/`.

    Matching the raw path keeps an encoded `%2F` inside one parameter; each
    parameter is decoded only after the route is known, and validated later.
    In a name, `%2F` is never decoded into a separator (it stays the text
    `%2F`, which the name grammar refuses: NAME_INVALID), so one repository
    cannot be reached under a spelling the access checks did not see.

    Raises:
        RegistryError: no v2 route has this shape (404).
    """
    tail = path[len("/v2/"):] if path.startswith("/v2/") else None
    if path == "/v2":
        tail = ""
    if tail is not None:
        for name, pattern in _ROUTES:
            found = pattern.fullmatch(tail)
            if found is not None:
                return Route(name, {k: _decode(k, v) for k, v in found.groupdict().items()})
    raise errors.NameUnknown("no such registry route", status=404)


def _decode(param: str, raw: str) -> str:
    if param == "name":
        raw = _ENCODED_SLASH.sub(r"%25\1", raw)  # decodes to the text "%2F", not to "/"
    return unquote(raw, errors="replace")
