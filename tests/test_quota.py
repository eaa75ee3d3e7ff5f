"""Disk quota and eviction against the real upstream: reservations, LRU, pins, readers, full disks."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror.registry.digest import Digest
from mirror.storage.quota import RelayBuffer
from mirror.storage.verify import store_bytes, verify_store
from tests.conftest import mirror_config
from tests.support import images
from tests.support.waits import wait_until

MiB = 1024 * 1024


def repo_name() -> str:
    return f"quota/app-{uuid.uuid4().hex[:8]}"


async def push_blobs(client: httpx.AsyncClient, base_url: str, repo: str, *sizes: int) -> list[tuple[str, bytes]]:
    blobs = []
    for size in sizes:
        data = os.urandom(size)
        blobs.append((await images.push_blob(client, base_url, repo, data), data))
    return blobs


def stored(node, digest: str) -> bool:
    return node.node.store.path(Digest.parse(digest)).exists()


def part_files(node) -> list[Path]:
    return list((node.node.store.root / "tmp").glob("*.part"))


async def get_blob(client: httpx.AsyncClient, repo: str, digest: str) -> httpx.Response:
    return await client.get(f"/v2/{repo}/blobs/{digest}")


async def test_concurrent_fetches_never_overshoot_the_quota(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, cache={"max_size": "24MiB", "high_watermark": 0.75, "low_watermark": 0.5})
    quota = node.node.quota
    root = node.node.store.root
    repo = repo_name()
    blobs = await push_blobs(upstream_client, upstream.url, repo, *[3 * MiB - 4096] * 10)
    samples: list[tuple[int, int]] = []
    concurrency: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            before = quota.reserved
            size = await asyncio.to_thread(store_bytes, root)
            samples.append((size, max(before, quota.reserved)))
            concurrency.append(len(node.node.fetcher.inflight))
            await asyncio.sleep(0.005)

    async with node.client() as client:
        for digest, data in blobs[:4]:  # 12 MiB stored: under the 18 MiB high watermark
            assert (await get_blob(client, repo, digest)).content == data
        sampler = asyncio.create_task(sample())
        relay.rate = 8 * MiB  # six 3 MiB fetches share the link for about 2 s
        responses = await asyncio.gather(*(get_blob(client, repo, d) for d, _ in blobs[4:]))
        stop.set()
        await sampler
    assert [r.content for r in responses] == [data for _, data in blobs[4:]]
    assert max(concurrency) >= 4
    assert max(size for size, _ in samples) > 12 * MiB
    overshoots = [(size, reserved) for size, reserved in samples if size > quota.high + reserved]
    assert not overshoots, f"store above the high watermark plus reservations: {overshoots[:5]}"
    assert store_bytes(root) <= quota.high
    assert all(stored(node, d) for d, _ in blobs[4:])  # every fetch was admitted and cached
    # Clients have every byte once a blob is published; its metadata and quota records follow.
    await wait_until(lambda: not node.node.fetcher.inflight, what="the fetches' records")
    assert quota.used == sum(len(data) for d, data in blobs if stored(node, d))
    assert quota.reserved == 0


async def test_least_recently_used_is_evicted_first(make_mirror, relay, upstream, upstream_client) -> None:
    # 4 blobs (12 MiB) fit under the 14 MiB high watermark; a 5th evicts exactly one (down to 12 MiB).
    node = await make_mirror(relay.url, cache={"max_size": "20MiB", "high_watermark": 0.7, "low_watermark": 0.6})
    repo = repo_name()
    a, b, c, d, e, f = await push_blobs(upstream_client, upstream.url, repo, *[3 * MiB] * 6)
    async with node.client() as client:
        for digest, _ in (a, b, c, d):
            await get_blob(client, repo, digest)
            await asyncio.sleep(0.01)
        assert (await get_blob(client, repo, a[0])).content == a[1]  # a is now the most recent
        await asyncio.sleep(0.01)
        await get_blob(client, repo, e[0])
        assert [stored(node, x[0]) for x in (a, b, c, d, e)] == [True, False, True, True, True]
        await asyncio.sleep(0.01)
        await get_blob(client, repo, f[0])
        assert [stored(node, x[0]) for x in (a, b, c, d, e, f)] == [True, False, False, True, True, True]
        assert (await get_blob(client, repo, b[0])).content == b[1]  # evicted: refetched on demand
    assert relay.count("GET", b[0]) == 2 and relay.count("GET", a[0]) == 1


async def test_pinned_content_survives_filling_past_the_quota(make_mirror, relay, upstream,
                                                              upstream_client) -> None:
    node = await make_mirror(relay.url, cache={"max_size": "12MiB", "high_watermark": 0.75, "low_watermark": 0.5})
    repo = repo_name()
    pinned, *others = await push_blobs(upstream_client, upstream.url, repo, *[3 * MiB - 4096] * 6)
    async with node.client() as client:
        await get_blob(client, repo, pinned[0])
        await node.node.ops.pin(repo, "blob", Digest.parse(pinned[0]), [])
        for digest, data in others:
            assert (await get_blob(client, repo, digest)).content == data
        relay.down = True  # the pinned blob is still served from the store
        assert (await get_blob(client, repo, pinned[0])).content == pinned[1]
    assert stored(node, pinned[0])
    assert store_bytes(node.node.store.root) <= node.node.quota.high
    assert node.node.metrics.evictions._value.get() >= 3
    await node.node.ops.unpin(repo, "blob")
    await node.node.quota.gc(0)
    assert not stored(node, pinned[0])


async def test_a_blob_that_cannot_fit_is_relayed_uncached(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, cache={"max_size": "8MiB", "high_watermark": 0.75, "low_watermark": 0.5})
    repo = repo_name()
    first, second, big = await push_blobs(upstream_client, upstream.url, repo, 3 * MiB - 4096, 3 * MiB - 4096,
                                          3 * MiB)
    async with node.client() as client:
        for digest, _ in (first, second):
            await get_blob(client, repo, digest)
        await node.node.ops.pin(repo, "both", Digest.parse(first[0]), [Digest.parse(second[0])])  # everything stored is pinned: nothing to evict
        for _ in range(2):
            response = await get_blob(client, repo, big[0])
            assert response.status_code == 200 and response.content == big[1]
    assert not stored(node, big[0]) and not part_files(node)
    assert relay.count("GET", big[0]) == 2  # not cached, so fetched each time
    assert stored(node, first[0]) and stored(node, second[0])
    assert node.node.quota.reserved == 0


async def test_a_blob_being_read_is_not_evicted(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    (digest, data), = await push_blobs(upstream_client, upstream.url, repo, 32 * MiB)
    quota = node.node.quota
    async with node.client() as client:
        await get_blob(client, repo, digest)  # stored
        async with client.stream("GET", f"/v2/{repo}/blobs/{digest}") as response:
            stream = response.aiter_raw()
            received = len(await stream.__anext__())
            assert quota.readers[digest] == 1  # sendfile still has most of 32 MiB to send
            assert (await quota.gc(0))["evicted"] == 0
            assert stored(node, digest)
            hasher = hashlib.sha256(data[:received])
            async for chunk in stream:
                hasher.update(chunk)
                received += len(chunk)
        assert received == len(data) and f"sha256:{hasher.hexdigest()}" == digest
    for _ in range(1000):  # the reader's count drops once sendfile is done (up to 10 s)
        if not quota.readers:
            break
        await asyncio.sleep(0.01)
    assert (await quota.gc(0))["evicted"] == 1
    assert not stored(node, digest)


async def test_access_times_are_flushed_in_batches(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    (digest, _), = await push_blobs(upstream_client, upstream.url, repo, 1000)
    metadata = node.node.metadata

    async def last_access() -> float:
        return await metadata.transact(lambda db: db.execute(
            "SELECT last_access FROM objects WHERE digest=?", (digest,)).fetchone()[0])

    async with node.client() as client:
        await get_blob(client, repo, digest)
        await node.node.quota.tick()
        before = await last_access()
        await asyncio.sleep(0.02)
        await get_blob(client, repo, digest)
        assert await last_access() == before  # only in memory so far
        await node.node.quota.tick()
        assert await last_access() > before


def test_relay_buffer_cuts_a_reader_that_fell_behind() -> None:
    data = os.urandom(10_000)
    digest = Digest.of(data)
    hasher = digest.hasher()
    hasher.update(data[:1000])
    ring = RelayBuffer(1000, hasher, len(data), limit=4000)
    for offset in range(1000, len(data), 1000):
        ring.append(data[offset:offset + 1000])
    assert ring.first == 6000 and ring.read(9500, 100) == data[9500:9600]
    with pytest.raises(Exception, match="behind"):
        ring.read(5000, 100)
    ring.verify(digest)
    with pytest.raises(Exception, match="announced"):
        ring.append(b"x")


# -- a real full disk -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs for the store and its metadata (tests run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True,
                       capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small tmpfs for the full-disk test")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"mounting a tmpfs is not permitted here ({exc.stderr.strip()}): needs root/CAP_SYS_ADMIN")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def fill(path: Path) -> int:
    """Write `path` until the disk is full; returns its size."""
    written = 0
    chunk = b"\0" * (64 * 1024)
    with open(path, "wb", buffering=0) as handle:
        while True:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for size in (4096, 512, 1):  # the last few bytes too
            while True:
                try:
                    written += handle.write(b"\0" * size)
                except OSError:
                    break
    return written


async def test_full_disk_clients_are_served_and_nothing_corrupt_is_published(
        small_disk, make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, config=mirror_config(small_disk, relay.url))
    try:
        quota = node.node.quota
        assert quota.reserve_path.exists()  # metadata shares the tmpfs: a reserve is kept
        repo = repo_name()
        (small, small_data), (layer, layer_data), (huge, _) = await push_blobs(
            upstream_client, upstream.url, repo, 1 * MiB, 4 * MiB, 9 * MiB)
        async with node.client() as client:
            # Before headers: no room at all -> 503 with Retry-After, nothing left behind.
            refused = await get_blob(client, repo, huge)
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert (await get_blob(client, repo, small)).content == small_data

            # Mid-stream: another process fills the disk while a 4 MiB blob is being fetched.
            relay.rate = 2 * MiB
            filler = small_disk / "filler"
            hasher, received, filled = hashlib.sha256(), 0, False
            async with client.stream("GET", f"/v2/{repo}/blobs/{layer}") as response:
                assert response.status_code == 200
                fetch = node.node.fetcher.get(Digest.parse(layer))
                async for chunk in response.aiter_raw():
                    hasher.update(chunk)
                    received += len(chunk)
                    if received >= 256 * 1024 and not filled:
                        await asyncio.to_thread(fill, filler)
                        filled = True
            assert received == len(layer_data) and f"sha256:{hasher.hexdigest()}" == layer
            assert fetch is not None and fetch.relay is not None  # it went uncached
            relay.rate = None
            assert not stored(node, layer) and not part_files(node)
            for _ in range(1000):  # the reserve release runs in the background (up to 20 s)
                if not quota.reserve_path.exists():
                    break
                await asyncio.sleep(0.02)
            assert not quota.reserve_path.exists()  # given to SQLite
            assert stored(node, small)  # a full disk costs only new fills (R-DISK-06)
            assert (await get_blob(client, repo, small)).content == small_data

            # While the disk is full, a new request is refused before headers.
            busy = await get_blob(client, repo, layer)
            assert busy.status_code == 503 and busy.headers["Retry-After"]

            # Space comes back: the node recovers by itself.
            filler.unlink()
            await quota.tick()
            assert quota.reserve_path.exists()
            again = await get_blob(client, repo, layer)
            assert again.status_code == 200 and again.content == layer_data
            assert stored(node, layer)
        report = await asyncio.to_thread(verify_store, node.node.store)
        assert report.corrupt == 0 and report.ok == report.checked >= 1
        assert quota.reserved == 0
    finally:
        await node.stop()


async def test_a_percentage_quota_is_a_share_of_the_store_filesystem(make_mirror, relay) -> None:
    node = await make_mirror(relay.url, cache={"max_size": "50%", "high_watermark": 0.9, "low_watermark": 0.8})
    stat = os.statvfs(node.node.store.root)
    quota = node.node.quota
    assert quota.limit == int(stat.f_blocks * stat.f_frsize * 0.5)
    assert quota.high == int(quota.limit * 0.9) and quota.low == int(quota.limit * 0.8)
