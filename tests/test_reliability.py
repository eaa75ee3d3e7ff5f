"""Reliability: upstream faults, disk faults and hostile clients, each with a case ID.

The node runs in front of the real distribution upstream through
:class:`tests.support.faults.FaultRelay`, which misbehaves on chosen requests.
`CASES` is the table the README's "Reliability" section is built from; every
ID is a pytest id below (``pytest -k R-UP-01``). Crashes are in
``tests/test_crash.py`` (R-CR-*), hostile requests in
``tests/test_hostile_input.py`` (H-*).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.registry.digest import Digest
from mirror.storage import blobstore
from tests.support import faults as F
from tests.support import images
from tests.support.faults import FaultRelay, NodeProcess, check_store, pull_image, raise_nofile
from tests.support.images import DOCKER_SCHEMA2

MiB = 1 << 20
ACCEPT = {"Accept": DOCKER_SCHEMA2}

CASES = {
    # upstream faults
    "R-UP-01": "connection reset early in a blob: the shared fetch resumes with a Range GET from the bytes "
               "it has; 4 concurrent clients each get the whole verified blob in one response",
    "R-UP-02": "connection reset in the middle of a blob: as R-UP-01",
    "R-UP-03": "connection reset just before the end of a blob: as R-UP-01",
    "R-UP-04": "connection reset on every attempt: after bounded retries with backoff every client's "
               "connection is aborted short of Content-Length; nothing published (no object, no row, "
               "no temp file); the next request refetches and succeeds",
    "R-UP-05": "connection dropped before headers on every attempt: 503 UNAVAILABLE (JSON) after the "
               "retries; nothing published; the next request succeeds",
    "R-UP-06": "upstream sends headers, then no bytes: the per-read timeout (read_timeout 1s) ends the "
               "fetch, waiters are released (aborted short), nothing published; the next request succeeds",
    "R-UP-07": "upstream never sends headers: read timeout, 503 UNAVAILABLE to the waiters, the next "
               "request succeeds",
    "R-UP-08": "upstream trickles 1 (or 4) byte/s, which never trips a per-read timeout: the fetch is "
               "cut (less than 1 KiB per read_timeout window), waiters released, nothing published; "
               "the next request succeeds",
    "R-UP-09": "one byte of the blob corrupted: digest mismatch, nothing published, clients never get "
               "the held-back tail (short of Content-Length); the next request refetches",
    "R-UP-10": "more bytes than the blob (announced): digest mismatch; as R-UP-09",
    "R-UP-11": "fewer bytes than the blob, announced as complete (even as 0 bytes, where there is no "
               "tail to hold back: 503): digest mismatch; as R-UP-09",
    "R-UP-12": "fewer bytes than Content-Length then a clean close, once: resumed with Range, clients "
               "get the whole blob; on every attempt: aborted short, nothing published",
    "R-UP-13": "an HTML page with 200 instead of a blob: nothing published, clients short of "
               "Content-Length; the next request refetches",
    "R-UP-14": "an HTML page with 200 instead of a manifest: MANIFEST_INVALID, nothing stored, "
               "the next request refetches",
    "R-UP-15": "503 on a manifest, once: retried with backoff, the client gets the manifest",
    "R-UP-16": "429 with Retry-After: 1 on a manifest: retried no sooner than 1 s later, client gets it",
    "R-UP-17": "429 with Retry-After: 60: not retried (too long to hold a client), the client gets "
               "429 TOOMANYREQUESTS with Retry-After: 60",
    "R-UP-18": "503 on a blob, once: the fetch retries with backoff, the client gets the blob",
    "R-UP-19": "upstream answers 429/503 to everything: cached tags (stale), manifests and blobs are "
               "still served",
    "R-UP-20": "a manifest larger than 4 MiB with its Content-Length: refused before reading "
               "(MANIFEST_INVALID), only a few bytes cross the link",
    "R-UP-21": "a manifest larger than 4 MiB, chunked: read is cut at the cap (MANIFEST_INVALID)",
    "R-UP-22": "an endless manifest body: cut at the cap (MANIFEST_INVALID), bounded memory and bytes",
    "R-UP-23": "a 1 GiB layer's digest requested as a manifest (1 GiB Content-Length, as a blob or "
               "with a manifest type, or chunked): refused without downloading it",
    "R-UP-24": "a real layer requested as a manifest: refused (not a manifest), no layer download",
    "R-UP-25": "429 on a blob: TOOMANYREQUESTS with upstream's Retry-After, nothing published",
    "R-UP-26": "503 with Retry-After: 1 on a blob: the fetch waits that long before retrying, the "
               "client gets the blob",
    # disks
    "R-DISK-01": "EIO on the Nth write of a fetch: temp removed, nothing published, cache intact, the "
                 "client's stream aborted short; the next request succeeds once the disk recovers",
    "R-DISK-02": "EIO creating the temp file: 503 UNAVAILABLE before headers; recovers",
    "R-DISK-03": "EIO storing a fetched manifest: a 503 (never a 500), nothing stored; recovers",
    "R-DISK-04": "a stored blob whose size changed (bit rot, truncation): not served, quarantined, "
                 "refetched and served correctly",
    "R-DISK-05": "a stored manifest with a flipped byte: re-hashed on read, quarantined, refetched",
    # clients
    "R-CL-01": "a client reading at 1 byte/s during a fetch: the fetch and 4 other readers finish at "
               "link speed; the slow client is cut after client_idle_timeout (2 s)",
    "R-CL-02": "a client reading at 1 byte/s from a cached blob (sendfile): cut after "
               "client_idle_timeout; other clients unaffected",
    "R-CL-03": "500 concurrent clients pull a cold image (3 blobs of 1 MiB) from the node process: "
               "all get verified bytes, one upstream GET per blob, peak RSS (VmHWM) under 200 MiB",
    "R-CL-04": "2000 slowloris connections (headers trickled) against a node started with a soft "
               "open-files limit of 1024: the node raised its limit, a normal client still pulls; they are "
               "all closed after the header timeout (10 s)",
    "R-CL-05": "the header timeout runs from a connection's start or a request's first byte, trickling "
               "does not extend it; an idle kept-alive connection is left to the keep-alive timeout",
}


def case(case_id: str) -> Any:
    """A pytest param carrying its case ID as id."""
    assert case_id in CASES, case_id
    return case_id


def repo_name() -> str:
    return f"rel/app-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def faults(upstream: Any) -> Any:
    with FaultRelay(upstream.url) as link:
        yield link


@dataclass
class Got:
    """What a client received for one request."""

    status: int = 0
    length: int | None = None  # Content-Length announced
    received: int = 0
    digest: str = ""
    complete: bool = False  # the body ended normally
    error: str | None = None
    body: bytes = b""
    headers: httpx.Headers | None = None

    @property
    def short(self) -> bool:
        """The client got less than announced, or an error: never a whole-looking body."""
        return not self.complete or (self.length is not None and self.received < self.length)


async def get(client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> Got:
    got = Got()
    hasher = hashlib.sha256()
    try:
        async with client.stream("GET", url, headers=headers) as response:
            got.status = response.status_code
            got.headers = response.headers
            length = response.headers.get("content-length")
            got.length = int(length) if length is not None else None
            body = bytearray()
            async for chunk in response.aiter_raw():
                hasher.update(chunk)
                got.received += len(chunk)
                if response.status_code != 200 or got.received <= 64 * 1024:
                    body += chunk
            got.body = bytes(body)
            got.complete = True
    except httpx.HTTPError as exc:
        got.error = repr(exc)
    got.digest = f"sha256:{hasher.hexdigest()}"
    return got


def error_code(got: Got) -> str:
    import json

    return str(json.loads(got.body)["errors"][0]["code"])


async def push(client: httpx.AsyncClient, upstream: Any, size: int = 4 * MiB, seed: str | None = None) -> Any:
    seed = seed or uuid.uuid4().hex
    layer = images.make_layer(seed, size, compresslevel=0)
    return await images.push_image(client, upstream.url, repo_name(), "v1", layers=[layer], seed=seed)


async def settled(node: Any, timeout: float = 20.0) -> None:
    """Wait until the node has no fetch in flight."""
    deadline = time.monotonic() + timeout
    while node.node.fetcher.inflight:
        assert time.monotonic() < deadline, "fetch still in flight"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)


async def assert_nothing_published(node: Any, digest: str) -> None:
    await settled(node)
    store = node.node.store
    parsed = Digest.parse(digest)
    assert not store.path(parsed).exists(), "an unverified object was published"
    assert await node.node.metadata.get_object(parsed) is None
    assert [p.name for p in (store.root / "tmp").glob("*.part")] == []
    assert check_store(store.root, node.settings.metadata_dir / "metadata.sqlite").problems == []


async def assert_served_now(node: Any, image: Any, digest: str, data: bytes) -> None:
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest, got.received) == (200, True, digest, len(data))
    await settled(node)
    assert node.node.store.path(Digest.parse(digest)).exists()


# --------------------------------------------------------------------------- upstream: resets


@pytest.mark.parametrize(("case_id", "after"), [
    ("R-UP-01", 100 * 1024), ("R-UP-02", 2 * MiB), ("R-UP-03", -2000)],
    ids=["R-UP-01", "R-UP-02", "R-UP-03"])
async def test_reset_mid_blob_resumes_with_range(make_mirror, faults, upstream, upstream_client,
                                                case_id, after) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream)
    digest, data = image.layers[0]
    faults.rate = 4 * MiB  # about a second: the clients join the one fetch
    faults.inject(F.reset(after), method="GET", path="/blobs/")
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, f"/v2/{image.repo}/blobs/{digest}") for _ in range(4)))
    for got in results:
        assert (got.status, got.complete, got.received, got.digest) == (200, True, len(data), digest), got
    assert len(faults.faulted("reset")) == 1
    ranged = faults.ranged("/blobs/")
    assert len(ranged) == 1 and ranged[0].request_headers is not None
    start = int(ranged[0].request_headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= (after if after > 0 else len(data) + after)
    assert faults.count("GET", "/blobs/") == 2
    await settled(node)
    assert check_store(node.node.store.root, node.settings.metadata_dir / "metadata.sqlite").problems == []


@pytest.mark.parametrize("case_id", [case("R-UP-04")])
async def test_reset_on_every_attempt_fails_cleanly(make_mirror, faults, upstream, upstream_client,
                                                   case_id) -> None:
    node = await make_mirror(faults.url, upstream={"retries": 2})
    image = await push(upstream_client, upstream)
    digest, data = image.layers[0]
    faults.inject(F.reset(512 * 1024), method="GET", path="/blobs/", times=None)
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, f"/v2/{image.repo}/blobs/{digest}") for _ in range(3)))
    for got in results:
        assert got.status == 200 and got.length == len(data) and got.short and got.received < len(data)
    assert faults.count("GET", "/blobs/") == 3  # the first GET and 2 resumptions, then give up
    await assert_nothing_published(node, digest)
    faults.clear()
    await assert_served_now(node, image, digest, data)


@pytest.mark.parametrize("case_id", [case("R-UP-05")])
async def test_drop_before_headers_is_503(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url, upstream={"retries": 2})
    image = await push(upstream_client, upstream, size=256 * 1024)
    digest, data = image.layers[0]
    faults.inject(F.drop(), method="GET", path="/blobs/", times=None)
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, f"/v2/{image.repo}/blobs/{digest}") for _ in range(3)))
    for got in results:
        assert got.status == 503 and got.complete and error_code(got) == "UNAVAILABLE"
    assert faults.count("GET", "/blobs/") == 3
    await assert_nothing_published(node, digest)
    faults.clear()
    await assert_served_now(node, image, digest, data)


# --------------------------------------------------------------------------- upstream: stalls


@pytest.mark.parametrize(("case_id", "fault"), [
    ("R-UP-06", F.stall(after=0)), ("R-UP-07", F.hang()), ("R-UP-08", F.trickle(after=0, rate=1)),
    ("R-UP-08", F.trickle(after=100_000, rate=4))],
    ids=["R-UP-06", "R-UP-07", "R-UP-08-1Bps", "R-UP-08-4Bps-after-100KB"])
async def test_stalled_upstream_times_out_and_releases_waiters(make_mirror, faults, upstream, upstream_client,
                                                              case_id, fault) -> None:
    node = await make_mirror(faults.url, upstream={"read_timeout": "1s", "retries": 1})
    image = await push(upstream_client, upstream, size=512 * 1024)
    digest, data = image.layers[0]
    faults.inject(fault, method="GET", path="/blobs/", times=None)
    started = time.monotonic()
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, f"/v2/{image.repo}/blobs/{digest}") for _ in range(3)))
    elapsed = time.monotonic() - started
    assert elapsed < 12, f"waiters held {elapsed:.1f}s"
    for got in results:
        if fault.kind == "hang":
            assert got.status == 503 and error_code(got) == "UNAVAILABLE"
        else:
            assert got.status == 200 and got.short and got.received < len(data)
    assert faults.count("GET", "/blobs/") == 2  # one retry, then released
    await assert_nothing_published(node, digest)
    faults.clear()
    await assert_served_now(node, image, digest, data)


# --------------------------------------------------------------------------- upstream: wrong bytes


@pytest.mark.parametrize(("case_id", "fault"), [
    ("R-UP-09", F.corrupt(offset=1234)),
    ("R-UP-10", F.pad(extra=100_000)),
    ("R-UP-11", F.short(missing=1)),
    ("R-UP-11", F.short(missing=1 << 40)),  # announced as empty: nothing to hold back
    ("R-UP-13", F.html()),
], ids=["R-UP-09", "R-UP-10", "R-UP-11", "R-UP-11-empty", "R-UP-13"])
async def test_wrong_bytes_are_never_published_or_completed(make_mirror, faults, upstream, upstream_client,
                                                           case_id, fault) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=MiB)
    digest, data = image.layers[0]
    faults.rate = 2 * MiB  # clients join while the bytes arrive
    faults.inject(fault, method="GET", path="/blobs/")
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, f"/v2/{image.repo}/blobs/{digest}") for _ in range(3)))
    for got in results:
        assert got.status in (200, 503)
        if got.status == 200:
            assert got.short, f"a complete-looking wrong blob was sent: {got}"
            assert got.length, "a 0-byte answer is complete-looking"
            assert got.length is not None and got.received <= max(0, got.length - 64 * 1024)
    await assert_nothing_published(node, digest)
    faults.rate = None
    await assert_served_now(node, image, digest, data)
    assert faults.count("GET", "/blobs/") == 2


@pytest.mark.parametrize("case_id", [case("R-UP-12")])
async def test_truncated_then_closed(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url, upstream={"retries": 1})
    image = await push(upstream_client, upstream, size=MiB)
    digest, _data = image.layers[0]
    faults.inject(F.truncate(missing=300_000), method="GET", path="/blobs/")
    async with node.client() as client:
        once = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (once.status, once.complete, once.digest) == (200, True, digest)
    assert len(faults.ranged("/blobs/")) == 1
    other = await push(upstream_client, upstream, size=MiB)
    other_digest, _ = other.layers[0]
    faults.inject(F.truncate(missing=300_000), method="GET", path=other_digest, times=None)
    async with node.client() as client:
        always = await get(client, f"/v2/{other.repo}/blobs/{other_digest}")
    assert always.status == 200 and always.short
    await assert_nothing_published(node, other_digest)


@pytest.mark.parametrize("case_id", [case("R-UP-14")])
async def test_html_instead_of_manifest(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    faults.inject(F.html(), method="GET", path="/manifests/")
    async with node.client(headers=ACCEPT) as client:
        portal = await get(client, f"/v2/{image.repo}/manifests/v1")
        by_digest = await get(client, f"/v2/{image.repo}/manifests/{image.digest}")
    assert portal.status == 400 and error_code(portal) == "MANIFEST_INVALID"
    assert by_digest.status == 200 and by_digest.body == image.manifest
    assert await node.node.metadata.get_tag(image.repo, "v1") is None
    assert faults.count("GET", "/manifests/") == 2


# --------------------------------------------------------------------------- upstream: 429 / 5xx


@pytest.mark.parametrize("case_id", [case("R-UP-15")])
async def test_manifest_503_once_is_retried(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    faults.inject(F.status(503), method="GET", path="/manifests/")
    async with node.client(headers=ACCEPT) as client:
        got = await get(client, f"/v2/{image.repo}/manifests/v1")
    assert got.status == 200 and got.body == image.manifest
    assert faults.count("GET", "/manifests/") == 2


@pytest.mark.parametrize("case_id", [case("R-UP-16")])
async def test_manifest_429_honours_retry_after(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    faults.inject(F.status(429, retry_after=1), method="GET", path="/manifests/")
    async with node.client(headers=ACCEPT) as client:
        got = await get(client, f"/v2/{image.repo}/manifests/v1")
    assert got.status == 200 and got.body == image.manifest
    first, second = [r for r in faults.records if r.method == "GET" and "/manifests/" in r.path_qs]
    assert first.status == 429 and second.started_at - first.started_at >= 1.0


@pytest.mark.parametrize("case_id", [case("R-UP-26")])
async def test_blob_503_honours_retry_after(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=64 * 1024)
    digest, data = image.layers[0]
    faults.inject(F.status(503, retry_after=1), method="GET", path="/blobs/")
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest) == (200, True, digest)
    first, second = [r for r in faults.records if r.method == "GET" and "/blobs/" in r.path_qs]
    assert first.status == 503 and second.started_at - first.started_at >= 1.0


@pytest.mark.parametrize("case_id", [case("R-UP-17")])
async def test_long_retry_after_is_passed_on(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    faults.inject(F.status(429, retry_after=60), method="GET", path="/manifests/", times=None)
    async with node.client(headers=ACCEPT) as client:
        got = await get(client, f"/v2/{image.repo}/manifests/v1")
    assert got.status == 429 and error_code(got) == "TOOMANYREQUESTS"
    assert got.headers is not None and got.headers["Retry-After"] == "60"
    assert faults.count("GET", "/manifests/") == 1


@pytest.mark.parametrize("case_id", [case("R-UP-18")])
async def test_blob_503_once_is_retried(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=300_000)
    digest, _data = image.layers[0]
    faults.inject(F.status(503), method="GET", path="/blobs/")
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest) == (200, True, digest)
    assert faults.count("GET", "/blobs/") == 2 and faults.ranged("/blobs/") == []


@pytest.mark.parametrize("case_id", [case("R-UP-25")])
async def test_blob_429_is_passed_on(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=300_000)
    digest, data = image.layers[0]
    faults.inject(F.status(429, retry_after=7), method="GET", path="/blobs/")
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert got.status == 429 and error_code(got) == "TOOMANYREQUESTS"
    assert got.headers is not None and got.headers["Retry-After"] == "7"
    await assert_nothing_published(node, digest)
    await assert_served_now(node, image, digest, data)


@pytest.mark.parametrize("case_id", [case("R-UP-19")])
async def test_cached_content_served_while_upstream_refuses(wall_clock, make_mirror, faults, upstream,
                                                           upstream_client, case_id) -> None:
    node = await make_mirror(faults.url, tag_ttl="1h", upstream={"retries": 1})
    image = await push(upstream_client, upstream, size=100_000)
    async with node.client(headers=ACCEPT) as client:
        assert (await get(client, f"/v2/{image.repo}/manifests/v1")).status == 200
        for digest in image.blobs:
            assert (await get(client, f"/v2/{image.repo}/blobs/{digest}")).complete
        wall_clock.advance(3601)  # the tag's TTL is over
        for code in (429, 503):
            faults.clear()
            faults.inject(F.status(code, retry_after=1), times=None)
            tag = await get(client, f"/v2/{image.repo}/manifests/v1")
            by_digest = await get(client, f"/v2/{image.repo}/manifests/{image.digest}")
            blobs = [await get(client, f"/v2/{image.repo}/blobs/{d}") for d in image.blobs]
            assert tag.status == 200 and tag.body == image.manifest
            assert by_digest.status == 200 and by_digest.body == image.manifest
            assert [(b.status, b.digest) for b in blobs] == [(200, d) for d in image.blobs]
    assert faults.faulted("status")  # upstream was asked (the tag revalidation) and refused


# --------------------------------------------------------------------------- upstream: oversized answers


@pytest.mark.parametrize(("case_id", "fault", "limit"), [
    ("R-UP-20", F.huge_manifest(5 * MiB, announce=True), 0),
    ("R-UP-21", F.huge_manifest(64 * MiB, announce=False), 4 * MiB),
    ("R-UP-22", F.endless(), 4 * MiB),
], ids=["R-UP-20", "R-UP-21", "R-UP-22"])
async def test_oversized_manifest_is_cut_at_the_cap(make_mirror, faults, upstream, upstream_client,
                                                   case_id, fault, limit) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    faults.inject(fault, method="GET", path="/manifests/")
    async with node.client(headers=ACCEPT) as client:
        got = await get(client, f"/v2/{image.repo}/manifests/v1")
    assert got.status == 400 and error_code(got) == "MANIFEST_INVALID"
    await faults.wait_idle_async()
    relayed = faults.bytes_sent("/manifests/")
    # the node read at most the cap (plus socket buffers on the way)
    assert relayed <= limit + 8 * MiB, relayed
    assert await node.node.metadata.get_tag(image.repo, "v1") is None


@pytest.mark.parametrize(("case_id", "fault"), [
    ("R-UP-23", F.synthetic(1 << 30)),
    ("R-UP-23", F.synthetic(1 << 30, content_type=DOCKER_SCHEMA2)),
    ("R-UP-23", F.synthetic(1 << 30, content_type=DOCKER_SCHEMA2, announce=False)),
], ids=["R-UP-23-octet-stream", "R-UP-23-manifest-type", "R-UP-23-chunked"])
async def test_gigabyte_layer_as_manifest_is_not_downloaded(make_mirror, faults, upstream, upstream_client,
                                                           case_id, fault) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    layer_digest = image.layers[0][0]
    faults.inject(fault, method="GET", path=f"/manifests/{layer_digest}")
    started = time.monotonic()
    async with node.client(headers=ACCEPT) as client:
        got = await get(client, f"/v2/{image.repo}/manifests/{layer_digest}")
    assert got.status == 400 and error_code(got) == "MANIFEST_INVALID"
    await faults.wait_idle_async()
    assert faults.bytes_sent("/manifests/") < 16 * MiB
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("case_id", [case("R-UP-24")])
async def test_real_layer_as_manifest_is_refused(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=32 * MiB)
    layer_digest, layer = image.layers[0]
    faults.inject(F.rewrite(lambda path: path.replace("/manifests/", "/blobs/")), method="GET",
                  path=f"/manifests/{layer_digest}", times=None)
    async with node.client(headers=ACCEPT) as client:
        refused = await get(client, f"/v2/{image.repo}/manifests/{layer_digest}")
        # the same, announced as a manifest: the length or the cap stops it
        faults.clear()
        faults.inject(F.rewrite(lambda path: path.replace("/manifests/", "/blobs/"),
                                headers={"Content-Type": DOCKER_SCHEMA2}),
                      method="GET", path=f"/manifests/{layer_digest}", times=None)
        typed = await get(client, f"/v2/{image.repo}/manifests/{layer_digest}")
    for got in (refused, typed):
        assert got.status == 400 and error_code(got) == "MANIFEST_INVALID"
    await faults.wait_idle_async()
    assert faults.bytes_sent("/manifests/") < len(layer) // 2
    assert not node.node.store.path(Digest.parse(layer_digest)).exists()


# --------------------------------------------------------------------------- disks


class _FailingWrites:
    """Make `BlobWriter.write` raise EIO on its Nth call (from now on, across writers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, nth: int, times: int = 1) -> None:
        self.calls = 0
        self.nth = nth
        self.times = times
        original = blobstore.BlobWriter.write

        def write(writer: blobstore.BlobWriter, chunk: bytes) -> int:
            self.calls += 1
            if self.nth <= self.calls < self.nth + self.times:
                raise OSError(errno.EIO, "Input/output error (injected)")
            return original(writer, chunk)

        monkeypatch.setattr(blobstore.BlobWriter, "write", write)


