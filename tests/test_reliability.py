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
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror.registry.digest import Digest
from mirror.storage import blobstore
from tests.conftest import mirror_config
from tests.support import faults as F
from tests.support import images
from tests.support.faults import FaultRelay, NodeProcess, check_store, pull_image, raise_nofile
from tests.support.images import DOCKER_SCHEMA2
from tests.test_quota import fill, small_disk  # noqa: F401, F811  (a fixture: an 8 MiB tmpfs)

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
    "R-UP-27": "a tag (or a tag list) past its TTL while upstream refuses (503 with Retry-After, or "
               "connections dropped): the cached answer is served at once, before the refresh's retries "
               "are done; they go on in the background (one refresh, however many requests meanwhile)",
    "R-UP-28": "upstream accepts the request and never answers, or stops mid-body, with read_timeout 1s "
               "and 4 retries: each of two waiting clients (plain, or with a Range waiting for the whole "
               "blob) gets 503 UNAVAILABLE (JSON, before headers) or is cut (after headers) within "
               "read_timeout plus a margin, not retries x timeout; the fill goes on retrying in the "
               "background",
    # disks
    "R-DISK-01": "EIO on the Nth write of a fetch: temp removed, nothing published, cache intact, the "
                 "client's stream aborted short; the next request succeeds once the disk recovers",
    "R-DISK-02": "EIO creating the temp file: 503 UNAVAILABLE before headers; recovers",
    "R-DISK-03": "EIO storing a fetched manifest: a 503 (never a 500), nothing stored; recovers",
    "R-DISK-04": "a stored blob whose size changed (bit rot, truncation): not served, quarantined, "
                 "refetched and served correctly",
    "R-DISK-05": "a stored manifest with a flipped byte: never served; re-hashed when read from disk, "
                 "quarantined, refetched",
    "R-DISK-06": "the store's filesystem full (a manifest fill just failed with ENOSPC, on an 8 MiB "
                 "tmpfs) and upstream refusing: tags (fresh and stale), manifests by digest and blobs "
                 "already stored are still served; nothing stored is evicted for space it cannot win",
    # readiness
    "R-READY-01": "upstream is a listener that accepts and never answers: /debug/ready answers 200 "
                  "within about a second every time (store writable), reporting the link as not "
                  "known reachable, then unreachable once the background probe times out",
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
    # credentials: whose account an upstream request uses
    "R-CRED-01": "a Range on a blob still in flight waits for it, and its reopening upstream (the blob "
                 "went uncached: over the quota) carries the same client's token, never the node's",
    "R-CRED-02": "a client's token refused mid-fetch (the resume's Range GET answered 401) with no "
                 "other client waiting: the fetch fails, the client is cut short; the node's own "
                 "account is never tried (no token request for it, no upstream GET with it)",
    # pushes through the node (mirror.passthrough_writes)
    "R-PUSH-01": "a ~200 KB manifest PUT arriving in several pieces with pauses (chunked, or with "
                 "Content-Length): read to its end, lands upstream byte-identical, pulls back identical",
    "R-PUSH-02": "a manifest PUT past mirror.manifest_max_size (announced, or chunked): 413 "
                 "MANIFEST_INVALID (JSON) and nothing relayed upstream",
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
    await assert_nothing_published(node, digest)
    assert faults.count("GET", "/blobs/") == 2  # one retry (without the waiters), then given up
    faults.clear()
    await assert_served_now(node, image, digest, data)


STALL_MARGIN = 2.0  # generous for a loaded 2-core machine, and clearly below retries x read_timeout


@pytest.mark.parametrize(("case_id", "kind", "fault"), [
    ("R-UP-28", "blob", F.hang()), ("R-UP-28", "blob", F.stall(after=100_000)),
    ("R-UP-28", "blob-range", F.stall(after=100_000)), ("R-UP-28", "manifest", F.hang())],
    ids=["R-UP-28-blob-no-headers", "R-UP-28-blob-mid-body", "R-UP-28-range-mid-body",
         "R-UP-28-manifest-no-headers"])
