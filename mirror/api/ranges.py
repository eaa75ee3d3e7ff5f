"""Single byte ranges, parsed strictly (RFC 9110 §14.1.2).

Only one `bytes=` range is served. Anything malformed, reversed, multi-range
or out of bounds is RANGE_INVALID (416), as Go's http.ServeContent answers
for distribution; the parser bounds every number so no request can make the
node allocate or compute on a giant value. A well-formed range in a unit
other than bytes (`items=0-9`) is ignored, as RFC 9110 §14.2 requires: the
whole object is served (distribution answers 416 there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import RangeInvalid

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
_UNIT = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)=")  # range-unit = token (RFC 9110 §14.1)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A resolved range: `start` inclusive, `end` inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int | None) -> ByteRange | None:
    """Resolve a `Range` header against an object of `size` bytes.

    Returns:
        None when there is no Range header, or one in another unit than
        bytes (serve the whole object).

    Raises:
        RangeInvalid: malformed, several ranges, or unsatisfiable; its
            headers carry `Content-Range: bytes */size`.
    """
    if header is None or _other_unit(header):
        return None
    headers = {"Content-Range": f"bytes */{size}"} if size is not None else {}
    match = _RANGE.fullmatch(header.strip()) if header.isascii() else None
    if match is None or not (match.group(1) or match.group(2)):
        raise RangeInvalid("malformed or multiple byte ranges", headers=headers)
    first, last = match.group(1), match.group(2)
    if size is None:
        raise RangeInvalid("range on an object of unknown size", headers=headers)
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeInvalid("unsatisfiable suffix range", headers=headers)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if end < start:
        raise RangeInvalid("reversed byte range", headers=headers)
    if start >= size:
        raise RangeInvalid("range starts past the end", headers=headers)
    return ByteRange(start, min(end, size - 1))


def _other_unit(header: str) -> bool:
    """True for a range in a unit this server does not know (RFC 9110 §14.2: ignored)."""
    unit = _UNIT.match(header.strip()) if header.isascii() else None
    return unit is not None and unit.group(1).lower() != "bytes"