@pytest.mark.parametrize("case_id", [case("R-DISK-01")])
async def test_eio_during_fetch(make_mirror, faults, upstream, upstream_client, monkeypatch, case_id) -> None:
    node = await make_mirror(faults.url)
    cached = await push(upstream_client, upstream, size=200_000)
    cached_digest, cached_data = cached.layers[0]
    await assert_served_now(node, cached, cached_digest, cached_data)
    image = await push(upstream_client, upstream, size=2 * MiB)
    digest, data = image.layers[0]
    faults.rate = 4 * MiB
    _FailingWrites(monkeypatch, nth=4)
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, f"/v2/{image.repo}/blobs/{digest}") for _ in range(2)))
    for got in results:
        assert got.status in (200, 503)
        if got.status == 200:
            assert got.short and got.received < len(data)
        else:
            assert error_code(got) == "UNAVAILABLE"
    await assert_nothing_published(node, digest)
    monkeypatch.undo()
    faults.rate = None
    await assert_served_now(node, cached, cached_digest, cached_data)  # the cache is intact
    await assert_served_now(node, image, digest, data)  # and the disk recovered


@pytest.mark.parametrize("case_id", [case("R-DISK-02")])
async def test_eio_creating_temp_file(make_mirror, faults, upstream, upstream_client, monkeypatch,
                                      case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=200_000)
    digest, data = image.layers[0]

    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(blobstore.BlobStore, "new_temp_path", broken)
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert got.status == 503 and error_code(got) == "UNAVAILABLE"
    monkeypatch.undo()
    await assert_nothing_published(node, digest)
    await assert_served_now(node, image, digest, data)