async def test_stall_bounds_every_waiting_client(make_mirror, faults, upstream, upstream_client,
                                                 case_id, kind, fault) -> None:
    read_timeout, retries = 1.0, 4
    node = await make_mirror(faults.url, upstream={"read_timeout": "1s", "retries": retries})
    image = await push(upstream_client, upstream, size=512 * 1024)
    digest, data = image.layers[0]
    where = "/manifests/" if kind == "manifest" else "/blobs/"
    url = f"/v2/{image.repo}/manifests/v1" if kind == "manifest" else f"/v2/{image.repo}/blobs/{digest}"
    headers = {"Range": "bytes=0-99"} if kind == "blob-range" else None  # waits for the whole blob
    faults.inject(fault, method="GET", path=where, times=None)

    async def waiter(client: httpx.AsyncClient) -> tuple[Got, float]:
        started = time.monotonic()
        got = await get(client, url, headers)
        return got, time.monotonic() - started

    async with node.client(headers=ACCEPT) as client:
        results = await asyncio.gather(waiter(client), waiter(client))
    for got, waited in results:
        print(f"{case_id} {kind} {fault.kind}: answered in {waited:.2f}s (status {got.status})")
        assert waited < read_timeout + STALL_MARGIN < (retries + 1) * read_timeout, waited
        if fault.kind == "hang" or kind == "blob-range":
            assert got.status == 503 and got.complete and error_code(got) == "UNAVAILABLE"
        else:
            assert got.status == 200 and got.short and got.received < len(data)
    deadline = time.monotonic() + 30
    while faults.count("GET", where) < retries + 1:  # the fill retried on without its waiters
        assert time.monotonic() < deadline, faults.count("GET", where)
        await asyncio.sleep(0.1)
    await settled(node, timeout=30)
    assert faults.count("GET", where) == retries + 1


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


@pytest.mark.parametrize(("case_id", "kind", "fault", "retries"), [
    ("R-UP-27", "tag", F.status(503, retry_after=1), 2), ("R-UP-27", "tag", F.drop(), 4),
    ("R-UP-27", "tag-list", F.status(503, retry_after=1), 2)],
    ids=["R-UP-27-503-retry-after", "R-UP-27-dropped", "R-UP-27-tag-list"])
async def test_stale_tag_is_served_at_once(make_mirror, faults, upstream, upstream_client, case_id, kind, fault,
                                           retries) -> None:
    node = await make_mirror(faults.url, tag_ttl="1s", upstream={"retries": retries})
    image = await push(upstream_client, upstream, size=1024)
    if kind == "tag":
        url, method, where = f"/v2/{image.repo}/manifests/v1", "HEAD", "/manifests/"
    else:
        url, method, where = f"/v2/{image.repo}/tags/list", "GET", "/tags/list"
    async with node.client(headers=ACCEPT) as client:
        assert (await get(client, url)).status == 200
        await asyncio.sleep(1.1)
        faults.inject(fault, method=method, path=where, times=None)
        started = time.monotonic()
        stale = await get(client, url)
        answered = time.monotonic()
        again = await get(client, url)  # while the retries run: at once too, no refresh of its own
        again_at = time.monotonic()

        def refreshes() -> list[Any]:
            return [r for r in faults.records if r.method == method and where in r.path_qs
                    and r.started_at >= started]

        deadline = time.monotonic() + 30
        while len(refreshes()) < retries + 1:
            assert time.monotonic() < deadline, len(refreshes())
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    attempts = refreshes()
    print(f"{case_id} {kind}: stale answer in {answered - started:.2f}s; retries done "
          f"{attempts[-1].started_at - started:.2f}s after the request")
    for got in (stale, again):
        assert got.status == 200
        if kind == "tag":
            assert got.body == image.manifest
        else:
            assert json.loads(got.body)["tags"] == ["v1"]
    assert len(attempts) == retries + 1  # one refresh, its retries in the background
    assert answered < attempts[-1].started_at and again_at < attempts[-1].started_at
    faults.clear()
    async with node.client(headers=ACCEPT) as client:
        assert (await get(client, url)).status == 200


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
    monkeypatch.setattr(blobstore.BlobStore, "fill_writer", broken)  # a blob fetch's temp file
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
        hot = await get(client, f"/v2/{image.repo}/manifests/{image.digest}")  # the verified copy in memory
    assert hot.status == 200 and hot.body == image.manifest
    await node.restart()  # memory gone (or its recheck due): the file is read and re-hashed
    async with node.client(headers=ACCEPT) as client:
        got = await get(client, f"/v2/{image.repo}/manifests/{image.digest}")
    assert got.status == 200 and got.body == image.manifest
    assert faults.count("GET", "/manifests/") == 2
    assert list((node.node.store.root / "quarantine").iterdir())
    assert check_store(node.node.store.root, node.settings.metadata_dir / "metadata.sqlite").problems == []


