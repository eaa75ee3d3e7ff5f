"""Protocol errors, modelled once.

Every failure a client can see is a :class:`RegistryError` carrying a spec
error code. The table below gives each code its HTTP status and message (as
distribution's errcode/register.go does); handlers and services raise, and
one middleware (:mod:`mirror.api.middleware`) renders the envelope::

    {"errors": [{"code": "...", "message": "...", "detail": ...}]}

Hierarchy::

    RegistryError
     ├── NameInvalid, NameUnknown, TagInvalid, DigestInvalid, ManifestUnknown,
     ├── ManifestInvalid, BlobUnknown, RangeInvalid, PaginationNumberInvalid,
     ├── Unsupported, Unauthorized, Denied, TooManyRequests, Unavailable,
     └── Unknown (a bug or a local failure: the only 500)

    ManifestInvalid
     └── UpstreamManifestInvalid (502: upstream's manifest does not match its
         digest; the client did nothing wrong)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

# code -> (HTTP status, message): the one table of the protocol's errors.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "NAME_INVALID": (400, "invalid repository name"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "TAG_INVALID": (400, "manifest tag did not match URI"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown"),
    "MANIFEST_INVALID": (400, "manifest invalid"),
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "RANGE_INVALID": (416, "invalid content range"),
    "PAGINATION_NUMBER_INVALID": (400, "invalid number of results requested"),
    "UNSUPPORTED": (405, "The operation is unsupported."),
    "UNAUTHORIZED": (401, "authentication required"),
    "DENIED": (403, "requested access to the resource is denied"),
    "TOOMANYREQUESTS": (429, "too many requests"),
    "UNAVAILABLE": (503, "service unavailable"),
    "UNKNOWN": (500, "unknown error"),
}


class RegistryError(Exception):
    """An error answered to the client with a spec code.

    Args:
        message: overrides the table's message.
        detail: structured detail for the client (never secrets or paths).
        headers: extra response headers (`Retry-After`, `WWW-Authenticate`).
        status: overrides the table's status (e.g. 502 for a broken upstream).
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        default_status, default_message = ERROR_CODES[self.code]
        self.message = message or default_message
        self.detail = detail
        self.headers = dict(headers or {})
        self.status = status or default_status
        super().__init__(f"{self.code}: {self.message}")

    def body(self) -> dict[str, Any]:
        """The spec's JSON error envelope for this error."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}


def _error_class(name: str, code: str) -> type[RegistryError]:
    return type(name, (RegistryError,), {"code": code, "__doc__": ERROR_CODES[code][1]})


NameInvalid = _error_class("NameInvalid", "NAME_INVALID")
NameUnknown = _error_class("NameUnknown", "NAME_UNKNOWN")
TagInvalid = _error_class("TagInvalid", "TAG_INVALID")
DigestInvalid = _error_class("DigestInvalid", "DIGEST_INVALID")
ManifestUnknown = _error_class("ManifestUnknown", "MANIFEST_UNKNOWN")
ManifestInvalid = _error_class("ManifestInvalid", "MANIFEST_INVALID")
BlobUnknown = _error_class("BlobUnknown", "BLOB_UNKNOWN")
RangeInvalid = _error_class("RangeInvalid", "RANGE_INVALID")
PaginationNumberInvalid = _error_class("PaginationNumberInvalid", "PAGINATION_NUMBER_INVALID")
Unsupported = _error_class("Unsupported", "UNSUPPORTED")
Unauthorized = _error_class("Unauthorized", "UNAUTHORIZED")
Denied = _error_class("Denied", "DENIED")
TooManyRequests = _error_class("TooManyRequests", "TOOMANYREQUESTS")
Unavailable = _error_class("Unavailable", "UNAVAILABLE")
Unknown = _error_class("Unknown", "UNKNOWN")



class UpstreamManifestInvalid(ManifestInvalid):  # type: ignore[misc,valid-type]
    """Upstream sent a manifest that does not match the digest it named: 502.

    A 400 would blame the client, who asked for nothing wrong; the code stays
    MANIFEST_INVALID, the status says the gateway's upstream failed.
    """

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("status", 502)
        super().__init__(message, **kwargs)


_BY_CODE = {cls.code: cls for cls in RegistryError.__subclasses__()}  # direct subclasses: one per code


def error_for_code(code: str) -> type[RegistryError]:
    """The error class for a spec code (UNKNOWN for codes we do not model)."""
    return _BY_CODE.get(code, Unknown)