@pytest.mark.parametrize("case_id", [case("R-DISK-03")])
async def test_eio_storing_manifest(make_mirror, faults, upstream, upstream_client, monkeypatch, case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    _FailingWrites(monkeypatch, nth=1, times=100)
    async with node.client(headers=ACCEPT) as client:
        failed = await get(client, f"/v2/{image.repo}/manifests/v1")
        monkeypatch.undo()
        recovered = await get(client, f"/v2/{image.repo}/manifests/v1")
    assert failed.status == 503 and error_code(failed) == "UNAVAILABLE"
    assert recovered.status == 200 and recovered.body == image.manifest
    await settled(node)
    assert check_store(node.node.store.root, node.settings.metadata_dir / "metadata.sqlite").problems == []


@pytest.mark.parametrize(("case_id", "change"), [
    ("R-DISK-04", "truncate"), ("R-DISK-04", "grow")], ids=["R-DISK-04-truncated", "R-DISK-04-grown"])
async def test_blob_with_changed_size_is_quarantined(make_mirror, faults, upstream, upstream_client,
                                                    case_id, change) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=300_000)
    digest, data = image.layers[0]
    await assert_served_now(node, image, digest, data)
    path = node.node.store.path(Digest.parse(digest))
    if change == "truncate":
        os.truncate(path, len(data) - 10)
    else:
        path.write_bytes(data + b"rot")  # same path, same inode: grown behind the node's back
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest) == (200, True, digest)
    assert faults.count("GET", "/blobs/") == 2  # refetched
    quarantined = list((node.node.store.root / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(digest.replace(":", "-"))
    await settled(node)
    assert check_store(node.node.store.root, node.settings.metadata_dir / "metadata.sqlite").problems == []


@pytest.mark.parametrize("case_id", [case("R-DISK-05")])
async def test_manifest_with_flipped_byte_is_refetched(make_mirror, faults, upstream, upstream_client,
                                                      case_id) -> None:
    node = await make_mirror(faults.url)
    image = await push(upstream_client, upstream, size=1024)
    async with node.client(headers=ACCEPT) as client:
        assert (await get(client, f"/v2/{image.repo}/manifests/{image.digest}")).status == 200
        path = node.node.store.path(Digest.parse(image.digest))
        raw = bytearray(path.read_bytes())
        raw[10] ^= 0x01
        path.write_bytes(bytes(raw))
        got = await get(client, f"/v2/{image.repo}/manifests/{image.digest}")
    assert got.status == 200 and got.body == image.manifest
    assert faults.count("GET", "/manifests/") == 2
    assert list((node.node.store.root / "quarantine").iterdir())
    assert check_store(node.node.store.root, node.settings.metadata_dir / "metadata.sqlite").problems == []


# --------------------------------------------------------------------------- clients


@dataclass
class SlowRead:
    """What a 1 byte/s reader saw."""

    received: int = 0
    status_line: bytes = b""
    cut_after: float | None = None  # seconds from the request until the server closed


async def slow_reader(port: int, path: str, seconds: float) -> SlowRead:
    """GET `path` with a tiny receive buffer, then read one byte per second."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    result = SlowRead()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
        started = time.monotonic()
        head = b""
        while time.monotonic() - started < seconds:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1), 1.0)
            except TimeoutError:
                continue
            except OSError:  # ECONNRESET: the server aborted
                result.cut_after = time.monotonic() - started
                break
            if not data:
                result.cut_after = time.monotonic() - started
                break
            result.received += 1
            if len(head) < 12:
                head += data
            if _peer_closed(sock):  # reset or FIN: what is still buffered here does not matter
                result.cut_after = time.monotonic() - started
                break
            await asyncio.sleep(1.0)
        result.status_line = head
    finally:
        sock.close()
    return result


_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8


def _peer_closed(sock: socket.socket) -> bool:
    """True once the peer reset or closed (Linux keeps returning buffered bytes until then)."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


@pytest.mark.parametrize("case_id", [case("R-CL-01")])
async def test_slow_reader_during_fetch_is_cut_and_slows_nobody(make_mirror, faults, upstream, upstream_client,
                                                              case_id) -> None:
    # cut after 5 s idle: waiting on the slow reader would hold the fetch and the readers that long
    node = await make_mirror(faults.url, client_idle_timeout="5s")
    image = await push(upstream_client, upstream, size=16 * MiB)
    digest, _data = image.layers[0]
    faults.rate = 8 * MiB  # the fetch lasts about 2 s
    url = f"/v2/{image.repo}/blobs/{digest}"
    slow = asyncio.create_task(slow_reader(node.port, url, seconds=40))
    await faults.wait_for_async(1, "GET", "/blobs/")
    started = time.monotonic()
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, url) for _ in range(4)))
    readers_done = time.monotonic() - started
    seen = await slow
    for got in results:
        assert (got.status, got.complete, got.digest) == (200, True, digest)
    fetch = next(r for r in faults.records if "/blobs/" in r.path_qs)
    assert fetch.finished_at is not None and fetch.finished_at - fetch.started_at < 5.0
    assert readers_done < 5.0
    assert faults.count("GET", "/blobs/") == 1
    assert seen.status_line and b"HTTP".startswith(seen.status_line[:4])  # answered, then cut
    assert seen.cut_after is not None and seen.cut_after < 30, seen  # typically 6-10 s
    assert seen.received < 64


