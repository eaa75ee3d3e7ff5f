"""Bit rot and clients that take nothing: each provoked failure with a case ID.

Bytes are flipped in the real store files (size and mtime kept, as a failing
disk does), the upstream is the real distribution behind the fault relay,
and the slow clients are raw sockets with a small receive buffer. `CASES`
feeds README's Reliability table, as in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.registry.digest import Digest
from mirror.storage import scrub
from tests.support import images
from tests.test_reliability import faults, get, push, repo_name, settled  # noqa: F401 - faults is a fixture

MiB = 1 << 20

CASES = {
    "R-ROT-01": "a byte flipped in a stored 4 MiB blob (size and mtime kept), node restarted: the first "
                "GET is cut short of Content-Length (never a complete 200 with wrong bytes), the object "
                "is quarantined and forgotten; the next GET refetches from upstream and is correct",
    "R-ROT-02": "a byte flipped in a stored blob of at most 1 MiB: hashed before sending, so the same "
                "GET refetches it and answers 200 with the right bytes",
    "R-ROT-03": "a Range GET of an unverified stored blob with a flipped byte: the whole object is "
                "hashed first; quarantined, refetched, and the 206 carries the right bytes",
    "R-ROT-04": "the background scrub (mirror.scrub.interval 1s) finds a flipped byte: quarantined, "
                "forgotten, counted (mirror_corrupt_objects_total{found_by=scrub}); refetched on demand",
    "R-ROT-05": "a blob verified on its first serve is sent without hashing afterwards (one hash per "
                "process; none for a blob this process fetched); a verified-then-rotten blob is left "
                "to the scrub",
    "R-CL-06": "a client reading 1 byte/s through a 4 KiB receive buffer (client_idle_timeout 2s), "
               "from a stored blob (sendfile), a fetch in flight (read-along) or a 300 KB manifest: "
               "cut within the timeout plus a margin",
}


def case(case_id: str) -> str:
    assert case_id in CASES, case_id
    return case_id


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte in place, keeping size and modification time (bit rot)."""
    st = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def quarantined(node: Any, digest: str) -> list[Path]:
    hex_ = digest.split(":", 1)[1]
    return [p for p in (node.node.store.root / "quarantine").iterdir() if hex_ in p.name]


def corrupt_count(node: Any, found_by: str) -> float:
    value = node.node.metrics.registry.get_sample_value("mirror_corrupt_objects_total", {"found_by": found_by})
    return value or 0.0


async def cached_blob(node: Any, faults: Any, upstream: Any, upstream_client: Any, size: int) -> tuple[Any, str, bytes]:
    """Push an image upstream and pull its layer through the node once (stored)."""
    image = await push(upstream_client, upstream, size=size)
    digest, data = image.layers[0]
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest) == (200, True, digest)
    await settled(node)
    return image, digest, data


# --------------------------------------------------------------------------- bit rot


@pytest.mark.parametrize("case_id", [case("R-ROT-01")])
async def test_rotten_blob_is_cut_quarantined_and_refetched(make_mirror, faults, upstream, upstream_client,
                                                            case_id) -> None:
    node = await make_mirror(faults.url)
    image, digest, data = await cached_blob(node, faults, upstream, upstream_client, 4 * MiB)
    flip_byte(node.node.store.path(Digest.parse(digest)), 2 * MiB)
    await node.restart()
    url = f"/v2/{image.repo}/blobs/{digest}"
    async with node.client() as client:
        first = await get(client, url)
        assert first.status == 200 and first.length == len(data)
        assert first.short and first.received < len(data), first  # never a whole body with wrong bytes
        assert quarantined(node, digest)
        assert await node.node.metadata.get_object(Digest.parse(digest)) is None
        assert corrupt_count(node, "serve") == 1
        fetches = faults.count("GET", "/blobs/")
        second = await get(client, url)
    assert (second.status, second.complete, second.digest, second.received) == (200, True, digest, len(data))
    assert faults.count("GET", "/blobs/") == fetches + 1  # refetched from the real upstream
    await settled(node)
    assert node.node.store.path(Digest.parse(digest)).read_bytes() == data


