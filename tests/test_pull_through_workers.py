"""The pull-through set against a real node process with `mirror.workers` 1 and 8.

Issue 12's "done when": what a client sees must not depend on how many
worker processes serve it. Each test runs twice, against a node of one
process and against a node of eight (a supervisor and eight workers on one
`SO_REUSEPORT` address, over one store), in front of the real registry
through the counting relay. Requests go out on separate connections, so the
kernel spreads them over every worker. Every body is checked against its
digest (a range against the verified whole).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import images
from tests.support.authenv import token_block
from tests.support.faults import NodeProcess
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import run_skopeo_async
from tests.support.relay import Relay
from tests.support.token_issuer import TokenIssuer, make_ca
from tests.test_workers import wait_workers

MiB = 1 << 20
ACCEPT = {"Accept": DOCKER_SCHEMA2}
TAG_TTL = 6.0  # seconds; long enough that a burst of requests lands within it on any machine
WORKERS = [1, 8]


@dataclass
class Served:
    """A node process and the counting relay in front of its upstream."""

    node: NodeProcess
    relay: Relay
    workers: int

    @property
    def host(self) -> str:
        return self.node.url.removeprefix("http://")


def start(root: Path, remote: str, workers: int, **mirror: Any) -> NodeProcess:
    node = NodeProcess(root, remote, workers=workers, upstream={"read_timeout": "30s"}, **mirror)
    node.start(timeout=120)
    if workers > 1:
        wait_workers(node, workers, timeout=180)
    return node


@pytest.fixture(scope="module", params=WORKERS, ids=lambda w: f"{w}workers")
def served(request: pytest.FixtureRequest, upstream: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One node per worker count for the whole module (eight workers take a while to start)."""
    workers = request.param
    with Relay(upstream.url) as relay:
        node = start(tmp_path_factory.mktemp(f"node-{workers}"), relay.url, workers, tag_ttl=f"{TAG_TTL}s")
        try:
            yield Served(node, relay, workers)
        finally:
            node.close()


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def repo_name(kind: str) -> str:
    return f"pull-workers/{kind}-{uuid.uuid4().hex[:8]}"


async def request(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request on a connection of its own (the kernel picks the worker)."""
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 transport=httpx.AsyncHTTPTransport(retries=2)) as client:
        # (retries: failed connection attempts only, never a request the node received)
        response = await client.request(method, path, headers={**ACCEPT, **(headers or {})})
        await response.aread()
        return response


async def spread(url: str, path: str, count: int = 16, method: str = "GET",
                 headers: dict[str, str] | None = None) -> list[httpx.Response]:
    return list(await asyncio.gather(*(request(url, method, path, headers) for _ in range(count))))


def spec_error(response: httpx.Response, status: int, codes: set[str]) -> bool:
    """The registry spec's error: the status and a JSON body whose first error code is one of `codes`."""
    body = response.json()
    return (response.status_code == status and response.headers["Content-Type"].startswith("application/json")
            and body["errors"][0]["code"] in codes)


async def test_skopeo_copies_an_image_by_tag_and_by_digest(served, upstream, upstream_client, tmp_path) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name("skopeo"), "v1",
                                     layers=[MiB, 2 * MiB, 300_000])
    for name, reference in (("by-tag", ":v1"), ("by-digest", f"@{image.digest}")):
        out = tmp_path / name
        done = await run_skopeo_async("copy", "--src-tls-verify=false",
                                      f"docker://{served.host}/{image.repo}{reference}", f"dir:{out}",
                                      timeout=180)
        assert done.returncode == 0, done.stderr.decode()
        assert sha256((out / "manifest.json").read_bytes()) == image.digest
        for digest in image.blobs:
            assert sha256((out / digest[7:]).read_bytes()) == digest, (name, digest)
    for digest in image.blobs:
        assert served.relay.count("GET", f"/blobs/{digest}") == 1, digest  # once for the node