@pytest.mark.parametrize("case_id", [case("R-CL-02")])
async def test_slow_reader_of_cached_blob_is_cut(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url, client_idle_timeout="5s")  # held by the slow reader: 5 s or more
    image = await push(upstream_client, upstream, size=16 * MiB)
    digest, data = image.layers[0]
    await assert_served_now(node, image, digest, data)
    url = f"/v2/{image.repo}/blobs/{digest}"
    slow = asyncio.create_task(slow_reader(node.port, url, seconds=40))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    async with node.client() as client:
        results = await asyncio.gather(*(get(client, url) for _ in range(4)))
    assert time.monotonic() - started < 4.0  # typically 0.2 s
    for got in results:
        assert (got.status, got.complete, got.digest) == (200, True, digest)
    seen = await slow
    assert seen.status_line and b"HTTP".startswith(seen.status_line[:4])  # answered, then cut
    assert seen.cut_after is not None and seen.cut_after < 30, seen  # typically 6-10 s


async def raw_pull(port: int, repo: str, tag: str) -> dict[str, Any]:
    """Pull an image through the node at `port`; {"ok", "bytes", "error"}."""
    result = await pull_image(port, repo, tag)
    return {"ok": result.ok, "bytes": result.bytes, "error": result.error}


@pytest.fixture
def node_process(tmp_path: Path, faults: FaultRelay) -> Any:
    """Factory: a node subprocess in front of the fault relay, stopped at the end."""
    nodes: list[NodeProcess] = []

    def make(**kwargs: Any) -> NodeProcess:
        node = NodeProcess(tmp_path / f"proc{len(nodes)}", faults.url, **kwargs)
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:
        node.close()