@pytest.mark.parametrize("case_id", [case("R-ROT-02")])
async def test_small_rotten_blob_is_refetched_in_the_same_request(make_mirror, faults, upstream, upstream_client,
                                                                  case_id) -> None:
    node = await make_mirror(faults.url)
    image, digest, data = await cached_blob(node, faults, upstream, upstream_client, 512 * 1024)
    assert len(data) <= MiB
    flip_byte(node.node.store.path(Digest.parse(digest)), len(data) // 2)
    await node.restart()
    fetches = faults.count("GET", "/blobs/")
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest, got.received) == (200, True, digest, len(data))
    assert faults.count("GET", "/blobs/") == fetches + 1
    assert quarantined(node, digest) and corrupt_count(node, "serve") == 1


@pytest.mark.parametrize("case_id", [case("R-ROT-03")])
async def test_range_of_rotten_blob_is_served_from_a_refetch(make_mirror, faults, upstream, upstream_client,
                                                             case_id) -> None:
    node = await make_mirror(faults.url)
    image, digest, data = await cached_blob(node, faults, upstream, upstream_client, 4 * MiB)
    flip_byte(node.node.store.path(Digest.parse(digest)), 3 * MiB + 5)
    await node.restart()
    start, end = 3 * MiB, 3 * MiB + 99
    async with node.client() as client:
        response = await client.get(f"/v2/{image.repo}/blobs/{digest}", headers={"Range": f"bytes={start}-{end}"})
    assert response.status_code == 206
    assert response.content == data[start:end + 1]
    assert quarantined(node, digest) and corrupt_count(node, "serve") == 1


@pytest.mark.parametrize("case_id", [case("R-ROT-04")])
async def test_scrub_finds_a_flipped_byte(make_mirror, faults, upstream, upstream_client, case_id) -> None:
    node = await make_mirror(faults.url, scrub={"interval": "1s"})
    image, digest, data = await cached_blob(node, faults, upstream, upstream_client, 2 * MiB)
    flip_byte(node.node.store.path(Digest.parse(digest)), 1000)
    registry = node.node.metrics.registry
    deadline = time.monotonic() + 30
    while corrupt_count(node, "scrub") < 1:
        assert time.monotonic() < deadline, "the scrub did not find the flipped byte"
        await asyncio.sleep(0.1)
    assert quarantined(node, digest)
    assert await node.node.metadata.get_object(Digest.parse(digest)) is None
    assert (registry.get_sample_value("mirror_scrub_bytes_total") or 0) >= len(data) - 1000
    while not registry.get_sample_value("mirror_scrub_last_complete_pass_timestamp_seconds"):
        assert time.monotonic() < deadline, "no complete scrub pass"
        await asyncio.sleep(0.1)
    fetches = faults.count("GET", "/blobs/")
    async with node.client() as client:
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest) == (200, True, digest)
    assert faults.count("GET", "/blobs/") == fetches + 1


@pytest.mark.parametrize("case_id", [case("R-ROT-05")])
async def test_verified_blob_is_hashed_once_per_process(make_mirror, faults, upstream, upstream_client,
                                                        monkeypatch, case_id) -> None:
    node = await make_mirror(faults.url)
    hashed: list[Digest] = []
    real = scrub.hash_fd

    def counting(fd: int, dgst: Digest) -> bool:
        hashed.append(dgst)
        return real(fd, dgst)

    monkeypatch.setattr(scrub, "hash_fd", counting)
    image, digest, data = await cached_blob(node, faults, upstream, upstream_client, 4 * MiB)
    async with node.client() as client:  # fetched by this process: verified as it was written
        got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
    assert (got.status, got.complete, got.digest) == (200, True, digest) and hashed == []
    await node.restart()
    async with node.client() as client:
        for _ in range(3):
            got = await get(client, f"/v2/{image.repo}/blobs/{digest}")
            assert (got.status, got.complete, got.digest) == (200, True, digest)
    assert hashed == [Digest.parse(digest)]
    assert node.node.integrity.is_verified(Digest.parse(digest))


