"""Accept-header parsing and media-type negotiation helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    OCI_TYPES,
    SCHEMA1_TYPES,
    UPSTREAM_ACCEPT,
    accepts,
    parse_accept,
)

PARSE = [
    # (id, headers, expected set)
    ("none", [], set()),
    ("empty-header", [""], set()),
    ("blank-parts", [" , ,, "], set()),
    ("single", [DOCKER_MANIFEST], {DOCKER_MANIFEST}),
    ("comma-list", [f"{DOCKER_MANIFEST}, {OCI_INDEX}"], {DOCKER_MANIFEST, OCI_INDEX}),
    ("comma-list-no-spaces", [f"{DOCKER_MANIFEST},{OCI_INDEX}"], {DOCKER_MANIFEST, OCI_INDEX}),
    ("multiple-headers", [DOCKER_MANIFEST, OCI_MANIFEST, f"{OCI_INDEX},{DOCKER_MANIFEST_LIST}"],
     {DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST}),
    ("duplicates", [DOCKER_MANIFEST, DOCKER_MANIFEST], {DOCKER_MANIFEST}),
    ("q-param", [f"{OCI_MANIFEST};q=0.5"], {OCI_MANIFEST}),
    ("q-param-spaced", [f"{OCI_MANIFEST} ; q=0.9 , {DOCKER_MANIFEST};q=1"], {OCI_MANIFEST, DOCKER_MANIFEST}),
    # distribution only checks membership, so even q=0 keeps the type.
    ("q-zero-kept", [f"{OCI_MANIFEST};q=0"], {OCI_MANIFEST}),
    ("other-params", [f"{OCI_MANIFEST}; charset=utf-8; q=0.1"], {OCI_MANIFEST}),
    ("uppercase", [DOCKER_MANIFEST.upper()], {DOCKER_MANIFEST}),
    ("mixed-case", ["Application/Vnd.OCI.Image.Index.V1+JSON"], {OCI_INDEX}),
    ("wildcard", ["*/*"], {"*/*"}),
    ("wildcard-q", ["*/*;q=0.1"], {"*/*"}),
    ("application-wildcard", ["application/*"], {"*/*"}),
    ("application-wildcard-upper", ["APPLICATION/*"], {"*/*"}),
    ("wildcard-and-type", [f"{DOCKER_MANIFEST}, */*;q=0.8"], {DOCKER_MANIFEST, "*/*"}),
    ("tabs", [f"\t{OCI_MANIFEST}\t,\t{OCI_INDEX}"], {OCI_MANIFEST, OCI_INDEX}),
    ("text-wildcard-is-not-universal", ["text/*"], {"text/*"}),
    ("json", ["application/json"], {"application/json"}),
    ("upstream-accept", [UPSTREAM_ACCEPT], set(MANIFEST_TYPES)),
]


@pytest.mark.parametrize(("headers", "expected"), [p[1:] for p in PARSE], ids=[p[0] for p in PARSE])
def test_parse_accept(headers: list[str], expected: set[str]) -> None:
    result = parse_accept(headers)
    assert isinstance(result, frozenset)
    assert result == expected


ACCEPTS = [
    # (id, headers, media type, accepted?)
    ("exact", [DOCKER_MANIFEST], DOCKER_MANIFEST, True),
    ("other", [DOCKER_MANIFEST], OCI_MANIFEST, False),
    ("nothing", [], OCI_INDEX, False),
    ("wildcard", ["*/*"], OCI_INDEX, True),
    ("application-wildcard", ["application/*"], OCI_MANIFEST, True),
    ("text-wildcard", ["text/*"], OCI_MANIFEST, False),
    ("q-param", [f"{OCI_INDEX};q=0.2"], OCI_INDEX, True),
    ("case-insensitive", [OCI_INDEX.upper()], OCI_INDEX, True),
    ("second-header", ["application/json", OCI_MANIFEST], OCI_MANIFEST, True),
    ("list-not-manifest", [DOCKER_MANIFEST_LIST], DOCKER_MANIFEST, False),
]


@pytest.mark.parametrize(("headers", "media_type", "expected"), [a[1:] for a in ACCEPTS],
                         ids=[a[0] for a in ACCEPTS])
def test_accepts(headers: list[str], media_type: str, expected: bool) -> None:
    assert accepts(parse_accept(headers), media_type) is expected


def test_type_groups() -> None:
    assert set(MANIFEST_TYPES) == {DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX}
    assert INDEX_TYPES == {DOCKER_MANIFEST_LIST, OCI_INDEX}
    assert OCI_TYPES == {OCI_MANIFEST, OCI_INDEX}
    assert {DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED} <= SCHEMA1_TYPES
    assert not SCHEMA1_TYPES & set(MANIFEST_TYPES)
    for media_type in MANIFEST_TYPES:
        assert media_type == media_type.lower()
        assert media_type in UPSTREAM_ACCEPT


@given(st.lists(st.text(max_size=60), max_size=4))
def test_parse_accept_is_total_and_normalised(headers: list[str]) -> None:
    result = parse_accept(headers)
    for media_type in result:
        assert media_type
        assert media_type == media_type.strip()
        assert media_type == media_type.lower()
        assert "," not in media_type
        assert ";" not in media_type
