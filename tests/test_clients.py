"""Real clients through the node: skopeo copies every manifest kind, digests checked."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from tests.support import images
from tests.support.images import DOCKER_MANIFEST_LIST, DOCKER_SCHEMA2, OCI_INDEX, OCI_MANIFEST
from tests.support.procs import run_skopeo_async


def repo_name() -> str:
    return f"skopeo/app-{uuid.uuid4().hex[:8]}"


def blob_files(directory: Path) -> dict[str, bytes]:
    """skopeo's dir: transport names blobs by hex digest."""
    return {f"sha256:{p.name}": p.read_bytes() for p in directory.iterdir() if len(p.name) == 64}


async def copy(mirror, reference: str, dest: Path, *extra: str) -> None:
    await run_skopeo_async("copy", "--src-tls-verify=false", *extra,
                           f"docker://{mirror.host}/{reference}", f"dir:{dest}", timeout=120)


@pytest.mark.parametrize("media_type", [DOCKER_SCHEMA2, OCI_MANIFEST])
async def test_skopeo_copies_an_image(mirror, relay, upstream, upstream_client, tmp_path, media_type) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1",
                                    layers=[2_000_000, 3000], media_type=media_type)
    await copy(mirror, f"{image.repo}:v1", tmp_path / "out")
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    assert f"sha256:{hashlib.sha256(manifest).hexdigest()}" == image.digest
    assert blob_files(tmp_path / "out") == image.blobs
    assert relay.count("GET", "/blobs/") == len(image.blobs)


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
async def test_skopeo_copies_all_platforms_of_an_index(mirror, upstream, upstream_client, tmp_path,
                                                       media_type) -> None:
    index = await images.push_index(upstream_client, upstream.url, repo_name(), "latest", media_type=media_type)
    out = tmp_path / "out"
    await copy(mirror, f"{index.repo}:latest", out, "--all")
    manifest = (out / "manifest.json").read_bytes()
    assert f"sha256:{hashlib.sha256(manifest).hexdigest()}" == index.digest
    assert blob_files(out) == index.blobs
    children = {f"sha256:{p.name.split('.')[0]}": p.read_bytes() for p in out.glob("*.manifest.json")}
    assert children == {im.digest: im.manifest for im in index.images}


async def test_skopeo_picks_one_platform_and_inspects(mirror, upstream, upstream_client, tmp_path) -> None:
    index = await images.push_index(upstream_client, upstream.url, repo_name(), "latest")
    arm64 = index.image_for("linux", "arm64")
    await copy(mirror, f"{index.repo}:latest", tmp_path / "arm", "--override-arch", "arm64")
    manifest = (tmp_path / "arm" / "manifest.json").read_bytes()
    assert f"sha256:{hashlib.sha256(manifest).hexdigest()}" == arm64.digest
    inspected = await run_skopeo_async("inspect", "--tls-verify=false", "--raw",
                                       f"docker://{mirror.host}/{index.repo}:latest")
    assert inspected.stdout == index.manifest
    tags = await run_skopeo_async("list-tags", "--tls-verify=false", f"docker://{mirror.host}/{index.repo}")
    assert json.loads(tags.stdout)["Tags"] == ["latest"]