async def test_blobs_are_copied_where_the_loop_has_no_sendfile(make_mirror, faults, upstream, upstream_client,
                                                              monkeypatch) -> None:
    """uvloop's loop.sendfile raises NotImplementedError: stored and in-flight blobs are copied instead."""

    async def no_sendfile(*_args: Any, **_kwargs: Any) -> int:
        raise NotImplementedError

    node = await make_mirror(faults.url)
    monkeypatch.setattr(asyncio.get_running_loop(), "sendfile", no_sendfile)
    image = await push(upstream_client, upstream, size=12 * MiB)
    digest, data = image.layers[0]
    url = f"/v2/{image.repo}/blobs/{digest}"
    async with node.client() as client:
        in_flight = await get(client, url)
        await settled(node)
        stored = await get(client, url)
    await node.restart()  # nothing verified in the new node: hashed while copied
    async with node.client() as client:
        hashed_while_copied = await get(client, url)
    for got in (in_flight, stored, hashed_while_copied):
        assert (got.status, got.complete, got.digest, got.received) == (200, True, digest, len(data))


# --------------------------------------------------------------------------- clients


async def trickle_reader(port: int, path: str, seconds: float, rcvbuf: int = 4096,
                         accept: str = "*/*") -> float | None:
    """GET `path` through a `rcvbuf` receive buffer, one byte a second; seconds until cut, or None."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: node\r\nAccept: {accept}\r\n\r\n".encode())
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if _peer_closed(sock):
                return time.monotonic() - started
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1), 1.0)
            except TimeoutError:
                continue
            except OSError:  # reset by the node
                return time.monotonic() - started
            if not data:
                return time.monotonic() - started
            await asyncio.sleep(1.0)
        return None
    finally:
        sock.close()


def _peer_closed(sock: socket.socket) -> bool:
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (7, 8)  # TCP_CLOSE, TCP_CLOSE_WAIT: reset or FIN, whatever is still buffered here


async def big_manifest(upstream_client: Any, upstream: Any, pad: int) -> tuple[str, str, bytes]:
    """Push an OCI manifest padded to about `pad` bytes with an annotation; (repo, digest, bytes)."""
    repo = repo_name()
    image = await images.push_image(upstream_client, upstream.url, repo, "small",
                                    layers=(1024,), media_type=images.OCI_MANIFEST)
    manifest = json.loads(image.manifest)
    manifest["annotations"] = {"org.example.pad": "x" * pad}
    body = json.dumps(manifest).encode()
    await images.push_manifest(upstream_client, upstream.url, repo, "big", body, images.OCI_MANIFEST)
    return repo, images.sha256_digest(body), body


@pytest.mark.parametrize(("case_id", "source"), [
    (case("R-CL-06"), "stored"), (case("R-CL-06"), "read-along"), (case("R-CL-06"), "manifest")])
async def test_one_byte_per_second_reader_is_cut(make_mirror, faults, upstream, upstream_client, case_id,
                                                 source) -> None:
    idle = 2.0
    node = await make_mirror(faults.url, client_idle_timeout="2s")
    if source == "manifest":
        repo, _digest, _body = await big_manifest(upstream_client, upstream, 300_000)
        path = f"/v2/{repo}/manifests/big"
        async with node.client() as client:  # cached first: the slow read is of a stored manifest
            assert (await client.get(path, headers={"Accept": images.OCI_MANIFEST})).status_code == 200
    else:
        image = await push(upstream_client, upstream, size=16 * MiB)
        digest, _data = image.layers[0]
        path = f"/v2/{image.repo}/blobs/{digest}"
        if source == "stored":
            await cached_blob_at(node, path)
        else:
            faults.rate = 4 * MiB  # the fetch lasts about 4 s: the reader reads along
    cut_after = await trickle_reader(node.port, path, seconds=30, accept=images.OCI_MANIFEST)
    assert cut_after is not None, "a 1 byte/s client was never cut"
    assert cut_after < idle + 4.0, cut_after  # the timeout, one watch tick, and a margin for a loaded machine


async def cached_blob_at(node: Any, path: str) -> None:
    async with node.client() as client:
        got = await get(client, path)
    assert (got.status, got.complete) == (200, True)
    await settled(node)


def test_case_table_is_complete() -> None:
    """Every case ID of the table is the id of a test in this module."""
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2, case_id


def test_verified_digests_are_bounded() -> None:
    """The per-process set of verified digests forgets the oldest beyond its limit."""
    integrity = scrub.Integrity(None, None, None, None, limit=2)  # type: ignore[arg-type]
    digests = [Digest.parse(images.sha256_digest(bytes([i]))) for i in range(3)]
    for digest in digests:
        integrity.remember(digest)
    assert [integrity.is_verified(d) for d in digests] == [False, True, True]