async def test_a_cold_blob_for_16_connections_is_one_upstream_get(served, upstream, upstream_client) -> None:
    layer = images.make_layer(uuid.uuid4().hex, 4 * MiB, compresslevel=0)
    image = await images.push_image(upstream_client, upstream.url, repo_name("cold"), "v1", layers=[layer])
    digest = image.layers[0][0]
    responses = await spread(served.node.url, f"/v2/{image.repo}/blobs/{digest}")
    assert [r.status_code for r in responses] == [200] * 16
    assert {sha256(r.content) for r in responses} == {digest}
    assert served.relay.count("GET", f"/blobs/{digest}") == 1


async def test_ranges_of_a_blob_cold_and_stored(served, upstream, upstream_client) -> None:
    layer = images.make_layer(uuid.uuid4().hex, 2 * MiB, compresslevel=0)
    image = await images.push_image(upstream_client, upstream.url, repo_name("range"), "v1", layers=[layer])
    digest, data = image.layers[0]
    assert sha256(data) == digest
    path = f"/v2/{image.repo}/blobs/{digest}"
    cold = await request(served.node.url, "GET", path, {"Range": "bytes=1000-1999"})
    assert cold.status_code == 206 and cold.content == data[1000:2000]
    assert cold.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    for responses in (await spread(served.node.url, path, 8, headers={"Range": "bytes=-4096"}),
                      await spread(served.node.url, path, 8, headers={"Range": f"bytes={MiB}-"})):
        first = responses[0].headers["Content-Range"].split()[1].split("/")[0]
        start_at = int(first.split("-")[0])
        assert all(r.status_code == 206 and r.content == data[start_at:] for r in responses)
    unsatisfiable = await request(served.node.url, "GET", path, {"Range": f"bytes={len(data)}-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["Content-Range"] == f"bytes */{len(data)}"
    assert served.relay.count("GET", f"/blobs/{digest}") >= 1


async def test_a_tag_within_its_ttl_and_after_it_moved_upstream(served, upstream, upstream_client) -> None:
    repo = repo_name("tag")
    first = await images.push_image(upstream_client, upstream.url, repo, "v1")
    asked_at = time.time()  # upstream confirms the tag between these two instants
    assert [r.content for r in await spread(served.node.url, f"/v2/{repo}/manifests/v1")] == [first.manifest] * 16
    warmed_at = time.time()
    second = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[4096])
    assert second.digest != first.digest
    within = await spread(served.node.url, f"/v2/{repo}/manifests/v1")
    if time.time() < asked_at + TAG_TTL:  # (a machine too slow for the burst proves nothing here)
        assert [r.content for r in within] == [first.manifest] * 16  # cached: no worker asked upstream
        assert served.relay.count("HEAD", f"/{repo}/manifests/v1") == 0
    await asyncio.sleep(max(0.0, warmed_at + TAG_TTL + 0.5 - time.time()))
    after = await spread(served.node.url, f"/v2/{repo}/manifests/v1")
    assert [r.content for r in after] == [second.manifest] * 16  # every worker revalidated, or reread the row
    assert {r.headers["Docker-Content-Digest"] for r in after} == {second.digest}
    assert sha256(after[0].content) == second.digest
    assert served.relay.count("HEAD", f"/{repo}/manifests/v1") >= 1


async def test_head_requests_answer_without_bodies(served, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name("head"), "v1")
    for reference in ("v1", image.digest):
        heads = await spread(served.node.url, f"/v2/{image.repo}/manifests/{reference}", 8, "HEAD")
        assert all(r.status_code == 200 and r.content == b"" and r.headers["Docker-Content-Digest"] == image.digest
                   and int(r.headers["Content-Length"]) == len(image.manifest) for r in heads), reference
    digest, data = image.layers[0]
    cold = await request(served.node.url, "HEAD", f"/v2/{image.repo}/blobs/{digest}")
    assert cold.status_code == 200 and int(cold.headers["Content-Length"]) == len(data) and cold.content == b""
    assert served.relay.count("GET", f"/blobs/{digest}") == 0  # a HEAD starts no download
    got = await request(served.node.url, "GET", f"/v2/{image.repo}/blobs/{digest}")
    assert got.status_code == 200 and sha256(got.content) == digest
    warm = await spread(served.node.url, f"/v2/{image.repo}/blobs/{digest}", 8, "HEAD")
    assert all(r.status_code == 200 and int(r.headers["Content-Length"]) == len(data) for r in warm)


async def test_not_found_answers_carry_the_spec_json_body(served, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name("missing"), "v1")
    absent = sha256(uuid.uuid4().bytes)
    url = served.node.url
    for response in await spread(url, f"/v2/{image.repo}/manifests/no-such-tag", 8):
        assert spec_error(response, 404, {"MANIFEST_UNKNOWN"}), response.text
    for response in await spread(url, f"/v2/{image.repo}/manifests/{absent}", 8):
        assert spec_error(response, 404, {"MANIFEST_UNKNOWN"}), response.text
    for response in await spread(url, f"/v2/{image.repo}/blobs/{absent}", 8):
        assert spec_error(response, 404, {"BLOB_UNKNOWN"}), response.text
    for response in await spread(url, f"/v2/{repo_name('nobody')}/manifests/v1", 8):
        assert spec_error(response, 404, {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"}), response.text
    heads = await spread(url, f"/v2/{image.repo}/manifests/no-such-tag", 8, "HEAD")
    assert all(r.status_code == 404 and r.content == b"" for r in heads)


@pytest.mark.parametrize("workers", WORKERS, ids=lambda w: f"{w}workers")
async def test_an_auth_required_pull(workers, upstream, upstream_client, tmp_path) -> None:
    """`auth.token` on the node: every worker checks the client's token against the same keys."""
    (tmp_path / "pki").mkdir()
    ca = make_ca(tmp_path / "pki", name="central")
    image = await images.push_image(upstream_client, upstream.url, repo_name("auth"), "v1", layers=[MiB, 5000])
    users = {"alice": ("alice-pw", {image.repo: {"pull"}}), "bob": ("bob-pw", {"bob/own": {"pull"}})}
    with TokenIssuer(ca, users=users) as issuer, Relay(upstream.url) as relay:
        node = NodeProcess(tmp_path / "node", relay.url, workers=workers)
        node.config["auth"] = {"token": token_block(ca.cert_path, issuer.url)}
        node.config_path.write_text(json.dumps(node.config))
        node.start(timeout=120)
        try:
            if workers > 1:
                wait_workers(node, workers, timeout=180)
            host = node.url.removeprefix("http://")

            async def copy(creds: str, name: str) -> Any:
                return await run_skopeo_async("copy", "--src-tls-verify=false", "--src-creds", creds,
                                              f"docker://{host}/{image.repo}:v1", f"dir:{tmp_path / name}",
                                              check=False, timeout=180)

            denied = await copy("bob:bob-pw", "bob")
            allowed = await copy("alice:alice-pw", "alice")
            anonymous = await spread(node.url, f"/v2/{image.repo}/manifests/v1", 8)
            fetched = {digest: relay.count("GET", f"/blobs/{digest}") for digest in image.blobs}
        finally:
            node.close()
    assert allowed.returncode == 0, allowed.stderr.decode()
    out = tmp_path / "alice"
    assert sha256((out / "manifest.json").read_bytes()) == image.digest
    for digest in image.blobs:
        assert sha256((out / digest[7:]).read_bytes()) == digest
    assert denied.returncode != 0 and not (tmp_path / "bob" / "manifest.json").exists()
    assert all(spec_error(r, 401, {"UNAUTHORIZED"}) and "Bearer" in r.headers["WWW-Authenticate"]
               for r in anonymous)
    assert fetched == {digest: 1 for digest in image.blobs}
