"""Hostile input: every request answered with the spec's error and status, never a 5xx,
never a path outside the store, never unbounded work.

Requests are sent verbatim (tests/support/rawhttp.py), so `..`, `//` and
percent-encodings reach the node as written. Cases already proven elsewhere
are referenced by ID in `CASES` (their test named) rather than repeated.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.registry.digest import Digest
from mirror.upstream.auth import Challenge
from tests.support import faults as F
from tests.support import images
from tests.support.authenv import node_config, token_block
from tests.support.faults import FaultRelay
from tests.support.rawhttp import error_code_of, raw_request
from tests.support.token_issuer import make_ca

SHA = "a" * 64
REALM = "https://auth.example.test/token"

CASES = {
    # names (the first ones are in tests/test_read_api.py::test_bad_names_tags_and_digests)
    "H-NAME-01": "uppercase name -> 400 NAME_INVALID (test_read_api: Team/app)",
    "H-NAME-02": "`..` component -> 400 NAME_INVALID (test_read_api)",
    "H-NAME-03": "`%2e%2e` component -> 400 NAME_INVALID (test_read_api)",
    "H-NAME-04": "`%00` in a name -> 400 NAME_INVALID (test_read_api)",
    "H-NAME-05": "`//` in a name -> 400 NAME_INVALID (test_read_api)",
    "H-NAME-06": "non-ASCII name -> 400 NAME_INVALID (test_read_api)",
    "H-NAME-07": "a 256-character name -> 400 NAME_INVALID (test_read_api)",
    "H-NAME-08": "`%2F..%2F` inside a name -> 400 NAME_INVALID (the encoded slash stays in the name)",
    "H-NAME-09": "`%2e%2e` components before a blob route -> 400 NAME_INVALID",
    "H-NAME-10": "invalid UTF-8 (`%FF`) in a name -> 400 NAME_INVALID",
    "H-NAME-11": "raw non-ASCII bytes in the request line -> 400, never a 5xx",
    "H-NAME-12": "literal `../../etc/passwd` after /blobs/ -> 404 (no route); nothing read outside the store",
    "H-NAME-13": "a request line longer than 16 KiB -> 400/414, never a 5xx",
    "H-ROUTE-01": "repositories named `x/blobs`, `x/manifests`, `x/tags` route correctly "
                  "(test_read_api::test_repositories_named_like_routes_route_correctly)",
    "H-ROUTE-02": "methods other than GET/HEAD -> 405 UNSUPPORTED (test_read_api::test_writes_are_unsupported); "
                  "an unknown method token -> 405/400, never a 5xx",
    # tags
    "H-TAG-01": "a 129-character tag -> 400 TAG_INVALID (test_read_api)",
    "H-TAG-02": "`latest%0A` -> 400 TAG_INVALID (test_read_api)",
    "H-TAG-03": "`latest%00`, `-latest`, `.latest`, `lat%2Fest` -> 400 TAG_INVALID; a 128-character tag is "
                "valid (404 MANIFEST_UNKNOWN from upstream)",
    # digests
    "H-DIG-01": "63 hex digits -> 400 DIGEST_INVALID (test_read_api)",
    "H-DIG-02": "uppercase hex -> 400 DIGEST_INVALID (test_read_api)",
    "H-DIG-03": "unknown algorithm (md5) -> 400 DIGEST_INVALID (test_read_api)",
    "H-DIG-04": "traversal `sha256:..%2F..%2Fetc` -> 400 DIGEST_INVALID (test_read_api)",
    "H-DIG-05": "65 hex digits, `SHA256:` algorithm, sha512 with 127 digits, non-hex, empty, trailing %00 "
                "-> 400 DIGEST_INVALID",
    # ranges
    "H-RANGE-01": "malformed, reversed, multi-range, out-of-range, 20-digit and Unicode-digit `Range` on a "
                  "stored blob -> 416 RANGE_INVALID with `Content-Range: bytes */size`; single valid ranges 206 "
                  "(parser: tests/test_ranges.py)",
    # pagination
    "H-PAGE-01": "`tags/list?n=` negative, non-numeric, `1_000`, Unicode digits, `1e3`, `0x10` -> 400 "
                 "PAGINATION_NUMBER_INVALID (test_read_api::test_tags_list_rejects_bad_page_numbers)",
    "H-PAGE-02": "`tags/list?n=10^12` over 20000 upstream tags -> 10000 tags and a `Link` with n=10000 "
                 "(clamped, no giant allocation); 20-digit n, `+5`, ` 5` -> 400",
    "H-PAGE-03": "`n=0` -> 200 with an empty list, never a 5xx",
    "H-PAGE-04": "`_catalog?n=10^9` -> 200 (test_read_api); `_catalog?n=-1` / `n=1e9` -> 400; a 10 KiB `last` "
                 "-> 200",
    # auth
    "H-AUTH-01": "with auth.token: a 15 KiB bearer token, a token of 8000 dots, three huge base64 parts, a "
                 "huge Basic credential, 50 Authorization headers, non-ASCII bytes -> 401 UNAUTHORIZED with "
                 "the challenge, answered fast, nothing sent upstream",
    # headers
    "H-HDR-01": "a header larger than 16 KiB (any header, Authorization included) -> 431 or 400, never a 5xx",
    "H-HDR-02": "hundreds of headers -> answered (or 400/431), never a 5xx",
    # parsers, property-based
    "H-PROP-01": "upstream's `WWW-Authenticate` (Challenge.parse): never raises, round-trips generated "
                 "challenges, linear time on 16 KiB of hostile text (was quadratic: 1.5 s)",
    "H-PROP-02": "name, tag, reference, digest, range and route parsers never raise anything but their spec "
                 "error and agree with the grammar (tests/test_reference.py, test_digest.py, test_ranges.py, "
                 "test_routes.py)",
    # protocol edges
    "H-PROTO-01": "requests aiohttp's HTTP parser refuses get the spec's JSON error, never plain text: raw "
                  "non-ASCII in a name / tag / digest -> 400 NAME_INVALID / TAG_INVALID / DIGEST_INVALID (as "
                  "their percent-encoding), in a query -> 400, oversized headers -> 400/431",
    "H-PROTO-02": "`%2F` in a repository name is not a separator: 400 NAME_INVALID on every route, even "
                  "when the decoded name exists upstream; nothing sent upstream",
    "H-PROTO-03": "a `Range` in an unknown unit (`items=0-1`) is ignored (RFC 9110 14.2): 200 with the whole "
                  "blob, stored or fetched now",
    "H-PROTO-04": "a manifest GET/HEAD by the digest of a blob the node holds -> 404 MANIFEST_UNKNOWN at "
                  "once (distribution's 500 was a 503 after retries); no upstream manifest request",
    "H-PROTO-05": "upstream's `Docker-Content-Digest` disagrees with the manifest it sent -> 502 "
                  "MANIFEST_INVALID (the client did nothing wrong), nothing stored",
}


def repo_name() -> str:
    return f"hostile/app-{uuid.uuid4().hex[:8]}"


def assert_not_5xx(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:200])


# --------------------------------------------------------------------------- names, tags, digests


BAD_REQUESTS = [
    ("H-NAME-08", "/v2/team%2F..%2Fetc/manifests/v1", 400, "NAME_INVALID"),
    ("H-NAME-08", "/v2/team%2f%2e%2e%2fetc/blobs/sha256:" + SHA, 400, "NAME_INVALID"),
    ("H-NAME-09", "/v2/%2e%2e/%2e%2e/etc/blobs/sha256:" + SHA, 400, "NAME_INVALID"),
    ("H-NAME-10", "/v2/team/app%FF/manifests/v1", 400, "NAME_INVALID"),
    ("H-NAME-12", "/v2/team/app/blobs/../../../../etc/passwd", 404, "NAME_UNKNOWN"),
    ("H-NAME-12", "/v2/../../../../etc/passwd", 404, "NAME_UNKNOWN"),
    ("H-TAG-03", "/v2/team/app/manifests/latest%00", 400, "TAG_INVALID"),
    ("H-TAG-03", "/v2/team/app/manifests/-latest", 400, "TAG_INVALID"),
    ("H-TAG-03", "/v2/team/app/manifests/.latest", 400, "TAG_INVALID"),
    ("H-TAG-03", "/v2/team/app/manifests/lat%2Fest", 400, "TAG_INVALID"),
    ("H-DIG-05", "/v2/team/app/blobs/sha256:" + "a" * 65, 400, "DIGEST_INVALID"),
    ("H-DIG-05", "/v2/team/app/blobs/SHA256:" + SHA, 400, "DIGEST_INVALID"),
    ("H-DIG-05", "/v2/team/app/blobs/sha512:" + "a" * 127, 400, "DIGEST_INVALID"),
    ("H-DIG-05", "/v2/team/app/blobs/sha256:" + "g" * 64, 400, "DIGEST_INVALID"),
    ("H-DIG-05", "/v2/team/app/blobs/sha256:", 400, "DIGEST_INVALID"),
    ("H-DIG-05", "/v2/team/app/blobs/sha256:" + SHA + "%00", 400, "DIGEST_INVALID"),
    ("H-DIG-05", "/v2/team/app/manifests/sha256:" + "a" * 65, 400, "DIGEST_INVALID"),
]


@pytest.mark.parametrize(("case_id", "target", "status", "code"), BAD_REQUESTS,
                         ids=[f"{c}-{i}" for i, (c, *_rest) in enumerate(BAD_REQUESTS)])
async def test_bad_requests_get_the_spec_error(mirror, relay, case_id, target, status, code) -> None:
    got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", target)
    assert (got, error_code_of(body)) == (status, code), body
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-NAME-11"])
async def test_raw_non_ascii_request_line(mirror, relay, case_id) -> None:
    for target in ("/v2/t\u00e9am/app/manifests/v1", "/v2/team/app/manifests/\u00e9t\u00e9",
                   "/v2/team/app/blobs/sha256:\u0661" + "a" * 63):
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", target)
        assert_not_5xx(got, body)
        assert got == 400, (target, got, body)
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-NAME-13"])
async def test_very_long_request_line(mirror, relay, case_id) -> None:
    got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET",
                                            "/v2/" + "a/" * 10_000 + "manifests/v1")
    assert got in (400, 414), (got, body[:200])
    got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", "/v2/" + "a" * 300 + "/manifests/v1")
    assert (got, error_code_of(body)) == (400, "NAME_INVALID")
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-ROUTE-02"])
async def test_unknown_method(mirror, relay, case_id) -> None:
    for method in ("FOO", "PROPFIND", "TRACE"):
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, method, "/v2/team/app/manifests/v1")
        assert got in (400, 405), (method, got, body[:200])
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-TAG-03"])
async def test_longest_valid_tag_is_looked_up(mirror, relay, case_id) -> None:
    got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET",
                                            f"/v2/{repo_name()}/manifests/{'t' * 128}")
    assert (got, error_code_of(body)) == (404, "MANIFEST_UNKNOWN")


# --------------------------------------------------------------------------- ranges


RANGES_416 = ["bytes=abc", "bytes=", "bytes=-", "0-1", "bytes=9-0", "bytes=0-1,3-4",
              "bytes=0-1, 3-4", "bytes=0-0,0-0,0-0,0-0,0-0,0-0,0-0,0-0", "bytes=999999-", "bytes=SIZE-",
              "bytes=-0", "bytes=1" + "0" * 19 + "-", "bytes=0-1" + "0" * 19, "bytes=--1", "bytes=+1-2",
              "bytes=1 - 2", "bytes=0x10-0x20", "bytes=0-1,"]


@pytest.mark.parametrize("case_id", ["H-RANGE-01"])
async def test_hostile_ranges(mirror, relay, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[300_000])
    digest, data = image.layers[0]
    path = f"/v2/{image.repo}/blobs/{digest}"
    async with mirror.client() as client:
        assert (await client.get(path)).content == data  # stored
    size = len(data)
    for spec in (r.replace("SIZE", str(size)) for r in RANGES_416):
        got, headers, body = await raw_request("127.0.0.1", mirror.port, "GET", path, {"Range": spec})
        assert (got, error_code_of(body)) == (416, "RANGE_INVALID"), (spec, got, body[:200])
        assert headers["content-range"] == f"bytes */{size}", spec
    for spec in ("bytes=\u0661-\u0662", "bytes=\uff10-\uff11"):  # non-ASCII header bytes
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", path, {"Range": spec})
        assert got in (400, 416), (spec, got, body[:200])
    for spec, expected in (("bytes=0-0", data[:1]), (f"bytes={size - 1}-", data[-1:]),
                           ("bytes=-1" + "0" * 18, data), (f"bytes=10-{10 ** 18}", data[10:])):
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", path, {"Range": spec})
        assert (got, body) == (206, expected), spec
    assert relay.count("GET", "/blobs/") == 1


# --------------------------------------------------------------------------- pagination


@pytest.fixture
def faults(upstream: Any) -> Any:
    with FaultRelay(upstream.url) as link:
        yield link


@pytest.mark.parametrize("case_id", ["H-PAGE-02"])
async def test_huge_page_is_clamped_with_a_link(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    repo = repo_name()
    tags = sorted(f"t{i:05d}" for i in range(20_000))
    faults.inject(F.status(200, body=json.dumps({"name": repo, "tags": tags}).encode(),
                           headers={"Content-Type": "application/json"}),
                  method="GET", path=f"/v2/{repo}/tags/list", times=None)
    started = time.monotonic()
    got, headers, body = await raw_request("127.0.0.1", node.port, "GET", f"/v2/{repo}/tags/list?n=1000000000000")
    assert time.monotonic() - started < 5
    assert got == 200
    page = json.loads(body)["tags"]
    assert page == tags[:10_000]
    assert headers["link"] == f'</v2/{repo}/tags/list?last={tags[9_999]}&n=10000>; rel="next"'
    for n in ("1" + "0" * 19, "+5", "%205", "5%00", "-0"):
        got, _headers, body = await raw_request("127.0.0.1", node.port, "GET", f"/v2/{repo}/tags/list?n={n}")
        assert (got, error_code_of(body)) == (400, "PAGINATION_NUMBER_INVALID"), (n, body[:200])


@pytest.mark.parametrize("case_id", ["H-PAGE-03"])
async def test_page_of_zero(mirror, relay, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with mirror.client() as client:
        await client.get(f"/v2/{image.repo}/manifests/v1", headers={"Accept": images.DOCKER_SCHEMA2})
        tags = await client.get(f"/v2/{image.repo}/tags/list?n=0")
        catalog = await client.get("/v2/_catalog?n=0")
    assert tags.status_code == 200 and tags.json()["tags"] == []
    assert catalog.status_code == 200 and catalog.json()["repositories"] == []


@pytest.mark.parametrize("case_id", ["H-PAGE-04"])
async def test_catalog_pagination_input(mirror, relay, case_id) -> None:
    for query, status in (("n=-1", 400), ("n=1e9", 400), ("n=1000000000", 200), ("last=" + "z" * 10_000, 200),
                          ("n=5&last=%FF%FE", 200)):
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", f"/v2/_catalog?{query}")
        assert got == status, (query, got, body[:200])
        if status == 400:
            assert error_code_of(body) == "PAGINATION_NUMBER_INVALID"


# --------------------------------------------------------------------------- auth and headers


@pytest.fixture
async def token_node(make_mirror: Any, relay: Any, tmp_path: Path) -> Any:
    (tmp_path / "pki").mkdir()
    ca = make_ca(tmp_path / "pki")
    config = node_config(tmp_path, relay.url, auth={"token": token_block(ca.cert_path, REALM)})
    return await make_mirror(relay.url, config=config)


HOSTILE_AUTHORIZATION = [
    "Bearer " + "A" * 15_000,
    "Bearer " + "." * 8_000,
    "Bearer " + ".".join(["QUFB" * 1_200] * 3),
    "Bearer " + "a." * 4_000 + "a",
    "Basic " + "QUFB" * 3_500,
    "Bearer",
    "Bearer  ",
    "bearer x.y.z",
    "Bearer e30.e30.",
    "Bearer eyJhbGciOiJub25lIn0.eyJhY2Nlc3MiOltdfQ.",
]


@pytest.mark.parametrize("case_id", ["H-AUTH-01"])
async def test_hostile_authorization_headers(token_node, relay, case_id) -> None:
    path = f"/v2/{repo_name()}/manifests/v1"
    for value in HOSTILE_AUTHORIZATION:
        started = time.monotonic()
        got, headers, body = await raw_request("127.0.0.1", token_node.port, "GET", path, {"Authorization": value})
        assert time.monotonic() - started < 5.0, value[:40]  # no wait on any timeout (10 s)
        assert (got, error_code_of(body)) == (401, "UNAUTHORIZED"), (value[:40], got, body[:200])
        assert headers["www-authenticate"].startswith(f'Bearer realm="{REALM}"')
    fifty = "\r\n".join(f"Authorization: Bearer {'x.' * 10}{i}" for i in range(50))  # repeated header lines
    got, _headers, body = await raw_request("127.0.0.1", token_node.port, "GET", path, {"X-Pad": "1\r\n" + fifty})
    assert got == 401, (got, body[:200])
    got, _headers, body = await raw_request("127.0.0.1", token_node.port, "GET", path,
                                            {"Authorization": "Bearer \udcff\udcfe.\udcfd.x"})
    assert got in (400, 401), (got, body[:200])
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-HDR-01"])
async def test_oversized_headers(token_node, mirror, relay, case_id) -> None:
    path = f"/v2/{repo_name()}/manifests/v1"
    for node in (token_node, mirror):
        for name in ("X-Big", "Authorization", "Accept", "Range", "Cookie"):
            got, _headers, body = await raw_request("127.0.0.1", node.port, "GET", path, {name: "a" * 20_000})
            assert got in (400, 431), (name, got, body[:200])
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-HDR-02"])
async def test_many_headers(mirror, relay, case_id) -> None:
    for count in (100, 1_000, 5_000):
        headers = {f"X-H{i}": "v" * 50 for i in range(count)}
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", "/v2/", headers)
        assert got in (200, 400, 431), (count, got, body[:200])
    got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", "/v2/")
    assert got == 200


# --------------------------------------------------------------------------- the challenge parser


_token = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,15}", fullmatch=True)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters='"\\'),
                 max_size=60)


@pytest.mark.parametrize("case_id", ["H-PROP-01"])
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_challenge_parse_never_raises(case_id, header: str) -> None:
    parsed = Challenge.parse(header)
    if parsed is not None:
        assert parsed.scheme == parsed.scheme.lower() and parsed.scheme
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.params.items())


@pytest.mark.parametrize("case_id", ["H-PROP-01"])
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["Bearer", "Basic", "bearer", "BEARER"]),
       st.dictionaries(_token.map(str.lower), _value, min_size=1, max_size=6),
       st.sampled_from([",", ", ", " ,", ",  "]))
def test_challenge_round_trips(case_id, scheme: str, params: dict[str, str], separator: str) -> None:
    header = f"{scheme} " + separator.join(f'{k}="{v}"' for k, v in params.items())
    parsed = Challenge.parse(header)
    assert parsed is not None
    assert parsed.scheme == scheme.lower()
    assert parsed.params == params


@pytest.mark.parametrize("case_id", ["H-PROP-01"])
@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["a", "a ", "a=", 'a="', '\\"', "a,", "=", " ", "aa=\"x\\", "_"]),
       st.sampled_from(["Bearer ", "Basic ", "", "x"]))
def test_challenge_parse_is_linear(case_id, unit: str, prefix: str) -> None:
    # 64 KB: linear parsing takes ~16 ms at worst, quadratic backtracking (2e9 steps)
    # seconds; the best of three runs keeps a loaded machine's stalls out of the bound
    header = prefix + unit * (65_536 // len(unit))
    assert min(_parse_seconds(header) for _ in range(3)) < 1.0, (unit, prefix)


def _parse_seconds(header: str) -> float:
    started = time.perf_counter()
    Challenge.parse(header)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- protocol edges


def json_error(body: bytes) -> tuple[str, Any]:
    """(code, detail) of a spec error body; fails on anything that is not one."""
    entry = json.loads(body)["errors"][0]
    return entry["code"], entry.get("detail")


@pytest.mark.parametrize("case_id", ["H-PROTO-01"])
async def test_parser_refusals_carry_the_spec_error(mirror, relay, case_id) -> None:
    for target, code in (("/v2/t\u00e9am/app/manifests/v1", "NAME_INVALID"),
                         ("/v2/\u00e9/tags/list", "NAME_INVALID"),
                         ("/v2/team/app/manifests/\u00e9t\u00e9", "TAG_INVALID"),
                         ("/v2/team/app/blobs/sha256:\u0661" + "a" * 63, "DIGEST_INVALID"),
                         ("/v2/_catalog?last=\u00e9", "UNKNOWN")):
        got, headers, body = await raw_request("127.0.0.1", mirror.port, "GET", target)
        assert (got, json_error(body)[0]) == (400, code), (target, got, body[:200])
        assert headers["content-type"].startswith("application/json")
        assert headers["docker-distribution-api-version"] == "registry/2.0"
    got, headers, body = await raw_request("127.0.0.1", mirror.port, "GET", "/v2/team/app/manifests/v1",
                                           {"X-Big": "a" * 20_000})
    assert got in (400, 431) and headers["content-type"].startswith("application/json"), (got, body[:200])
    json_error(body)
    got, _headers, _body = await raw_request("127.0.0.1", mirror.port, "GET", "/v2/")
    assert got == 200  # the node serves on
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-PROTO-02"])
async def test_encoded_slash_is_not_a_separator(mirror, relay, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[2000])
    encoded = image.repo.replace("/", "%2F")
    relay.reset()
    for path in (f"/v2/{encoded}/manifests/v1", f"/v2/{encoded}/manifests/{image.digest}",
                 f"/v2/{encoded}/blobs/{image.layers[0][0]}", f"/v2/{encoded.lower()}/tags/list"):
        got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", path)
        assert (got, json_error(body)[0]) == (400, "NAME_INVALID"), (path, got, body[:200])
    assert relay.count() == 0


@pytest.mark.parametrize("case_id", ["H-PROTO-03"])
async def test_range_in_an_unknown_unit_is_ignored(mirror, relay, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[300_000])
    digest, data = image.layers[0]
    path = f"/v2/{image.repo}/blobs/{digest}"
    for _ in ("fetched now", "stored"):
        got, headers, body = await raw_request("127.0.0.1", mirror.port, "GET", path, {"Range": "items=0-1"})
        assert (got, body) == (200, data)
        assert "content-range" not in headers
    assert relay.count("GET", "/blobs/") == 1


@pytest.mark.parametrize("case_id", ["H-PROTO-04"])
async def test_a_held_blob_is_no_manifest(mirror, relay, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[3000])
    async with mirror.client() as client:
        for digest in image.blobs:  # the layer and the config are held here now
            assert (await client.get(f"/v2/{image.repo}/blobs/{digest}")).status_code == 200
        relay.reset()
        for digest in image.blobs:
            got = await client.get(f"/v2/{image.repo}/manifests/{digest}")
            assert (got.status_code, got.json()["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")
            assert (await client.head(f"/v2/{image.repo}/manifests/{digest}")).status_code == 404
        assert relay.count("GET", "/manifests/") + relay.count("HEAD", "/manifests/") == 0
        # a manifest recorded without its type (adopted at start-up) is still a manifest
        node, digest = mirror.node, Digest.parse(image.digest)
        await asyncio.get_running_loop().run_in_executor(node.executor, node.store.put_bytes, digest,
                                                         image.manifest)
        await node.metadata.put_object(digest, len(image.manifest), None)
        got = await client.get(f"/v2/{image.repo}/manifests/{image.digest}",
                               headers={"Accept": images.DOCKER_SCHEMA2})
    assert (got.status_code, got.content) == (200, image.manifest)


@pytest.mark.parametrize("case_id", ["H-PROTO-05"])
async def test_upstream_digest_disagreeing_with_its_body_is_502(make_mirror, upstream, upstream_client,
                                                                case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[1000])
    with FaultRelay(upstream.url) as link:
        node = await make_mirror(link.url)
        link.inject(F.rewrite(lambda path: path, headers={"Docker-Content-Digest": "sha256:" + SHA}),
                    method="GET", path="/manifests/v1", times=None)
        async with node.client(headers={"Accept": images.DOCKER_SCHEMA2}) as client:
            got = await client.get(f"/v2/{image.repo}/manifests/v1")
    assert got.status_code == 502
    assert json_error(got.content) == ("MANIFEST_INVALID", {"digest": "sha256:" + SHA})
    assert await node.node.metadata.get_tag(image.repo, "v1") is None


def test_case_ids_have_tests_or_references() -> None:
    source = Path(__file__).read_text()
    for case_id, text in CASES.items():
        referenced = re.search(r"\(tests?/|test_\w+|\(test_read_api", text)
        assert source.count(f'"{case_id}"') >= 2 or referenced, case_id
