"""Node-to-node authentication: an HMAC over the request, never the bare secret on the wire.

A peer request carries::

    X-Mirror-Zone-Time: <unix seconds>
    X-Mirror-Zone-Signature: <hex HMAC-SHA256(secret, canonical)>

where `canonical` is the method, the path with its query, the time, and the
forwarded credential headers (so they cannot be swapped), one per line. The
receiver recomputes it and compares in constant time; a timestamp more than
`mirror.zone.max_skew` away is refused, which bounds replays of a captured
request to that window (use TLS between nodes where the network is not trusted).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

TIME = "X-Mirror-Zone-Time"
SIGNATURE = "X-Mirror-Zone-Signature"
#: Whose credential the owner uses upstream for this request: client, node or anonymous.
CREDENTIAL = "X-Mirror-Zone-Credential"
#: The client's own Authorization header, when CREDENTIAL is "client".
CLIENT_AUTHORIZATION = "X-Mirror-Zone-Client-Authorization"
SIGNED_HEADERS = (CREDENTIAL, CLIENT_AUTHORIZATION)


def canonical(method: str, path_qs: str, timestamp: str, headers: Mapping[str, str]) -> bytes:
    lines = [method.upper(), path_qs, timestamp, *(headers.get(name, "") for name in SIGNED_HEADERS)]
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def sign(secret: str, method: str, path_qs: str, headers: Mapping[str, str],
         now: float | None = None) -> dict[str, str]:
    """The two headers to add to a peer request (`headers` holds its credential headers)."""
    timestamp = str(int(time.time() if now is None else now))
    mac = hmac.new(secret.encode(), canonical(method, path_qs, timestamp, headers), hashlib.sha256)
    return {TIME: timestamp, SIGNATURE: mac.hexdigest()}


def verify(secret: str, method: str, path_qs: str, headers: Mapping[str, str], max_skew: float,
           now: float | None = None) -> str | None:
    """None when the request is signed with `secret` within `max_skew`; else why not."""
    timestamp, signature = headers.get(TIME, ""), headers.get(SIGNATURE, "")
    if not timestamp or not signature:
        return "unsigned peer request"
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return "malformed peer request time"
    if abs((time.time() if now is None else now) - int(timestamp)) > max_skew:
        return "peer request time outside the allowed clock skew"
    expected = hmac.new(secret.encode(), canonical(method, path_qs, timestamp, headers), hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest(), signature.strip().lower()):
        return "bad peer request signature"
    return None