@pytest.mark.parametrize("case_id", [case("R-DISK-06")])
async def test_full_disk_still_serves_what_is_stored(small_disk, make_mirror, faults, upstream, upstream_client,
                                                     case_id) -> None:
    config = mirror_config(small_disk, faults.url, tag_ttl="1s", upstream={"retries": 1})
    node = await make_mirror(faults.url, config=config)
    try:
        image = await push(upstream_client, upstream, size=256 * 1024)
        other = await push(upstream_client, upstream, size=1024)
        tag_url, digest_url = f"/v2/{image.repo}/manifests/v1", f"/v2/{image.repo}/manifests/{image.digest}"
        async with node.client(headers=ACCEPT) as client:
            assert (await get(client, tag_url)).status == 200
            for digest in image.blobs:
                assert (await get(client, f"/v2/{image.repo}/blobs/{digest}")).complete
            await settled(node)
            await asyncio.to_thread(fill, small_disk / "filler")
            failed = await get(client, f"/v2/{other.repo}/manifests/{other.digest}")  # ENOSPC storing it
            assert failed.status == 503 and error_code(failed) == "UNAVAILABLE"
            quota = node.node.quota
            for _ in range(200):  # the disk-full recovery runs in the background
                if not quota.reserve_path.exists() and len(quota._tasks) <= 2:
                    break
                await asyncio.sleep(0.02)
            assert not quota.reserve_path.exists()
            await asyncio.sleep(0.3)
            faults.inject(F.status(503), times=None)  # and upstream refuses everything
            for _ in range(2):  # fresh, then stale (past the 1 s TTL)
                tag = await get(client, tag_url)
                by_digest = await get(client, digest_url)
                blobs = [await get(client, f"/v2/{image.repo}/blobs/{d}") for d in image.blobs]
                assert tag.status == 200 and tag.body == image.manifest, tag
                assert by_digest.status == 200 and by_digest.body == image.manifest
                assert [(b.status, b.complete, b.digest) for b in blobs] == [(200, True, d) for d in image.blobs]
                await asyncio.sleep(1.1)
        assert all(node.node.store.path(Digest.parse(d)).exists() for d in image.blobs)
    finally:
        await node.stop()


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


# --------------------------------------------------------------------------- credentials


@pytest.fixture(scope="module")
def central_ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.token_issuer import make_ca

    return make_ca(tmp_path_factory.mktemp("cred-pki"), name="central")


async def _central_image(central: Any, repo: str, size: int) -> Any:
    async with httpx.AsyncClient(timeout=30) as seed:
        return await images.push_image(seed, central.registry.url, repo, "v1", layers=[size],
                                       headers={"Authorization": f"Bearer {central.admin_token(repo)}"})


def _client_token(central: Any, repo: str) -> str:
    from tests.support.authenv import pull_access

    return str(central.ca.mint(audience=central.service, subject="alice", access=pull_access(repo)))


def _blob_authorizations(link: Any) -> list[str | None]:
    return [{k.lower(): v for k, v in (r.request_headers or {}).items()}.get("authorization")
            for r in link.records if "/blobs/" in r.path_qs and r.method == "GET"]


