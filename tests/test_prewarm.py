"""Prewarm jobs, pins, pull counts (`top`) and keep-fresh, against the real upstream."""

from __future__ import annotations

import asyncio
import io
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from mirror import errors
from mirror.api.debug import create_debug_app
from mirror.registry.digest import Digest
from mirror.registry.reference import parse_image
from tests.support import images
from tests.support.images import DOCKER_SCHEMA2, MANIFEST_ACCEPT
from tests.support.waits import wait_until


@pytest.fixture
async def debug_for():
    """Factory: a debug/admin listener for a node, on a free loopback port."""
    runners: list[web.AppRunner] = []

    async def start(node: Any) -> str:
        runner = web.AppRunner(create_debug_app(node.node))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def admin(mirror, debug_for):
    async with httpx.AsyncClient(base_url=await debug_for(mirror), timeout=30) as client:
        yield client


async def run_job(admin: httpx.AsyncClient, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    response = await admin.post("/admin/prewarm", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + timeout
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
        job = (await admin.get(f"/admin/jobs/{job['id']}")).json()
    return job


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def test_prewarm_index_fetches_exactly_one_platform(mirror, admin, relay, upstream, upstream_client):
    index = await images.push_index(upstream_client, upstream.url, unique("warm/multi"), "v1",
                                    layer_size=4096)
    amd64, arm64 = index.image_for("linux", "amd64"), index.image_for("linux", "arm64")
    relay.reset()

    job = await run_job(admin, {"images": [f"{index.repo}:v1"], "platform": "linux/amd64"})

    assert job["state"] == "done" and job["errors"] == []
    manifest_gets = sorted(r.path_qs for r in relay.records if r.method == "GET" and "/manifests/" in r.path_qs)
    blob_gets = sorted(r.path_qs.rsplit("/", 1)[1] for r in relay.records
                       if r.method == "GET" and "/blobs/" in r.path_qs)
    assert manifest_gets == sorted([f"/v2/{index.repo}/manifests/v1", f"/v2/{index.repo}/manifests/{amd64.digest}"])
    assert blob_gets == sorted(amd64.blobs)
    assert not any(d in r.path_qs for r in relay.records for d in [arm64.digest, *arm64.blobs])
    assert job["manifests"] == 2
    assert (job["blobs_total"], job["blobs_done"], job["blobs_cached"]) == (3, 3, 0)
    assert job["bytes_total"] == job["bytes_done"] == job["bytes_fetched"] == amd64.size
    assert job["resolved"][0]["digest"] == index.digest

    relay.reset()
    again = await run_job(admin, {"images": [f"{index.repo}:v1"], "platform": "linux/amd64"})
    assert again["state"] == "done"
    assert relay.count("GET", "/blobs/") == 0 and relay.count("GET", "/manifests/") == 0
    assert (again["blobs_done"], again["blobs_cached"], again["bytes_fetched"]) == (3, 3, 0)
    assert again["bytes_done"] == again["bytes_total"] == amd64.size

    relay.down = True  # all of it is served from the node alone
    async with mirror.client(headers={"Accept": MANIFEST_ACCEPT}) as client:
        top = await client.get(f"/v2/{index.repo}/manifests/v1")
        child = await client.get(f"/v2/{index.repo}/manifests/{amd64.digest}")
        assert top.content == index.manifest and child.content == amd64.manifest
        for digest, data in amd64.blobs.items():
            assert (await client.get(f"/v2/{index.repo}/blobs/{digest}")).content == data


async def test_prewarm_all_platforms_by_digest_and_progress_list(admin, relay, upstream, upstream_client):
    index = await images.push_index(upstream_client, upstream.url, unique("warm/all"), "v1")
    relay.reset()
    job = await run_job(admin, {"images": [f"{index.repo}@{index.digest}"], "platform": "all"})
    assert job["state"] == "done"
    assert job["manifests"] == 3
    assert job["blobs_total"] == 6 and job["bytes_total"] == sum(len(b) for b in index.blobs.values())
    assert relay.count("GET", "/blobs/") == 6
    listed = (await admin.get("/admin/jobs")).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


async def test_prewarm_reports_errors_and_bad_requests(admin, upstream, upstream_client):
    image = await images.push_image(upstream_client, upstream.url, unique("warm/ok"), "v1")
    job = await run_job(admin, {"images": [f"{image.repo}:v1", "warm/nothing-here:v1"]})
    assert job["state"] == "failed"
    assert [e["image"] for e in job["errors"]] == ["warm/nothing-here:v1"]
    assert "MANIFEST_UNKNOWN" in job["errors"][0]["error"] or "NAME_UNKNOWN" in job["errors"][0]["error"]
    assert job["blobs_done"] == 3  # the good image was still warmed

    assert (await admin.post("/admin/prewarm", json={"images": ["Bad Name:x"]})).status_code == 400
    assert (await admin.post("/admin/prewarm", json={"images": []})).status_code == 400
    assert (await admin.post("/admin/prewarm", json={"images": ["a:b"], "platform": "linux"})).status_code == 400
    assert (await admin.get("/admin/jobs/nope")).status_code == 404


async def test_prewarm_joins_a_client_pull_in_flight(mirror, admin, relay, upstream, upstream_client):
    image = await images.push_image(upstream_client, upstream.url, unique("warm/join"), "v1",
                                    layers=[3_000_000])
    layer, data = image.layers[0]
    relay.reset()
    relay.rate = 3_000_000
    async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        pull = asyncio.create_task(client.get(f"/v2/{image.repo}/blobs/{layer}"))
        await relay.wait_for_async(1, "GET", f"/blobs/{layer}")
        job = await run_job(admin, {"images": [f"{image.repo}:v1"]})
        assert (await pull).content == data
    relay.rate = None
    assert job["state"] == "done"
    assert relay.count("GET", f"/blobs/{layer}") == 1  # one download, shared


async def test_pin_and_unpin(mirror, admin, upstream, upstream_client):
    image = await images.push_image(upstream_client, upstream.url, unique("warm/pin"), "v1")
    job = await run_job(admin, {"images": [f"{image.repo}:v1"], "pin": True})
    assert job["state"] == "done"
    metadata = mirror.node.metadata
    everything = [image.digest, *image.blobs]
    assert all([await metadata.pinned(Digest.parse(d)) for d in everything])

    response = await admin.post("/admin/unpin", json={"images": [f"{image.repo}:v1", "warm/never:v1"]})
    assert response.status_code == 200
    assert sorted(response.json()["unpinned"]) == sorted(everything)
    assert response.json()["unknown"] == ["warm/never:v1"]
    assert not any([await metadata.pinned(Digest.parse(d)) for d in everything])


async def test_pins_are_per_image_and_hold_shared_blobs_by_count(mirror, admin, upstream, upstream_client):
    """Unpinning one image never unpins what another pinned image shares (issue 15 item 4)."""
    shared = images.make_layer(unique("shared"), 4096)
    a = await images.push_image(upstream_client, upstream.url, unique("pins/a"), "v1", layers=(shared, 1000))
    b = await images.push_image(upstream_client, upstream.url, unique("pins/b"), "v1", layers=(shared, 2000))
    for image in (a, b):
        assert (await run_job(admin, {"images": [f"{image.repo}:v1"], "pin": True}))["state"] == "done"
    shared_digest = images.sha256_digest(shared)
    listed = {p["repository"]: p for p in (await admin.get("/admin/pins")).json()["pins"]}
    assert set(listed) == {a.repo, b.repo}
    assert listed[a.repo]["reference"] == "v1" and listed[a.repo]["digest"] == a.digest
    assert listed[a.repo]["objects"] == 1 + len(a.blobs)
    assert listed[a.repo]["bytes"] == len(a.manifest) + a.size
    assert listed[a.repo]["exclusive_bytes"] == listed[a.repo]["bytes"] - len(shared)

    response = (await admin.post("/admin/unpin", json={"images": [f"{a.repo}:v1"]})).json()
    assert shared_digest not in response["unpinned"]
    assert response["pins"][0]["kept"] == [shared_digest]
    metadata = mirror.node.metadata
    assert await metadata.pinned(Digest.parse(shared_digest))  # b still holds it
    assert not await metadata.pinned(Digest.parse(a.digest))
    assert all([await metadata.pinned(Digest.parse(d)) for d in (b.digest, *b.blobs)])

    # A pin by digest is removed by that digest; the shared layer is released with the last pin.
    response = (await admin.post("/admin/unpin", json={"images": [f"{b.repo}@{b.digest}"]})).json()
    assert shared_digest in response["unpinned"]
    assert not await metadata.pinned(Digest.parse(shared_digest))
    assert (await admin.get("/admin/pins")).json()["pins"] == []


async def test_a_pinned_object_purged_and_fetched_again_is_held_again(mirror, admin, upstream, upstream_client):
    image = await images.push_image(upstream_client, upstream.url, unique("pins/back"), "v1")
    assert (await run_job(admin, {"images": [f"{image.repo}:v1"], "pin": True}))["state"] == "done"
    layer = image.layer_digests[0]
    purged = await admin.post("/admin/purge", json={"reference": f"{image.repo}:v1"})
    assert purged.status_code == 200 and purged.json()["objects"] >= 2, purged.text
    assert await mirror.node.metadata.get_object(Digest.parse(layer)) is None
    async with mirror.client() as client:
        assert (await client.get(f"/v2/{image.repo}/blobs/{layer}")).status_code == 200
    # The record is written as the fill commits, which may finish just after the client's last byte.
    await wait_until(lambda: mirror.node.metadata.get_object(Digest.parse(layer)), what="the refetched layer's record")
    assert await mirror.node.metadata.pinned(Digest.parse(layer))


async def test_top_counts_pulls_by_tag(mirror, admin, upstream, upstream_client):
    a = await images.push_image(upstream_client, upstream.url, unique("top/a"), "v1")
    b = await images.push_image(upstream_client, upstream.url, unique("top/b"), "v2")
    async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        for _ in range(3):
            assert (await client.get(f"/v2/{a.repo}/manifests/v1")).status_code == 200
        assert (await client.head(f"/v2/{b.repo}/manifests/v2")).status_code == 200
        assert (await client.get(f"/v2/{b.repo}/manifests/{b.digest}")).status_code == 200  # not a tag
    top = (await admin.get("/admin/top", params={"n": 5})).json()["top"]
    assert [(t["repository"], t["tag"], t["pulls"]) for t in top] == [(a.repo, "v1", 3), (b.repo, "v2", 1)]
    assert len((await admin.get("/admin/top", params={"n": 1})).json()["top"]) == 1


async def test_keep_fresh_caches_a_popular_tags_new_version(make_mirror, relay, upstream, upstream_client):
    repo = unique("fresh/app")
    v1 = await images.push_image(upstream_client, upstream.url, repo, "latest", seed="v1")
    node = await make_mirror(relay.url, tag_ttl="1h", prefetch={"keep_fresh": 1, "interval": "200ms"})
    async with node.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        assert (await client.get(f"/v2/{repo}/manifests/latest")).json()["config"]["digest"] == v1.config_digest
        v2 = await images.push_image(upstream_client, upstream.url, repo, "latest", seed="v2")
        deadline = time.monotonic() + 30
        while (record := await node.node.metadata.get_tag(repo, "latest")).digest != Digest.parse(v2.digest):
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.05)
        relay.down = True
        response = await client.get(f"/v2/{repo}/manifests/latest")
        assert response.content == v2.manifest
        for digest, data in v2.blobs.items():
            assert (await client.get(f"/v2/{repo}/blobs/{digest}")).content == data


def test_parse_image_references() -> None:
    hub = frozenset({"registry-1.docker.io", "docker.io", "index.docker.io"})
    assert parse_image("nginx", hub).repo == "library/nginx"
    assert parse_image("nginx", hub).tag == "latest"
    assert parse_image("docker.io/library/nginx:1.25", hub).reference == "1.25"
    ref = parse_image("localhost:5000/team/app@sha256:" + "a" * 64, frozenset({"localhost:5000"}))
    assert (ref.repo, ref.tag, str(ref.digest)) == ("team/app", None, "sha256:" + "a" * 64)
    assert parse_image("team/app:v1").repo == "team/app"
    with pytest.raises(errors.NameInvalid):
        parse_image("quay.io/team/app:v1", frozenset({"localhost:5000"}))


async def test_cli_prewarm_from_a_file_and_top(mirror, debug_for, upstream, upstream_client, tmp_path: Path):
    url = await debug_for(mirror)
    one = await images.push_image(upstream_client, upstream.url, unique("cli/one"), "v1")
    two = await images.push_index(upstream_client, upstream.url, unique("cli/two"), "v1")
    listing = tmp_path / "images.txt"
    listing.write_text(f"# warm these\n{one.repo}:v1\n\n{two.repo}:v1  # the index\n")

    code, out, err = await cli("prewarm", "-f", str(listing), "--platform", "linux/amd64", "--pin",
                               "--server", url)
    assert code == 0, err
    assert "prewarm done: 2/2 images" in out and "6 blobs (6 fetched, 0 already cached)" in out
    assert "6/6 blobs" in err  # the last progress line

    code, out, _ = await cli("prewarm", f"{one.repo}:v1", "nope/missing:v1", "--server", url)
    assert code == 1 and "1/2 images" in out and "nope/missing:v1" in out

    code, out, _ = await cli("pins", "--server", url)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["PIN", "OBJECTS", "SIZE", "EXCLUSIVE", "PINNED"]
    assert any(f"/{one.repo}:v1" in line and line.split()[1] == "4" for line in lines[1:]), out
    assert any(f"/{two.repo}:v1" in line for line in lines[1:]), out

    code, out, _ = await cli("unpin", f"{one.repo}:v1", "--server", url)
    assert code == 0 and f"/{one.repo}:v1: 4 objects released" in out

    async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        await client.get(f"/v2/{one.repo}/manifests/v1")
    code, out, _ = await cli("top", "--server", url)
    assert code == 0 and f"{one.repo}:v1" in out


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_rate_and_eta_and_colour_only_on_a_terminal(monkeypatch) -> None:
    """`mirror prewarm`'s progress: rate over the recent polls, ETA, colour only on a terminal."""
    from mirror.commands import prewarm as command

    monkeypatch.delenv("NO_COLOR", raising=False)
    now = [100.0]
    monkeypatch.setattr(command.time, "monotonic", lambda: now[0])
    job = {"state": "running", "blobs_done": 1, "blobs_total": 4, "bytes_done": 0, "bytes_total": 100_000_000}
    terminal, pipe = _Terminal(), io.StringIO()
    shown = [command.Progress(terminal), command.Progress(pipe)]
    for step in range(3):
        job = {**job, "bytes_done": step * 10_000_000}
        for progress in shown:
            progress.show(job)
        now[0] += 1.0
    last = terminal.getvalue().rsplit("\x1b[2K", 1)[-1]
    assert "20.0 MB/100.0 MB  10.0 MB/s  ETA 0:08" in last  # 80 MB left at 10 MB/s
    assert "\x1b[" in terminal.getvalue() and "\x1b[" not in pipe.getvalue()
    for progress in shown:
        progress.show({**job, "state": "done", "blobs_done": 4, "bytes_done": 100_000_000}, final=True)
    assert "\x1b[32m[" in terminal.getvalue()  # a finished job's bars in green
    assert pipe.getvalue().splitlines()[-1] == "done: 4/4 blobs, 100.0 MB/100.0 MB"
    assert command.clock(3725) == "1:02:05" and command.clock(95) == "1:35"
