"""Pull-through behaviour: one upstream fetch per blob, streamed, cached, revalidated."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import httpx
import pytest

from tests.support import images
from tests.support.images import DOCKER_SCHEMA2

ACCEPT = {"Accept": DOCKER_SCHEMA2}
MiB = 1024 * 1024


def repo_name() -> str:
    return f"pull/app-{uuid.uuid4().hex[:8]}"


async def read_blob(client: httpx.AsyncClient, url: str, started: list[float] | None = None,
                    stop_after: int | None = None) -> tuple[str, int]:
    """Stream a blob; returns (sha256 digest, bytes read)."""
    hasher = hashlib.sha256()
    count = 0
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            if started is not None and count == 0:
                started.append(time.monotonic())
            hasher.update(chunk)
            count += len(chunk)
            if stop_after is not None and count >= stop_after:
                break
    return f"sha256:{hasher.hexdigest()}", count


async def test_concurrent_cold_requests_share_one_streamed_fetch(mirror, relay, upstream,
                                                                 upstream_client) -> None:
    layer = images.make_layer("coalesce", 32 * MiB)
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[layer])
    digest = image.layers[0][0]
    relay.rate = len(layer) / 4  # the shared fetch lasts about 4 s
    first_bytes: list[float] = []
    async with mirror.client() as client:
        results = await asyncio.gather(*(
            read_blob(client, f"/v2/{image.repo}/blobs/{digest}", first_bytes) for _ in range(16)))
    fetch = next(r for r in relay.records if "/blobs/" in r.path_qs)
    assert relay.count("GET", "/blobs/") == 1
    assert relay.count("HEAD") == 0
    assert relay.bytes_sent("/blobs/") == len(layer)
    assert all(result == (digest, len(layer)) for result in results)
    assert fetch.finished_at is not None and fetch.finished_at - fetch.started_at >= 3
    assert len(first_bytes) == 16 and max(first_bytes) < fetch.finished_at


async def test_first_client_leaving_does_not_cancel_the_fetch(mirror, relay, upstream, upstream_client) -> None:
    layer = images.make_layer("disconnect", 8 * MiB)
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[layer])
    digest = image.layers[0][0]
    url = f"/v2/{image.repo}/blobs/{digest}"
    relay.rate = len(layer) / 2
    async with mirror.client() as quitter, mirror.client() as stayer:
        leaving = asyncio.create_task(read_blob(quitter, url, stop_after=MiB))
        await relay.wait_for_async(1, "GET", "/blobs/", timeout=30)  # the quitter's fetch is under way
        staying = asyncio.create_task(read_blob(stayer, url))
        _, read = await leaving
        assert read < len(layer)
        assert await staying == (digest, len(layer))
    relay.rate = None
    relay.down = True  # the object was committed: served without the link
    async with mirror.client() as client:
        assert await read_blob(client, url) == (digest, len(layer))
    assert relay.count("GET", "/blobs/") == 1


async def test_second_pull_is_served_locally(mirror, relay, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[MiB, 1000])
    async with mirror.client(headers=ACCEPT) as client:
        for _ in range(2):
            assert (await client.get(f"/v2/{image.repo}/manifests/v1")).content == image.manifest
            for digest, data in image.blobs.items():
                assert (await client.get(f"/v2/{image.repo}/blobs/{digest}")).content == data
    assert relay.count("GET", "/manifests/") == 1
    assert relay.count("GET", "/blobs/") == len(image.blobs)
    assert relay.count("HEAD") == 0


async def test_stale_while_revalidate_costs_one_head(wall_clock, make_mirror, relay, upstream,
                                                    upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")  # the 100 requests all fall inside the next TTL
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    url = f"/v2/{image.repo}/manifests/v1"
    async with node.client(headers=ACCEPT) as client:
        await client.get(url)
        wall_clock.advance(3601)
        relay.reset()
        relay.latency = 0.3  # requests pile up while the revalidation is in flight
        responses = await asyncio.gather(*(client.get(url) for _ in range(100)))
    assert {r.headers["Docker-Content-Digest"] for r in responses} == {image.digest}
    assert relay.count("HEAD", "/manifests/") == 1
    assert relay.count("GET") == 0


async def test_repointed_tag_is_seen_after_the_ttl(wall_clock, make_mirror, relay, upstream,
                                                  upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")  # the push below takes no part of it
    repo = repo_name()
    old = await images.push_image(upstream_client, upstream.url, repo, "v1", seed="old")
    async with node.client(headers=ACCEPT) as client:
        assert (await client.get(f"/v2/{repo}/manifests/v1")).headers["Docker-Content-Digest"] == old.digest
        new = await images.push_image(upstream_client, upstream.url, repo, "v1", seed="new")
        within = await client.get(f"/v2/{repo}/manifests/v1")
        wall_clock.advance(3601)
        after = await client.get(f"/v2/{repo}/manifests/v1")
    assert within.headers["Docker-Content-Digest"] == old.digest
    assert after.headers["Docker-Content-Digest"] == new.digest
    assert after.content == new.manifest


async def test_stale_tag_and_cached_blobs_served_with_link_down(wall_clock, make_mirror, relay, upstream,
                                                                upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with node.client(headers=ACCEPT) as client:
        await client.get(f"/v2/{image.repo}/manifests/v1")
        for digest in image.blobs:
            await client.get(f"/v2/{image.repo}/blobs/{digest}")
        await client.get(f"/v2/{image.repo}/tags/list")
        relay.down = True
        wall_clock.advance(3601)
        manifest = await client.get(f"/v2/{image.repo}/manifests/v1")
        blobs = [await client.get(f"/v2/{image.repo}/blobs/{d}") for d in image.blobs]
        tags = await client.get(f"/v2/{image.repo}/tags/list")
    assert manifest.status_code == 200 and manifest.content == image.manifest
    assert [b.content for b in blobs] == list(image.blobs.values())
    assert tags.json()["tags"] == ["v1"]


async def test_deleted_tag_is_not_served_stale(wall_clock, make_mirror, relay, upstream,
                                              upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with node.client(headers=ACCEPT) as client:
        assert (await client.get(f"/v2/{image.repo}/manifests/v1")).status_code == 200
        await images.delete_manifest(upstream_client, upstream.url, image.repo, image.digest)
        wall_clock.advance(3601)
        gone = await client.get(f"/v2/{image.repo}/manifests/v1")
        relay.down = True
        still_gone = await client.get(f"/v2/{image.repo}/manifests/v1")
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert still_gone.status_code != 200


@pytest.mark.parametrize("status", [401, 403])
async def test_revoked_tag_is_not_served_stale(wall_clock, make_mirror, relay, upstream, upstream_client,
                                              status) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with node.client(headers=ACCEPT) as client:
        assert (await client.get(f"/v2/{image.repo}/manifests/v1")).status_code == 200
        relay.fault = lambda record: status if "/manifests/" in record.path_qs else None
        wall_clock.advance(3601)
        revoked = await client.get(f"/v2/{image.repo}/manifests/v1")
    assert revoked.status_code == status


async def test_restart_keeps_the_cache(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with node.client(headers=ACCEPT) as client:
        await client.get(f"/v2/{image.repo}/manifests/v1")
        for digest in image.blobs:
            await client.get(f"/v2/{image.repo}/blobs/{digest}")
    await node.restart()
    relay.down = True
    async with node.client(headers=ACCEPT) as client:
        manifest = await client.get(f"/v2/{image.repo}/manifests/v1")
        blobs = [await client.get(f"/v2/{image.repo}/blobs/{d}") for d in image.blobs]
    assert manifest.content == image.manifest
    assert [b.content for b in blobs] == list(image.blobs.values())


async def test_upstream_not_found_is_remembered_briefly(make_mirror, relay) -> None:
    node = await make_mirror(relay.url, negative_ttl="5s")
    missing = f"/v2/{repo_name()}/blobs/sha256:{'1' * 64}"
    async with node.client() as client:
        statuses = [(await client.get(missing)).status_code for _ in range(5)]
    assert statuses == [404] * 5
    assert relay.count("GET", "/blobs/") == 1


async def test_temp_files_of_an_interrupted_fetch_are_swept_at_start(make_mirror, relay, upstream,
                                                                     upstream_client) -> None:
    node = await make_mirror(relay.url)
    tmp = node.node.store.root / "tmp"
    (tmp / "12345-deadbeef0000-0123456789abcdef.part").write_bytes(b"partial")
    (tmp / "12345-deadbeef0000.lock").write_bytes(b"")
    await node.restart()
    assert sorted(p.suffix for p in tmp.iterdir()) == [".lock"]  # only the live node's lock


async def test_edge_node_ttl_does_not_stack_on_the_middle_node(wall_clock, make_mirror, relay, upstream,
                                                              upstream_client) -> None:
    middle = await make_mirror(relay.url, tag_ttl="1h")
    edge = await make_mirror(middle.url, tag_ttl="1h")
    repo = repo_name()
    old = await images.push_image(upstream_client, upstream.url, repo, "v1", seed="edge-old")
    async with middle.client(headers=ACCEPT) as client:
        first = await client.get(f"/v2/{repo}/manifests/v1")
    assert first.headers["Cache-Control"] == "max-age=3600" and first.headers["Age"] == "0"
    wall_clock.advance(2000)
    async with edge.client(headers=ACCEPT) as client:
        via_edge = await client.get(f"/v2/{repo}/manifests/v1")
        assert via_edge.headers["Docker-Content-Digest"] == old.digest
        assert int(via_edge.headers["Age"]) >= 2000  # dated from the middle node's confirmation
        new = await images.push_image(upstream_client, upstream.url, repo, "v1", seed="edge-new")
        wall_clock.advance(2000)  # past the middle's TTL, and so past the edge's: no stacking
        after = await client.get(f"/v2/{repo}/manifests/v1")
    assert after.headers["Docker-Content-Digest"] == new.digest


async def test_shared_fetch_continues_with_another_waiters_token(mirror, relay, upstream, upstream_client) -> None:
    """A token refused mid-way (expired) is replaced by another waiting client's."""
    from mirror.registry.digest import Digest
    from mirror.upstream.credential import Credential

    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[MiB])
    digest, data = image.layers[0]

    def refuse_expired(record):
        headers = {k.lower(): v for k, v in (record.request_headers or {}).items()}
        return 401 if headers.get("authorization") == "Bearer expired" else None

    relay.fault = refuse_expired
    fetcher = mirror.node.blobs.fetcher
    fetch = fetcher.start(image.repo, Digest.parse(digest), Credential.client("Bearer expired"))
    fetcher.start(image.repo, Digest.parse(digest), Credential.client("Bearer fresh"))  # a second client joins
    await fetch.done.wait()
    assert fetch.committed and fetch.error is None
    used = [{k.lower(): v for k, v in (r.request_headers or {}).items()}.get("authorization")
            for r in relay.records if "/blobs/" in r.path_qs]
    assert used == ["Bearer expired", "Bearer fresh"]
    async with mirror.client() as client:
        assert (await client.get(f"/v2/{image.repo}/blobs/{digest}")).content == data


async def test_edge_chain_serves_the_same_digests_and_warm_pulls_stay_at_the_edge(
        make_mirror, relay, upstream, upstream_client) -> None:
    """edge -> middle -> upstream: same digests; a second pull through the edge goes nowhere."""
    from tests.support.relay import Relay

    middle = await make_mirror(relay.url, tag_ttl="1h")
    with Relay(middle.url) as middle_link:
        edge = await make_mirror(middle_link.url, tag_ttl="1h")
        image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[MiB, 3000])
        async with edge.client(headers=ACCEPT) as client:
            first = await client.get(f"/v2/{image.repo}/manifests/v1")
            blobs = {d: (await client.get(f"/v2/{image.repo}/blobs/{d}")).content for d in image.blobs}
            relay.reset()
            middle_link.reset()
            second = await client.get(f"/v2/{image.repo}/manifests/v1")
            again = {d: (await client.get(f"/v2/{image.repo}/blobs/{d}")).content for d in image.blobs}
        assert middle_link.count() == 0
    assert first.headers["Docker-Content-Digest"] == second.headers["Docker-Content-Digest"] == image.digest
    assert blobs == again == image.blobs
    assert relay.count() == 0
