"""Write pass-through: pushes reach the central registry through the node, reads see them."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import httpx

from tests.support import images
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import run_skopeo_async

ACCEPT = {"Accept": DOCKER_SCHEMA2}


def repo_name() -> str:
    return f"push/app-{uuid.uuid4().hex[:8]}"


async def writable(make_mirror, relay, **mirror):
    return await make_mirror(relay.url, passthrough_writes=True, tag_ttl="1h", **mirror)


async def test_skopeo_push_then_pull_by_tag_crosses_no_blob_bytes(make_mirror, relay, upstream,
                                                                  tmp_path: Path) -> None:
    node = await writable(make_mirror, relay)
    image = images.build_image(repo_name(), "v1", layers=[3_000_000, 1_000_000, 5000])
    source = tmp_path / "src"
    source.mkdir()
    (source / "version").write_text("Directory Transport Version: 1.1\n")
    (source / "manifest.json").write_bytes(image.manifest)
    for digest, data in image.blobs.items():
        (source / digest.split(":")[1]).write_bytes(data)
    await run_skopeo_async("copy", "--dest-tls-verify=false", f"dir:{source}",
                           f"docker://{node.host}/{image.repo}:v1")
    async with httpx.AsyncClient() as client:  # upstream has it
        direct = await client.get(f"{upstream.url}/v2/{image.repo}/manifests/v1", headers=ACCEPT)
    assert direct.headers["Docker-Content-Digest"] == image.digest
    relay.reset()
    out = tmp_path / "out"
    await run_skopeo_async("copy", "--src-tls-verify=false", f"docker://{node.host}/{image.repo}:v1",
                           f"dir:{out}")
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == image.digest.split(":")[1]
    assert relay.count("GET", "/blobs/") == 0 and relay.bytes_sent("/blobs/") == 0
    assert relay.count("GET", "/manifests/") == 0


async def test_chunked_upload_and_locations_point_at_the_node(make_mirror, relay, upstream) -> None:
    node = await writable(make_mirror, relay)
    repo = repo_name()
    data = images.make_layer("chunked", 2_500_000)
    async with httpx.AsyncClient(timeout=60) as client:
        started = await client.post(f"{node.url}/v2/{repo}/blobs/uploads/")
        assert started.status_code == 202
        assert started.headers["Location"].startswith(f"{node.url}/v2/{repo}/blobs/uploads/")
        assert started.headers["Docker-Upload-UUID"]
        digest = await images.push_blob_chunked(client, node.url, repo, data, chunk_size=1 << 20)
        relay.reset()
        served = await client.get(f"{node.url}/v2/{repo}/blobs/{digest}")
        upstream_copy = await client.get(f"{upstream.url}/v2/{repo}/blobs/{digest}")
    assert served.content == data == upstream_copy.content
    assert relay.count("GET", "/blobs/") == 0  # kept on the way through
    for record in relay.records:
        assert "Authorization" not in (record.request_headers or {})


async def test_cross_repository_mount(make_mirror, relay, upstream, upstream_client) -> None:
    node = await writable(make_mirror, relay)
    source = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    target = repo_name()
    digest, data = source.layers[0]
    async with httpx.AsyncClient(timeout=60) as client:
        await client.get(f"{node.url}/v2/{source.repo}/blobs/{digest}")  # cached via the source repo
        mounted = await client.post(f"{node.url}/v2/{target}/blobs/uploads/",
                                    params={"mount": digest, "from": source.repo})
        relay.reset()
        served = await client.get(f"{node.url}/v2/{target}/blobs/{digest}")
    assert mounted.status_code == 201
    assert mounted.headers["Location"].startswith(node.url)
    assert served.content == data
    assert relay.count("GET", "/blobs/") == 0


async def test_repushed_tag_is_visible_at_once(make_mirror, relay, upstream) -> None:
    node = await writable(make_mirror, relay)
    repo = repo_name()
    async with httpx.AsyncClient(timeout=60) as client:
        first = await images.push_image(client, node.url, repo, "v1", seed="first")
        seen_first = await client.get(f"{node.url}/v2/{repo}/manifests/v1", headers=ACCEPT)
        second = await images.push_image(client, node.url, repo, "v1", seed="second")
        seen_second = await client.get(f"{node.url}/v2/{repo}/manifests/v1", headers=ACCEPT)
    assert seen_first.headers["Docker-Content-Digest"] == first.digest
    assert seen_second.headers["Docker-Content-Digest"] == second.digest  # despite tag_ttl=1h


async def test_delete_through_the_node_drops_it_from_the_cache(make_mirror, relay, upstream) -> None:
    node = await writable(make_mirror, relay)
    repo = repo_name()
    async with httpx.AsyncClient(timeout=60) as client:
        image = await images.push_image(client, node.url, repo, "v1")
        assert (await client.get(f"{node.url}/v2/{repo}/manifests/v1", headers=ACCEPT)).status_code == 200
        deleted = await client.delete(f"{node.url}/v2/{repo}/manifests/{image.digest}")
        by_tag = await client.get(f"{node.url}/v2/{repo}/manifests/v1", headers=ACCEPT)
        by_digest = await client.get(f"{node.url}/v2/{repo}/manifests/{image.digest}", headers=ACCEPT)
    assert deleted.status_code == 202
    assert by_tag.status_code == 404 and by_digest.status_code == 404


async def test_writes_refused_unless_enabled(mirror, relay) -> None:
    async with mirror.client() as client:
        response = await client.post(f"/v2/{repo_name()}/blobs/uploads/")
    assert response.status_code == 405 and response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert relay.count() == 0
