"""Single byte ranges: strict parsing, 416 with `bytes */size` for everything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.api.ranges import ByteRange, parse_range
from mirror.errors import RangeInvalid, RegistryError

SATISFIABLE = [
    # (id, header, size, start, end)
    ("first-ten", "bytes=0-9", 100, 0, 9),
    ("whole-exact", "bytes=0-9", 10, 0, 9),
    ("single-byte", "bytes=0-0", 10, 0, 0),
    ("last-byte", "bytes=9-9", 10, 9, 9),
    ("open-ended", "bytes=5-", 10, 5, 9),
    ("open-ended-from-zero", "bytes=0-", 10, 0, 9),
    ("suffix", "bytes=-5", 10, 5, 9),
    ("suffix-whole", "bytes=-10", 10, 0, 9),
    ("suffix-larger-than-size", "bytes=-500", 10, 0, 9),
    ("end-clamped", "bytes=5-500", 10, 5, 9),
    ("end-clamped-huge", "bytes=0-9999999999999999999", 10, 0, 9),
    ("one-byte-object", "bytes=0-", 1, 0, 0),
    ("one-byte-object-suffix", "bytes=-1", 1, 0, 0),
    ("surrounding-whitespace", " bytes=1-2 ", 10, 1, 2),
]

UNSATISFIABLE = [
    # (id, header, size)
    ("reversed", "bytes=9-0", 10),
    ("multi-range", "bytes=0-1,3-4", 10),
    ("multi-range-spaced", "bytes=0-1, 3-4", 10),
    ("not-a-number", "bytes=abc", 10),
    ("not-a-number-range", "bytes=a-b", 10),
    ("no-unit", "0-1", 10),
    ("uppercase-unit", "Bytes=0-1", 10),
    ("start-past-end", "bytes=100-", 10),
    ("start-at-size", "bytes=10-", 10),
    ("start-at-size-closed", "bytes=10-20", 10),
    ("suffix-zero", "bytes=-0", 10),
    ("empty-range", "bytes=-", 10),
    ("empty-spec", "bytes=", 10),
    ("empty-header", "", 10),
    ("huge-start", "bytes=" + "1" + "0" * 30 + "-", 10),
    ("huge-end", "bytes=0-" + "1" + "0" * 30, 10),
    ("huge-suffix", "bytes=-" + "1" + "0" * 30, 10),
    ("unicode-digits", "bytes=\u0661-\u0662", 10),
    ("fullwidth-digits", "bytes=\uff10-\uff11", 10),
    ("negative-start", "bytes=-1-2", 10),
    ("plus-sign", "bytes=+1-2", 10),
    ("double-dash", "bytes=1--2", 10),
    ("space-inside", "bytes=1 - 2", 10),
    ("trailing-comma", "bytes=0-1,", 10),
    ("zero-size-open", "bytes=0-", 0),
    ("zero-size-closed", "bytes=0-0", 0),
    ("zero-size-suffix", "bytes=-5", 0),
]


@pytest.mark.parametrize(("header", "size", "start", "end"), [s[1:] for s in SATISFIABLE],
                         ids=[s[0] for s in SATISFIABLE])
def test_satisfiable(header: str, size: int, start: int, end: int) -> None:
    result = parse_range(header, size)
    assert result == ByteRange(start, end)
    assert result.length == end - start + 1
    assert result.content_range(size) == f"bytes {start}-{end}/{size}"


@pytest.mark.parametrize(("header", "size"), [u[1:] for u in UNSATISFIABLE], ids=[u[0] for u in UNSATISFIABLE])
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range(header, size)
    assert info.value.code == "RANGE_INVALID"
    assert info.value.status == 416
    assert info.value.headers == {"Content-Range": f"bytes */{size}"}


@pytest.mark.parametrize("header", ["items=0-1", "items=abc", "pages=-1", " x=", "Bytes2=0-1"],
                         ids=["items", "items-malformed", "pages", "spaces", "bytes-like"])
def test_other_units_are_ignored(header: str) -> None:
    """RFC 9110 §14.2: a range unit the server does not know is ignored (H-PROTO-03)."""
    assert parse_range(header, 10) is None


def test_no_header_serves_whole_object() -> None:
    assert parse_range(None, 10) is None
    assert parse_range(None, None) is None


@pytest.mark.parametrize("header", ["bytes=0-1", "bytes=-1", "bytes=abc"], ids=["closed", "suffix", "malformed"])
def test_unknown_size_is_invalid_without_content_range(header: str) -> None:
    with pytest.raises(RangeInvalid) as info:
        parse_range(header, None)
    assert "Content-Range" not in info.value.headers


# --------------------------------------------------------------------------- properties

_number = st.one_of(st.integers(min_value=0, max_value=10**6).map(str), st.just(""),
                    st.integers(min_value=0, max_value=10**40).map(str))
range_like = st.builds(lambda a, b: f"bytes={a}-{b}", _number, _number)


@given(st.one_of(st.text(max_size=60), range_like), st.integers(min_value=0, max_value=10**12))
def test_parse_range_invariants(header: str, size: int) -> None:
    try:
        result = parse_range(header, size)
    except RegistryError as exc:
        assert isinstance(exc, RangeInvalid)
        assert exc.headers["Content-Range"] == f"bytes */{size}"
        return
    if result is None:  # another unit: ignored (RFC 9110 §14.2)
        assert "=" in header and not header.strip().lower().startswith("bytes=")
        return
    assert 0 <= result.start <= result.end < size
    assert result.length >= 1


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6),
       st.integers(min_value=1, max_value=10**6))
def test_closed_ranges_match_rfc(first: int, last: int, size: int) -> None:
    header = f"bytes={first}-{last}"
    if last < first or first >= size:
        with pytest.raises(RangeInvalid):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == ByteRange(first, min(last, size - 1))
