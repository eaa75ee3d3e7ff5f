"""Content digests: the identity of every blob and manifest.

Grammar accepted (a strict subset of the OCI descriptor grammar, as distribution
registers only these algorithms)::

    digest    := algorithm ":" encoded
    sha256    := "sha256:" [a-f0-9]{64}
    sha512    := "sha512:" [a-f0-9]{128}

Anything else (uppercase hex, other algorithms, wrong lengths, traversal) is
rejected here, at the edge, so no later code ever builds a path from an
unvalidated string.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_PATTERN = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated `algorithm:hex` digest; `str()` round-trips."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Parse a digest string.

        Raises:
            DigestInvalid: the string is not a supported, well-formed digest.
        """
        match = _PATTERN.fullmatch(value) if value.isascii() else None
        if match is None:
            raise DigestInvalid(detail={"digest": value[:200]})
        if match.group(1):
            return cls(match.group(1), match.group(2))
        return cls(match.group(3), match.group(4))

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """Digest of in-memory bytes (manifests)."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(value: str) -> bool:
    """True when `value` looks like a digest reference (has an algorithm prefix)."""
    return ":" in value


SUPPORTED_ALGORITHMS = tuple(_HEX_LENGTH)