@pytest.mark.parametrize("case_id", [case("R-CRED-01")])
async def test_range_after_commit_keeps_the_clients_token(make_mirror, central_ca, tmp_path, case_id) -> None:
    from tests.support.authenv import Central, node_config
    from tests.support.relay import run_relay

    repo = repo_name()
    users = {"mirror-bot": ("bot-pw", {repo: {"pull"}})}  # the node's account could pull it
    with Central(tmp_path, central_ca, users=users) as central, run_relay(central.registry.url) as link:
        image = await _central_image(central, repo, 2 * MiB)
        digest, data = image.layers[0]
        node = await make_mirror(link.url, config=node_config(
            tmp_path, link.url, auth={"token": central.token_block},
            proxy={"username": "mirror-bot", "password": "bot-pw"},
            cache={"max_size": "1MiB"}))  # the blob never fits: relayed uncached, reopened
        token = _client_token(central, image.repo)
        async with node.client(headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-99"}) as client:
            got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
        used = _blob_authorizations(link)
        issued = [user for user, _ in central.iter_log()]
    assert got.complete  # a 206 of the range, or (uncached, relayed again) the whole blob
    assert (got.status, got.body) == (206, data[:100]) or (got.status, got.digest) == (200, digest)
    assert len(used) == 2, used  # the first fetch, then the reopening after it ended
    assert used == [f"Bearer {token}"] * 2
    assert "mirror-bot" not in issued


@pytest.mark.parametrize("case_id", [case("R-CRED-02")])
async def test_refused_client_token_never_falls_back_to_the_node(make_mirror, central_ca, tmp_path,
                                                                 case_id) -> None:
    from tests.support.authenv import Central, node_config

    repo = repo_name()
    users = {"mirror-bot": ("bot-pw", {repo: {"pull"}})}  # the node's account could finish the fetch
    with Central(tmp_path, central_ca, users=users) as central, FaultRelay(central.registry.url) as link:
        image = await _central_image(central, repo, 2 * MiB)
        digest, data = image.layers[0]
        token = _client_token(central, image.repo)
        node = await make_mirror(link.url, config=node_config(
            tmp_path, link.url, auth={"token": central.token_block},
            proxy={"username": "mirror-bot", "password": "bot-pw"}))

        def clients_resume(rec: Any) -> bool:
            headers = {k.lower(): v for k, v in (rec.request_headers or {}).items()}
            return "range" in headers and headers.get("authorization") == f"Bearer {token}"

        link.inject(F.reset(after=512 * 1024), method="GET", path="/blobs/")
        link.inject(F.status(401), method="GET", path="/blobs/", where=clients_resume, times=None)
        async with node.client(headers={"Authorization": f"Bearer {token}"}) as client:
            got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
        await settled(node)
        used = _blob_authorizations(link)
        issued = [user for user, _ in central.iter_log()]
    assert got.short and got.received < len(data)
    assert len(used) == 2 and used == [f"Bearer {token}"] * 2, used  # the first GET and its resume
    assert "mirror-bot" not in issued
    await assert_nothing_published(node, digest)


# --------------------------------------------------------------------------- pushes


def _padded_manifest(config: bytes, layer: bytes, size: int) -> bytes:
    """An OCI image manifest of about `size` bytes (a long annotation)."""
    import json

    def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
        return {"mediaType": media_type, "size": len(data), "digest": images.sha256_digest(data)}

    return json.dumps({
        "schemaVersion": 2, "mediaType": images.OCI_MANIFEST,
        "config": descriptor(images.OCI_CONFIG, config), "layers": [descriptor(images.OCI_LAYER, layer)],
        "annotations": {"org.example.padding": uuid.uuid4().hex * (size // 32)},
    }).encode()


async def _in_pieces(body: bytes, pieces: int, pause: float = 0.2) -> Any:
    step = -(-len(body) // pieces)
    for start in range(0, len(body), step):
        yield body[start:start + step]
        await asyncio.sleep(pause)  # each piece arrives on its own


async def _push_manifest_in_pieces(node: Any, repo: str, tag: str, body: bytes, announce: bool) -> httpx.Response:
    headers = {"Content-Type": images.OCI_MANIFEST}
    if announce:
        headers["Content-Length"] = str(len(body))  # else chunked transfer encoding
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.put(f"{node.url}/v2/{repo}/manifests/{tag}", headers=headers,
                                content=_in_pieces(body, 5))


@pytest.mark.parametrize(("case_id", "announce"), [("R-PUSH-01", False), ("R-PUSH-01", True)],
                         ids=["R-PUSH-01-chunked", "R-PUSH-01-length"])
async def test_big_manifest_push_in_pieces(make_mirror, relay, upstream, upstream_client, case_id,
                                           announce) -> None:
    node = await make_mirror(relay.url, passthrough_writes=True, tag_ttl="1h")
    repo = repo_name()
    config, layer = b'{"architecture":"amd64","os":"linux"}', images.make_layer("big-manifest", 2048)
    for data in (config, layer):
        await images.push_blob(upstream_client, upstream.url, repo, data)
    body = _padded_manifest(config, layer, 200_000)
    digest = images.sha256_digest(body)
    pushed = await _push_manifest_in_pieces(node, repo, "v1", body, announce)
    assert pushed.status_code == 201, pushed.text
    assert pushed.headers["Docker-Content-Digest"] == digest
    direct = await upstream_client.get(f"{upstream.url}/v2/{repo}/manifests/{digest}",
                                       headers={"Accept": images.OCI_MANIFEST})
    assert direct.status_code == 200 and direct.content == body  # byte-identical upstream
    async with node.client(headers={"Accept": images.OCI_MANIFEST}) as client:
        by_tag = await client.get(f"/v2/{repo}/manifests/v1")
        by_digest = await client.get(f"/v2/{repo}/manifests/{digest}")
    assert by_tag.content == by_digest.content == body
    assert by_tag.headers["Docker-Content-Digest"] == digest


@pytest.mark.parametrize(("case_id", "announce"), [("R-PUSH-02", False), ("R-PUSH-02", True)],
                         ids=["R-PUSH-02-chunked", "R-PUSH-02-length"])
async def test_manifest_push_past_the_cap_is_413(make_mirror, relay, case_id, announce) -> None:
    node = await make_mirror(relay.url, passthrough_writes=True, manifest_max_size="64KiB")
    body = _padded_manifest(b"{}", b"layer", 100_000)
    refused = await _push_manifest_in_pieces(node, repo_name(), "v1", body, announce)
    assert refused.status_code == 413
    assert refused.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    assert relay.count("PUT", "/manifests/") == 0
# --------------------------------------------------------------------------- readiness


@contextlib.contextmanager
def black_hole() -> Any:
    """A listener that accepts connections and never answers (a link that drops silently)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


READY_BOUND = 2.5  # the issue's 1 s, with room for a loaded machine; below the shipped probes' 3 s


@pytest.mark.parametrize("case_id", [case("R-READY-01")])
async def test_readiness_never_waits_on_the_link(make_mirror, case_id) -> None:
    from aiohttp import web

    from mirror.api.debug import create_debug_app
    from mirror.upstream.health import PROBE_TIMEOUT

    with black_hole() as url:
        node = await make_mirror(url)  # the default client timeouts: 10 s connect, 60 s read
        runner = web.AppRunner(create_debug_app(node.node))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        debug_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        answers: list[tuple[float, dict[str, Any]]] = []
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                deadline = time.monotonic() + PROBE_TIMEOUT + 10
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    ready = await client.get(f"{debug_url}/debug/ready")
                    answers.append((time.monotonic() - started, ready.json()))
                    assert ready.status_code == 200 and ready.json()["store_writable"] is True
                    if ready.json()["upstream_reachable"] is False:
                        break
                    await asyncio.sleep(0.5)
        finally:
            await runner.cleanup()
    print("readiness answered in " + ", ".join(f"{t:.2f}s" for t, _ in answers))
    assert all(took < READY_BOUND for took, _ in answers), answers
    assert answers[0][1]["upstream_reachable"] is not True
    last = answers[-1][1]
    assert last["upstream_reachable"] is False and "Timeout" in last["upstream"]["error"], last
    assert len(answers) >= 3  # the probe pending in the background for a while, answers meanwhile


def test_case_table_is_complete() -> None:
    """Every case ID of the table is the id of a test in this module."""
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2, case_id
