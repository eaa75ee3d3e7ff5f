"""Digest parsing: only well-formed sha256/sha512, lowercase hex, nothing else."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import DigestInvalid, RegistryError
from mirror.registry.digest import SUPPORTED_ALGORITHMS, Digest, is_digest

H64 = "0123456789abcdef" * 4
H128 = H64 * 2

VALID = [
    ("sha256", f"sha256:{H64}", "sha256", H64),
    ("sha256-empty-blob", "sha256:" + hashlib.sha256(b"").hexdigest(), "sha256", hashlib.sha256(b"").hexdigest()),
    ("sha512", f"sha512:{H128}", "sha512", H128),
]

INVALID = [
    ("sha256-63-hex", f"sha256:{H64[:63]}"),
    ("sha256-65-hex", f"sha256:{H64}0"),
    ("sha256-uppercase-hex", f"sha256:{H64.upper()}"),
    ("sha256-one-uppercase", f"sha256:{H64[:63]}F"),
    ("sha256-non-hex", f"sha256:{'g' * 64}"),
    ("sha256-128-hex", f"sha256:{H128}"),
    ("sha512-64-hex", f"sha512:{H64}"),
    ("sha512-127-hex", f"sha512:{H128[:127]}"),
    ("sha512-129-hex", f"sha512:{H128}a"),
    ("md5", f"md5:{H64[:32]}"),
    ("sha1", f"sha1:{H64[:40]}"),
    ("sha384-empty", "sha384:"),
    ("sha384-96-hex", f"sha384:{(H64 * 2)[:96]}"),
    ("uppercase-algorithm", f"SHA256:{H64}"),
    ("traversal", "sha256:../../etc"),
    ("traversal-padded", "sha256:../../" + "a" * 58),
    ("slash-in-hex", f"sha256:{H64[:32]}/{H64[33:]}"),
    ("empty", ""),
    ("colon-only", ":"),
    ("algorithm-only", "sha256:"),
    ("no-algorithm", H64),
    ("leading-colon", f":{H64}"),
    ("double-colon", f"sha256::{H64}"),
    ("trailing-newline", f"sha256:{H64}\n"),
    ("leading-space", f" sha256:{H64}"),
    ("trailing-space", f"sha256:{H64} "),
    ("plus-suffix", f"sha256+b64:{H64}"),
    ("fullwidth-hex", "sha256:" + "\uff41" * 64),
    ("arabic-digits", "sha256:" + "\u0661" * 64),
    ("nul", f"sha256:{H64[:63]}\x00"),
]


@pytest.mark.parametrize(("value", "algorithm", "hexpart"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_digests(value: str, algorithm: str, hexpart: str) -> None:
    digest = Digest.parse(value)
    assert digest.algorithm == algorithm
    assert digest.hex == hexpart
    assert str(digest) == value
    assert Digest.parse(str(digest)) == digest


@pytest.mark.parametrize("value", [v[1] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_digests(value: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        Digest.parse(value)
    assert isinstance(info.value, RegistryError)
    assert info.value.code == "DIGEST_INVALID"
    assert info.value.status == 400
    assert info.value.body()["errors"][0]["code"] == "DIGEST_INVALID"


def test_invalid_digest_detail_is_bounded() -> None:
    with pytest.raises(DigestInvalid) as info:
        Digest.parse("sha256:" + "x" * 100_000)
    assert len(info.value.detail["digest"]) <= 200


OF = [
    ("empty-sha256", b"", "sha256"),
    ("hello-sha256", b"hello", "sha256"),
    ("hello-sha512", b"hello", "sha512"),
    ("binary", bytes(range(256)) * 4, "sha256"),
]


@pytest.mark.parametrize(("data", "algorithm"), [o[1:] for o in OF], ids=[o[0] for o in OF])
def test_digest_of(data: bytes, algorithm: str) -> None:
    digest = Digest.of(data, algorithm)
    expected = hashlib.new(algorithm, data).hexdigest()
    assert str(digest) == f"{algorithm}:{expected}"
    assert Digest.parse(str(digest)) == digest
    hasher = digest.hasher()
    hasher.update(data)
    assert hasher.hexdigest() == digest.hex


def test_digest_of_default_is_sha256() -> None:
    assert Digest.of(b"x").algorithm == "sha256"


def test_supported_algorithms() -> None:
    assert set(SUPPORTED_ALGORITHMS) == {"sha256", "sha512"}


def test_digests_are_hashable_values() -> None:
    a = Digest.parse(f"sha256:{H64}")
    b = Digest.parse(f"sha256:{H64}")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


@pytest.mark.parametrize(("value", "expected"), [("latest", False), (f"sha256:{H64}", True), ("a:b", True)],
                         ids=["tag", "digest", "any-colon"])
def test_is_digest(value: str, expected: bool) -> None:
    assert is_digest(value) is expected


# --------------------------------------------------------------------------- properties


@given(st.one_of(
    st.text(max_size=200),
    st.builds(lambda alg, rest: f"{alg}:{rest}", st.sampled_from(["sha256", "sha512", "sha384", "SHA256"]),
              st.text(alphabet="0123456789abcdefABCDEF./", max_size=140)),
))
def test_parse_only_raises_digest_invalid(value: str) -> None:
    try:
        digest = Digest.parse(value)
    except RegistryError as exc:
        assert isinstance(exc, DigestInvalid)
        return
    assert str(digest) == value
    assert digest.algorithm in SUPPORTED_ALGORITHMS
    assert len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert set(digest.hex) <= set("0123456789abcdef")


@given(st.binary(max_size=512), st.sampled_from(["sha256", "sha512"]))
def test_round_trip(data: bytes, algorithm: str) -> None:
    digest = Digest.of(data, algorithm)
    assert Digest.parse(str(digest)) == digest
    assert str(Digest.parse(str(digest))) == str(digest)


@given(st.one_of(st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
                st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}")))
def test_every_grammatical_digest_parses(value: str) -> None:
    assert str(Digest.parse(value)) == value