@pytest.mark.parametrize("case_id", [case("R-CL-03")])
async def test_500_clients_pull_a_cold_image(node_process, faults, upstream, upstream_client, case_id) -> None:
    raise_nofile(4096)
    node = node_process()
    layers = [images.make_layer(f"{uuid.uuid4()}-{i}", MiB, compresslevel=0) for i in range(3)]
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=layers)
    faults.rate = 16 * MiB  # a link slower than loopback, so clients pile onto the fetches
    baseline = node.status_field("VmRSS")
    started = time.monotonic()
    results = await asyncio.gather(*(raw_pull(node.port, image.repo, "v1") for _ in range(500)))
    elapsed = time.monotonic() - started
    failures = [r["error"] for r in results if not r["ok"]]
    assert failures == [], failures[:5]
    assert all(r["bytes"] == sum(len(b) for b in image.blobs.values()) for r in results)
    assert faults.count("GET", "/manifests/") == 1
    assert faults.count("GET", "/blobs/") == len(image.blobs)  # one upstream fetch per blob
    peak = node.status_field("VmHWM")
    print(f"500 pulls in {elapsed:.1f}s; node RSS {baseline // 1024} MiB before, peak {peak // 1024} MiB")
    assert peak < 200 * 1024, f"peak RSS {peak // 1024} MiB"


