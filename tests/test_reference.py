"""Repository names, tags and manifest references against distribution's grammar."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import DigestInvalid, NameInvalid, RegistryError, TagInvalid
from mirror.registry.digest import Digest
from mirror.registry.reference import MAX_NAME_LENGTH, RepositoryName, Tag, parse_reference

# distribution/reference/regexp.go, written out independently of the module under test.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_GRAMMAR = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*", re.ASCII)
TAG_GRAMMAR = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)

SHA = "a" * 64

# --------------------------------------------------------------------------- names

VALID_NAMES = [
    ("library/alpine", "library/alpine"),
    ("single", "alpine"),
    ("three-levels", "a/b/c"),
    ("deep", "a/b/c/d/e/f/g"),
    ("digits", "0/1/2"),
    ("underscore", "a_b"),
    ("double-underscore", "a__b"),
    ("dash", "a-b"),
    ("dashes", "a--b"),
    ("many-dashes", "a-----b"),
    ("dot", "a.b"),
    ("mixed-separators", "my.org/some_repo/sub-name__x"),
    ("max-length-255", "a" * 255),
    ("max-length-255-with-slashes", "abc/" * 63 + "abc"),
]

INVALID_NAMES = [
    ("uppercase", "Library/alpine"),
    ("uppercase-inner", "library/Alpine"),
    ("dotdot", ".."),
    ("dotdot-component", "a/../b"),
    ("dot-component", "a/./b"),
    ("double-dot-separator", "a..b"),
    ("dot-underscore", "a._b"),
    ("triple-underscore", "a___b"),
    ("percent-encoded-dots", "%2e%2e"),
    ("percent-encoded-slash", "a%2fb"),
    ("nul", "a\x00b"),
    ("newline-trailing", "alpine\n"),
    ("space", "a b"),
    ("double-slash", "a//b"),
    ("leading-slash", "/a"),
    ("trailing-slash", "a/"),
    ("leading-dash", "-a"),
    ("trailing-dash", "a-"),
    ("leading-dot", ".a"),
    ("trailing-dot", "a."),
    ("leading-underscore", "_a"),
    ("trailing-underscore", "a_"),
    ("component-leading-dash", "a/-b"),
    ("non-ascii-umlaut", "ä"),
    ("non-ascii-inner", "libräry/alpine"),
    ("fullwidth-digit", "a\uff11"),
    ("length-256", "a" * 256),
    ("length-256-with-slashes", "a/" * 127 + "ab"),
    ("empty", ""),
    ("slash-only", "/"),
    ("backslash", "a\\b"),
    ("colon", "a:b"),
    ("at", "a@b"),
    ("tag-suffix", "library/alpine:latest"),
]


@pytest.mark.parametrize(("value"), [v for _, v in VALID_NAMES], ids=[i for i, _ in VALID_NAMES])
def test_valid_names(value: str) -> None:
    assert len(value) <= MAX_NAME_LENGTH
    name = RepositoryName.parse(value)
    assert name.value == value
    assert str(name) == value


@pytest.mark.parametrize(("value"), [v for _, v in INVALID_NAMES], ids=[i for i, _ in INVALID_NAMES])
def test_invalid_names(value: str) -> None:
    with pytest.raises(NameInvalid) as info:
        RepositoryName.parse(value)
    error = info.value
    assert isinstance(error, RegistryError)
    assert error.code == "NAME_INVALID"
    assert error.status == 400
    body = error.body()
    assert body["errors"][0]["code"] == "NAME_INVALID"


def test_name_length_boundary_is_exact() -> None:
    assert len("a/" * 126 + "abc") == 255
    RepositoryName.parse("a/" * 126 + "abc")
    with pytest.raises(NameInvalid):
        RepositoryName.parse("a/" * 126 + "abcd")


def test_name_error_detail_is_bounded() -> None:
    with pytest.raises(NameInvalid) as info:
        RepositoryName.parse("A" * 10_000)
    assert len(info.value.detail["name"]) <= 300


# --------------------------------------------------------------------------- tags

VALID_TAGS = [
    ("latest", "latest"),
    ("single-char", "a"),
    ("single-digit", "1"),
    ("single-underscore", "_"),
    ("uppercase", "Latest"),
    ("semver", "v1.2.3-rc.1"),
    ("underscore-start", "_x"),
    ("max-128", "a" * 128),
    ("max-128-mixed", "A" + "b.-_" * 31 + "xyz"),
]

INVALID_TAGS = [
    ("length-129", "a" * 129),
    ("newline", "latest\n"),
    ("leading-dash", "-x"),
    ("leading-dot", ".x"),
    ("non-ascii", "lätest"),
    ("non-ascii-digit", "\u0661"),
    ("empty", ""),
    ("slash", "a/b"),
    ("colon", "a:b"),
    ("space", "a b"),
    ("plus", "1.0+build"),
    ("nul", "a\x00"),
    ("at", "a@b"),
]


@pytest.mark.parametrize("value", [v for _, v in VALID_TAGS], ids=[i for i, _ in VALID_TAGS])
def test_valid_tags(value: str) -> None:
    tag = Tag.parse(value)
    assert tag.value == value
    assert str(tag) == value


@pytest.mark.parametrize("value", [v for _, v in INVALID_TAGS], ids=[i for i, _ in INVALID_TAGS])
def test_invalid_tags(value: str) -> None:
    with pytest.raises(TagInvalid) as info:
        Tag.parse(value)
    assert info.value.code == "TAG_INVALID"
    assert info.value.status == 400


# --------------------------------------------------------------------------- references

REFERENCES = [
    ("tag", "latest", Tag("latest")),
    ("digest-sha256", f"sha256:{SHA}", Digest("sha256", SHA)),
    ("digest-sha512", "sha512:" + "b" * 128, Digest("sha512", "b" * 128)),
]


@pytest.mark.parametrize(("value", "expected"), [r[1:] for r in REFERENCES], ids=[r[0] for r in REFERENCES])
def test_parse_reference(value: str, expected: object) -> None:
    assert parse_reference(value) == expected


BAD_REFERENCES = [
    # Anything with a colon is decided to be a digest, and must then be a valid one.
    ("bad-digest-short", "sha256:abc", DigestInvalid),
    ("unknown-algorithm", f"md5:{SHA[:32]}", DigestInvalid),
    ("tag-with-colon", "v1:2", DigestInvalid),
    ("traversal-digest", "sha256:../../etc/passwd", DigestInvalid),
    ("bad-tag", "-latest", TagInvalid),
    ("empty", "", TagInvalid),
]


@pytest.mark.parametrize(("value", "error"), [r[1:] for r in BAD_REFERENCES], ids=[r[0] for r in BAD_REFERENCES])
def test_parse_reference_rejects(value: str, error: type[RegistryError]) -> None:
    with pytest.raises(error):
        parse_reference(value)


# --------------------------------------------------------------------------- properties

_name_alphabet = st.sampled_from(list("abz09._-/") + ["__", "--", "A", "ä", "\x00", "\n", "%"])
name_like = st.lists(_name_alphabet, max_size=80).map("".join)


@given(st.one_of(st.text(max_size=300), name_like))
def test_name_parse_never_raises_other_errors(value: str) -> None:
    try:
        name = RepositoryName.parse(value)
    except RegistryError as exc:
        assert isinstance(exc, NameInvalid)
        return
    assert name.value == value
    assert value.isascii()
    assert len(value) <= MAX_NAME_LENGTH
    assert NAME_GRAMMAR.fullmatch(value)


@given(st.one_of(st.text(max_size=300), name_like))
def test_name_parse_agrees_with_grammar(value: str) -> None:
    expected = bool(value.isascii() and len(value) <= MAX_NAME_LENGTH and NAME_GRAMMAR.fullmatch(value))
    try:
        RepositoryName.parse(value)
        accepted = True
    except NameInvalid:
        accepted = False
    assert accepted == expected


@given(st.lists(st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-+)[a-z0-9]{1,5}){0,2}", fullmatch=True),
                min_size=1, max_size=6))
def test_generated_grammar_names_are_accepted(components: list[str]) -> None:
    value = "/".join(components)
    assert RepositoryName.parse(value).value == value


@given(st.one_of(st.text(max_size=200), st.from_regex(TAG_GRAMMAR, fullmatch=True)))
def test_tag_parse_never_raises_other_errors(value: str) -> None:
    expected = bool(value.isascii() and TAG_GRAMMAR.fullmatch(value))
    try:
        tag = Tag.parse(value)
    except RegistryError as exc:
        assert isinstance(exc, TagInvalid)
        assert not expected
        return
    assert expected
    assert tag.value == value
    assert len(value) <= 128


@given(st.text(max_size=200))
def test_parse_reference_only_raises_registry_errors(value: str) -> None:
    try:
        parse_reference(value)
    except RegistryError as exc:
        assert isinstance(exc, TagInvalid | DigestInvalid)
