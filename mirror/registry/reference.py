"""Repository names and manifest references, with distribution's grammar.

From distribution/reference (the doc comment of reference.go)::

    name                := path-component ['/' path-component]*
    path-component      := alpha-numeric [separator alpha-numeric]*
    alpha-numeric       := /[a-z0-9]+/
    separator           := /[_.]|__|[-]*/
    tag                 := /[\\w][\\w.-]{0,127}/
    digest              := see mirror.registry.digest

Names are ASCII only, matched in full, and at most 255 characters. A manifest
reference is decided once: with an algorithm prefix it is a digest, otherwise
a tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import NameInvalid, TagInvalid
from mirror.registry.digest import Digest, is_digest

MAX_NAME_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True, slots=True)
class RepositoryName:
    """A validated repository name such as `library/alpine`."""

    value: str

    @classmethod
    def parse(cls, value: str) -> RepositoryName:
        """Validate a repository name.

        Raises:
            NameInvalid: the name breaks the grammar or is too long.
        """
        if len(value) > MAX_NAME_LENGTH or not value.isascii() or not _NAME.fullmatch(value):
            raise NameInvalid(detail={"name": value[:300]})
        return cls(value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Tag:
    """A validated tag such as `latest`."""

    value: str

    @classmethod
    def parse(cls, value: str) -> Tag:
        """Validate a tag.

        Raises:
            TagInvalid: the tag breaks the grammar or is longer than 128.
        """
        if not value.isascii() or not _TAG.fullmatch(value):
            raise TagInvalid(detail={"tag": value[:200]})
        return cls(value)

    def __str__(self) -> str:
        return self.value


Reference = Tag | Digest


def parse_reference(value: str) -> Reference:
    """Decide once whether a manifest reference is a digest or a tag."""
    if is_digest(value):
        return Digest.parse(value)
    return Tag.parse(value)
