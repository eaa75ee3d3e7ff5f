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
a tag. An image reference as docker writes it (`[host/]repo[:tag][@digest]`)
is read by :func:`parse_image`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from mirror import errors
from mirror.errors import NameInvalid, TagInvalid
from mirror.registry.digest import Digest, is_digest

MAX_NAME_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: The names of Docker Hub, where a one-component repository means `library/<name>`.
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})


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


class PrefixedRegistry(Protocol):
    """A registry whose repositories the node keys under a prefix (mirror.upstream.registries)."""

    prefix: str | None

    def key(self, repo: str) -> str: ...


class RegistryNames(Protocol):
    """The registries a node serves, looked up by host name (mirror.upstream.registries)."""

    def named(self, name: str) -> PrefixedRegistry | None: ...


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed image reference: repository plus tag or digest."""

    text: str
    repo: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        return str(self.digest) if self.digest is not None else str(self.tag)


def parse_image(text: str, namespaces: frozenset[str] = frozenset(),
                registries: RegistryNames | None = None) -> ImageRef:
    """`[host/]repo[:tag][@digest]` as docker writes it; the tag defaults to `latest`.

    A leading registry host is accepted only when it names this node's
    upstream (`namespaces`) or another of its `registries` (`ghcr.io/org/app`:
    the repository is then keyed `<prefix>/org/app`, see
    :mod:`mirror.upstream.registries`); a one-component name on Docker Hub
    gets its `library/` prefix, as docker adds it.

    Raises:
        NameInvalid, TagInvalid, DigestInvalid: the reference is malformed.
    """
    rest = text.strip()
    digest = None
    if "@" in rest:
        rest, _, raw_digest = rest.partition("@")
        if not is_digest(raw_digest):
            raise errors.DigestInvalid(f"invalid digest in {text!r}")
        digest = Digest.parse(raw_digest)
    tag = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        Tag.parse(tag)
    first, sep, remainder = rest.partition("/")
    other = registries.named(first) if registries is not None and sep else None
    if other is not None and other.prefix is not None and first.lower() not in namespaces:
        RepositoryName.parse(remainder)
        rest, namespaces = other.key(remainder), frozenset()
    elif sep and ("." in first or ":" in first or first == "localhost"):
        if first.lower() not in namespaces:
            raise errors.NameInvalid(f"{text!r} names registry {first!r}, not this mirror's upstream")
        rest = remainder
    if "/" not in rest and namespaces & DOCKER_HUB_HOSTS:
        rest = f"library/{rest}"
    repo = RepositoryName.parse(rest).value
    if digest is None and tag is None:
        tag = "latest"
    return ImageRef(text, repo, tag, digest)
