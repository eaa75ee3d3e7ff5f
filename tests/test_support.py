"""Prove the test-support helpers against the real things (distribution 2.8, skopeo)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA2,
    MANIFEST_ACCEPT,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    build_image,
    diff_id_of,
    make_layer,
    make_layer_with_diff_id,
    push_blob,
    push_blob_chunked,
    push_image,
    push_index,
    sha256_digest,
)
from tests.support.procs import (
    ManagedProcess,
    free_port,
    run_skopeo_async,
    wait_http,
)
from tests.support.registry import Registry, TokenIssuer, run_registry
from tests.support.relay import EventSink, Relay, RelayRequest

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with run_registry() as reg:
        yield reg


@pytest.fixture
def relay(registry: Registry) -> Iterator[Relay]:
    with Relay(registry.url) as r:
        yield r


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="support-test-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def client() -> httpx.AsyncClient:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


# --------------------------------------------------------------------------- procs


def test_free_port_and_managed_process(scratch: Path) -> None:
    port = free_port()
    assert 1024 < port < 65536
    proc = ManagedProcess(
        ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=scratch
    )
    with proc:
        assert proc.pid is not None and proc.running
        assert wait_http(f"http://127.0.0.1:{port}/", process=proc) == 200
        log_dir = proc.log_path.parent
    assert not proc.running
    assert proc.returncode is not None
    assert not log_dir.exists()  # its own temp dir is removed

    # a process that dies at once: wait_http fails fast and shows the log
    bad = ManagedProcess(["sh", "-c", "echo boom >&2; exit 3"])
    with bad:
        with pytest.raises(RuntimeError, match="boom"):
            wait_http(f"http://127.0.0.1:{free_port()}/", process=bad, timeout=30)
        assert bad.poll() == 3


# --------------------------------------------------------------------------- images


def test_layers_are_real_deterministic_tars() -> None:
    a, did = make_layer_with_diff_id("seed", 10_000)
    assert make_layer("seed", 10_000) == a
    assert make_layer("other", 10_000) != a
    tar_bytes = gzip.decompress(a)
    assert sha256_digest(tar_bytes) == did == diff_id_of(a)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        members = tf.getmembers()
        assert len(members) == 1 and members[0].isfile() and members[0].size == 10_000

    t = time.monotonic()
    big = make_layer(7, 64 << 20)
    assert time.monotonic() - t < 15  # typically 1 s: cheap enough for any test to use
    assert len(big) > 64 << 20

    img = build_image("x/y", "t", layers=[100, 200, bytes(a)], media_type=OCI_MANIFEST)
    cfg = json.loads(img.config)
    assert cfg["rootfs"]["diff_ids"] == [diff_id_of(b) for _, b in img.layers]
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    m = json.loads(img.manifest)
    assert m["schemaVersion"] == 2 and m["config"]["mediaType"] == OCI_CONFIG
    assert m["config"]["digest"] == img.config_digest == sha256_digest(img.config)
    assert [(l["digest"], l["size"], l["mediaType"]) for l in m["layers"]] == [
        (d, len(b), OCI_LAYER) for d, b in img.layers
    ]
    assert img.digest == sha256_digest(img.manifest)
    # deterministic across builds
    assert (
        build_image("x/y", "t", layers=[100, 200]).manifest
        == build_image("x/y", "t", layers=[100, 200]).manifest
    )


async def test_push_all_kinds_and_skopeo_reads_exact_bytes(
    registry: Registry, client: httpx.AsyncClient
) -> None:
    s2 = await push_image(client, registry.url, "kinds/schema2", "v1", layers=[2048, 4096])
    oci = await push_image(client, registry.url, "kinds/oci", "v1", media_type=OCI_MANIFEST)
    idx = await push_index(client, registry.url, "kinds/index", "v1")
    mlist = await push_index(
        client, registry.url, "kinds/mlist", "v1", media_type=DOCKER_MANIFEST_LIST
    )
    assert json.loads(s2.manifest)["config"]["mediaType"] == DOCKER_CONFIG
    assert json.loads(s2.manifest)["layers"][0]["mediaType"] == DOCKER_LAYER
    assert {im.media_type for im in idx.images} == {OCI_MANIFEST}
    assert {im.media_type for im in mlist.images} == {DOCKER_SCHEMA2}
    assert [(i.os, i.arch, i.variant) for i in idx.images] == [
        ("linux", "amd64", None),
        ("linux", "arm64", "v8"),
    ]

    for obj in (s2, oci, idx, mlist):
        # registry API: same bytes, same digest, right content type
        r = await client.get(
            f"{registry.url}/v2/{obj.repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        )
        assert r.status_code == 200
        assert r.content == obj.manifest
        assert r.headers["Docker-Content-Digest"] == obj.digest
        assert r.headers["Content-Type"] == obj.media_type
        # skopeo sees exactly the pushed bytes
        cp = await run_skopeo_async(
            "inspect", "--tls-verify=false", "--raw", f"docker://{registry.host}/{obj.repo}:v1"
        )
        assert cp.stdout == obj.manifest, obj.repo

    # children of an index are reachable by digest
    for child in idx.images:
        r = await client.get(
            f"{registry.url}/v2/{idx.repo}/manifests/{child.digest}",
            headers={"Accept": MANIFEST_ACCEPT},
        )
        assert r.content == child.manifest


def _dir_blobs(d: Path) -> dict[str, bytes]:
    return {
        "sha256:" + p.name: p.read_bytes()
        for p in d.iterdir()
        if len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)
    }


async def test_skopeo_copy_to_dir_matches(
    registry: Registry, client: httpx.AsyncClient, scratch: Path
) -> None:
    s2 = await push_image(client, registry.url, "copy/schema2", "v1", layers=[300_000, 1000])
    oci = await push_image(client, registry.url, "copy/oci", "v1", media_type=OCI_MANIFEST)
    for img in (s2, oci):
        dest = scratch / img.repo.replace("/", "_")
        await run_skopeo_async(
            "copy",
            "--src-tls-verify=false",
            f"docker://{registry.host}/{img.repo}:v1",
            f"dir:{dest}",
        )
        assert (dest / "manifest.json").read_bytes() == img.manifest
        assert _dir_blobs(dest) == img.blobs

    idx = await push_index(client, registry.url, "copy/index", "v1")
    dest = scratch / "index-all"
    await run_skopeo_async(
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{registry.host}/{idx.repo}:v1",
        f"dir:{dest}",
    )
    assert (dest / "manifest.json").read_bytes() == idx.manifest
    assert _dir_blobs(dest) == idx.blobs
    for child in idx.images:
        assert (dest / f"{child.digest.split(':')[1]}.manifest.json").read_bytes() == child.manifest

    # platform selection from a docker manifest list
    ml = await push_index(client, registry.url, "copy/mlist", "v1", media_type=DOCKER_MANIFEST_LIST)
    dest = scratch / "mlist-arm64"
    await run_skopeo_async(
        "copy",
        "--override-arch",
        "arm64",
        "--src-tls-verify=false",
        f"docker://{registry.host}/{ml.repo}:v1",
        f"dir:{dest}",
    )
    arm = ml.image_for("linux", "arm64")
    assert (dest / "manifest.json").read_bytes() == arm.manifest
    assert _dir_blobs(dest) == arm.blobs


async def test_chunked_push_and_by_digest(registry: Registry, client: httpx.AsyncClient) -> None:
    data = make_layer("chunky", 2_500_000)
    d = await push_blob_chunked(client, registry.url, "chunk/r", data, chunk_size=1 << 20)
    assert d == sha256_digest(data) and registry.has_blob(d)
    r = await client.get(f"{registry.url}/v2/chunk/r/blobs/{d}")
    assert r.content == data
    img = await push_image(client, registry.url, "chunk/r", None, chunked=True)
    r = await client.get(
        f"{registry.url}/v2/chunk/r/manifests/{img.digest}", headers={"Accept": MANIFEST_ACCEPT}
    )
    assert r.status_code == 200 and r.content == img.manifest


# --------------------------------------------------------------------------- relay


async def test_relay_push_pull_counts(
    registry: Registry, relay: Relay, client: httpx.AsyncClient
) -> None:
    img = await push_image(client, relay.url, "relay/app", "v1", layers=[1 << 20, 5000])
    # 3 blobs: POST + PUT each, then the manifest PUT
    assert relay.count("POST", "/blobs/uploads/") == 3
    assert relay.count("PUT", "/blobs/uploads/") == 3
    assert relay.count("PUT", "/manifests/v1", status=201) == 1
    assert relay.bytes_received("/blobs/uploads/") == img.size
    # Locations built by upstream point at the relay (Host passed through)
    rec = next(r for r in relay.records if r.method == "POST")
    assert rec.response_headers is not None
    assert rec.response_headers["Location"].startswith(relay.url)

    relay.reset()
    assert relay.requests == []
    layer_digest, layer = img.layers[0]
    r = await client.get(f"{relay.url}/v2/relay/app/blobs/{layer_digest}")
    assert r.content == layer
    h = await client.head(f"{relay.url}/v2/relay/app/blobs/{layer_digest}")
    assert h.status_code == 200 and int(h.headers["Content-Length"]) == len(layer)
    assert h.headers["Docker-Content-Digest"] == layer_digest
    rg = await client.get(
        f"{relay.url}/v2/relay/app/blobs/{layer_digest}", headers={"Range": "bytes=100-199"}
    )
    assert rg.status_code == 206 and rg.content == layer[100:200]
    assert rg.headers["Content-Range"] == f"bytes 100-199/{len(layer)}"
    m = await client.get(
        f"{relay.url}/v2/relay/app/manifests/v1", headers={"Accept": DOCKER_SCHEMA2}
    )
    assert m.content == img.manifest

    assert relay.requests[0] == RelayRequest(
        "GET", f"/v2/relay/app/blobs/{layer_digest}", 200, len(layer)
    )
    method, _path, status, nbytes = relay.requests[1]
    assert (method, status, nbytes) == ("HEAD", 200, 0)
    assert relay.count("GET", "/blobs/") == 2
    assert relay.bytes_sent("/blobs/") == len(layer) + 100
    assert relay.bytes_sent() == len(layer) + 100 + len(img.manifest)
    assert all(r.done and r.error is None for r in relay.records)

    # skopeo through the relay works too
    cp = await run_skopeo_async(
        "inspect", "--tls-verify=false", "--raw", f"docker://{relay.host}/relay/app:v1"
    )
    assert cp.stdout == img.manifest


async def test_relay_passes_401_and_www_authenticate(
    relay: Relay, client: httpx.AsyncClient, scratch: Path
) -> None:
    issuer = TokenIssuer(scratch)
    realm = "http://127.0.0.1:1/token"
    with run_registry(scratch, auth_token=issuer.auth_config(realm)) as reg:
        relay.upstream = reg.url
        r = await client.get(f"{relay.url}/v2/")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == (
            f'Bearer realm="{realm}",service="{issuer.service}"'
        )
        r = await client.get(f"{relay.url}/v2/auth/app/manifests/v1")
        assert r.status_code == 401
        assert 'scope="repository:auth/app:pull"' in r.headers["WWW-Authenticate"]

        tok = issuer.token([issuer.repo_access("auth/app", "pull", "push")])
        hdrs = {"Authorization": f"Bearer {tok}"}
        img = await push_image(client, relay.url, "auth/app", "v1", headers=hdrs)
        r = await client.get(
            f"{relay.url}/v2/auth/app/manifests/v1",
            headers={**hdrs, "Accept": DOCKER_SCHEMA2},
        )
        assert r.status_code == 200 and r.content == img.manifest
        # a token for another repo is refused
        other = issuer.token([issuer.repo_access("other/repo", "pull")])
        r = await client.get(
            f"{relay.url}/v2/auth/app/manifests/v1", headers={"Authorization": f"Bearer {other}"}
        )
        assert r.status_code == 401
    assert not reg.dir.exists()


async def test_relay_down_and_restore(
    registry: Registry, relay: Relay, client: httpx.AsyncClient
) -> None:
    img = await push_image(client, registry.url, "relay/down", "v1", layers=[8 << 20])
    assert (await client.get(f"{relay.url}/v2/")).status_code == 200  # keep-alive conn open
    relay.down = True
    with pytest.raises(httpx.TransportError):
        await client.get(f"{relay.url}/v2/")
    with pytest.raises(httpx.ConnectError):  # new connections are refused
        async with httpx.AsyncClient(trust_env=False) as fresh:
            await fresh.get(f"{relay.url}/v2/")
    relay.down = False
    assert (await client.get(f"{relay.url}/v2/")).status_code == 200

    # cutting the link mid-transfer breaks the in-flight download
    relay.rate = 4_000_000
    digest = img.layers[0][0]

    async def download() -> int:
        n = 0
        async with client.stream("GET", f"{relay.url}/v2/relay/down/blobs/{digest}") as resp:
            async for chunk in resp.aiter_bytes():
                n += len(chunk)
        return n

    task = asyncio.create_task(download())
    await relay.wait_for_async(1, "GET", f"/blobs/{digest}", status=200)
    while relay.bytes_sent(digest) < 100_000:
        await asyncio.sleep(0.01)
    relay.down = True
    with pytest.raises(httpx.TransportError):
        await task
    rec = [r for r in relay.records if digest in r.path_qs][-1]
    assert rec.done and rec.error and 0 < rec.response_bytes < len(img.layers[0][1])
    relay.down = False
    relay.rate = None
    r = await client.get(f"{relay.url}/v2/relay/down/blobs/{digest}")
    assert r.content == img.layers[0][1]


async def test_relay_rate_latency_pause(
    registry: Registry, relay: Relay, client: httpx.AsyncClient
) -> None:
    data = make_layer("rate", 4 << 20)
    digest = await push_blob(client, registry.url, "relay/rate", data)
    url = f"{relay.url}/v2/relay/rate/blobs/{digest}"

    t = time.monotonic()
    assert (await client.get(url)).content == data
    fast = time.monotonic() - t

    relay.rate = 2_000_000
    t = time.monotonic()
    assert (await client.get(url)).content == data
    slow = time.monotonic() - t
    assert 1.5 <= slow < 10, slow  # 4 MB at 2 MB/s, less the first burst
    assert fast < slow / 2, (fast, slow)  # unthrottled, the same download is much faster
    relay.rate = None

    relay.latency = 0.3
    t = time.monotonic()
    assert (await client.get(f"{relay.url}/v2/")).status_code == 200
    assert time.monotonic() - t >= 0.3
    relay.latency = 0

    relay.paused = True
    task = asyncio.create_task(client.get(f"{relay.url}/v2/"))
    await relay.wait_for_async(1, "GET", "/v2/", done=False)
    await asyncio.sleep(0.1)
    assert not task.done()
    relay.paused = False
    assert (await task).status_code == 200

    relay.fault = lambda rec: 503 if rec.path_qs.endswith("/fault") else None
    assert (await client.get(f"{relay.url}/v2/x/manifests/fault")).status_code == 503
    assert (await client.get(f"{relay.url}/v2/")).status_code == 200
    relay.fault = None


async def test_relay_stop_with_stalled_request(
    registry: Registry, client: httpx.AsyncClient
) -> None:
    relay = Relay(registry.url).start()
    try:
        relay.paused = True
        task = asyncio.create_task(client.get(f"{relay.url}/v2/"))
        await relay.wait_for_async(1, "GET", "/v2/")
    finally:
        t = time.monotonic()
        relay.stop()
    assert time.monotonic() - t < 8  # typically 1 s; waiting on the stalled request would take 15 s
    with pytest.raises(httpx.TransportError):
        await task
    with pytest.raises(httpx.ConnectError):
        await client.get(f"{relay.url}/v2/")


async def test_registry_http_host_and_log(client: httpx.AsyncClient) -> None:
    with run_registry(
        http_host="http://registry.example:5000", log_level="warn", access_log=False
    ) as reg:
        r = await client.post(f"{reg.url}/v2/hh/app/blobs/uploads/")
        assert r.status_code == 202
        assert r.headers["Location"].startswith("http://registry.example:5000/v2/hh/app/")
        assert reg.config["log"]["level"] == "warn"
        assert "response completed" not in reg.log_tail()


async def test_relay_upstream_stopped(
    relay: Relay, client: httpx.AsyncClient, scratch: Path
) -> None:
    with run_registry(scratch) as reg:
        relay.upstream = reg.url
        assert (await client.get(f"{relay.url}/v2/")).status_code == 200
        reg.stop()
        with pytest.raises(httpx.TransportError):
            await client.get(f"{relay.url}/v2/")
        assert relay.records[-1].error
        relay.upstream_error_status = 502
        assert (await client.get(f"{relay.url}/v2/")).status_code == 502
        relay.upstream_error_status = None
        reg.start()
        assert (await client.get(f"{relay.url}/v2/")).status_code == 200


# --------------------------------------------------------------------------- registry


async def test_registry_restart_keeps_content(client: httpx.AsyncClient, scratch: Path) -> None:
    with run_registry(scratch) as reg:
        port, root = reg.port, reg.root
        img = await push_image(client, reg.url, "keep/app", "v1")
        reg.stop()
        assert not reg.running
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{reg.url}/v2/")
        reg.start()
        assert (reg.port, reg.root) == (port, root)
        r = await client.get(
            f"{reg.url}/v2/keep/app/manifests/v1", headers={"Accept": DOCKER_SCHEMA2}
        )
        assert r.status_code == 200 and r.content == img.manifest
        for d, blob in img.layers:
            assert (await client.get(f"{reg.url}/v2/keep/app/blobs/{d}")).content == blob
        pid = reg.process.pid
        reg.kill9()
        assert reg.process.returncode == -9
        reg.start()
        assert reg.process.pid != pid
        r = await client.get(
            f"{reg.url}/v2/keep/app/manifests/v1", headers={"Accept": DOCKER_SCHEMA2}
        )
        assert r.content == img.manifest
        d = reg.dir
    assert not d.exists()


async def test_registry_proxy_mode_and_notifications(
    registry: Registry, relay: Relay, client: httpx.AsyncClient, scratch: Path
) -> None:
    img = await push_image(client, registry.url, "proxied/app", "v1")
    d, blob = img.layers[0]
    with EventSink() as sink, run_registry(
        scratch, proxy_remoteurl=relay.url, notifications=[sink.endpoint()]
    ) as proxy:
        assert proxy.config["proxy"] == {"remoteurl": relay.url}
        r = await client.get(
            f"{proxy.url}/v2/proxied/app/manifests/v1", headers={"Accept": DOCKER_SCHEMA2}
        )
        assert r.status_code == 200 and r.content == img.manifest
        assert relay.count("GET", "/v2/proxied/app/manifests/") >= 1
        assert (await client.get(f"{proxy.url}/v2/proxied/app/blobs/{d}")).content == blob
        # (distribution 2.8's proxy fetches a blob twice on a cold GET; >= on purpose)
        assert relay.bytes_sent(d) >= len(blob)
        await sink.wait_for_async(
            lambda e: e["action"] == "pull" and e["target"]["digest"] == img.digest
        )
        await sink.wait_for_async(
            lambda e: e["action"] == "pull" and e["target"]["digest"] == d
        )