@pytest.mark.parametrize("case_id", [case("R-CL-04")])
async def test_slowloris_does_not_stop_a_pull(node_process, faults, upstream, upstream_client, case_id) -> None:
    from mirror.api.server import HEADER_TIMEOUT

    connections = 2000
    if raise_nofile(connections + 500) < connections + 500:
        pytest.skip("the hard RLIMIT_NOFILE of this environment is below 2500")
    node = node_process(nofile=1024)  # what a default systemd/shell limit would give it
    soft, hard = node.nofile_limit()
    assert soft == hard and soft > connections, (soft, hard)
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1",
                                    layers=[256 * 1024, 256 * 1024])
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", node.port))
        await loop.sock_sendall(sock, b"GET /v2/ HTTP/1.1\r\nHost: node\r\n")

    async def trickle() -> None:
        n = 0
        while True:
            await asyncio.sleep(1.0)
            n += 1
            for sock in socks:
                try:
                    sock.send(f"X-Slow-{n}: 1\r\n".encode())
                except OSError:
                    pass

    try:
        for start in range(0, connections, 100):
            await asyncio.gather(*(open_one() for _ in range(100)))
        opened_at = time.monotonic()
        trickling = asyncio.create_task(trickle())
        held = 0
        while held <= connections and time.monotonic() < opened_at + HEADER_TIMEOUT / 2:  # all accepted
            await asyncio.sleep(0.1)
            held = len(os.listdir(f"/proc/{node.pid}/fd"))
        assert held > connections, f"the node holds only {held} descriptors"
        pulled = await raw_pull(node.port, image.repo, "v1")
        assert pulled["ok"], pulled
        # pulled while the slowloris connections were still held, not after they were cut
        assert time.monotonic() < opened_at + HEADER_TIMEOUT
        deadline = opened_at + HEADER_TIMEOUT + 15.0
        while time.monotonic() < deadline and sum(map(_peer_closed, socks)) < connections:
            await asyncio.sleep(0.5)
        closed = sum(map(_peer_closed, socks))
        trickling.cancel()
        assert closed == connections, f"{connections - closed} slowloris connections still open"
        assert node.process.running
        again = await raw_pull(node.port, image.repo, "v1")
        assert again["ok"], again
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("case_id", [case("R-CL-05")])
async def test_header_timeout_semantics(make_mirror, faults, monkeypatch, case_id) -> None:
    from mirror.api import server

    monkeypatch.setattr(server.HeaderTimeoutHandler, "header_timeout", 1.0)
    node = await make_mirror(faults.url)
    loop = asyncio.get_running_loop()

    async def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", node.port))
        return sock

    async def request(sock: socket.socket) -> bytes:
        await loop.sock_sendall(sock, b"GET /v2/ HTTP/1.1\r\nHost: node\r\n\r\n")
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), 15)

    trickling, idle, second = await connect(), await connect(), await connect()
    try:
        assert (await request(idle)).startswith(b"HTTP/1.1 200")
        assert (await request(second)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        await loop.sock_sendall(trickling, b"GET /v2/ HTTP/1.1\r\n")
        await loop.sock_sendall(second, b"GET /v2/ HTTP/1.1\r\n")  # a kept-alive connection's next request
        while time.monotonic() - started < 3.0 or (  # a loaded machine may take longer than 3 s to cut
                not (_peer_closed(trickling) and _peer_closed(second)) and time.monotonic() - started < 15.0):
            for sock in (trickling, second):
                with contextlib.suppress(OSError):
                    sock.send(b"X-Slow: 1\r\n")
            await asyncio.sleep(0.25)
        assert _peer_closed(trickling) and _peer_closed(second)
        assert not _peer_closed(idle)  # idle for 3 s after its response: the keep-alive timeout's business
        assert (await request(idle)).startswith(b"HTTP/1.1 200")
    finally:
        for sock in (trickling, idle, second):
            sock.close()


def test_case_table_is_complete() -> None:
    """Every case ID of the table is the id of a test in this module."""
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2, case_id
