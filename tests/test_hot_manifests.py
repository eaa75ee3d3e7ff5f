"""Hot manifests: warm answers from memory, coherent with the store and metadata, never unauthorized.

A warm manifest (by digest, or by tag within the TTL) is answered from the
node's memory with no store read, no metadata query and no upstream call;
everything that deletes (purge, a notification's delete, quarantine of a
rotten object, the tag TTL running out) is visible at the very next request;
and the token check runs on every hit (a real token signed by the test CA,
verified by the node as in production). The access log around every hit
builds nothing when INFO is off, and still counts.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from mirror.proxy.hot import HotManifests
from mirror.registry.digest import Digest
from mirror.storage.verify import verify_online
from tests.support import images
from tests.support.authenv import bearer, flip_signature, node_config, token_block
from tests.support.images import DOCKER_SCHEMA2
from tests.support.token_issuer import make_ca
from tests.test_store_tools import AUTH as ADMIN_AUTH
from tests.test_store_tools import TOKEN as ADMIN_TOKEN
from tests.test_store_tools import admin_url

ACCEPT = {"Accept": DOCKER_SCHEMA2}
REALM = "https://auth.example.test/token"


def repo_name(prefix: str = "hot/app") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Reads:
    """Counts the node's store reads and metadata queries (each one a thread hop)."""

    def __init__(self, node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = 0
        self.sql = 0
        store_read, sql = node.store.read, node.metadata._sql

        def counted_read(*args: Any) -> Any:
            self.store += 1
            return store_read(*args)

        def counted_sql(*args: Any) -> Any:
            self.sql += 1
            return sql(*args)

        monkeypatch.setattr(node.store, "read", counted_read)
        monkeypatch.setattr(node.metadata, "_sql", counted_sql)


async def cached(node: Any, upstream: Any, upstream_client: httpx.AsyncClient, repo: str) -> images.Image:
    """An image pushed upstream, its manifest pulled through the node by tag (hot from here on)."""
    image = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[1024])
    async with node.client(headers=ACCEPT) as client:
        response = await client.get(f"/v2/{repo}/manifests/v1")
    assert response.status_code == 200 and response.content == image.manifest
    return image


async def test_warm_manifest_costs_no_store_read_query_or_upstream_call(make_mirror, relay, upstream,
                                                                         upstream_client, monkeypatch) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    image = await cached(node, upstream, upstream_client, repo)
    fetched = relay.count("GET", "/manifests/")
    reads = Reads(node.node, monkeypatch)
    async with node.client(headers=ACCEPT) as client:
        for _ in range(5):
            for reference in ("v1", image.digest):
                response = await client.get(f"/v2/{repo}/manifests/{reference}")
                assert response.status_code == 200 and response.content == image.manifest
                assert response.headers["Docker-Content-Digest"] == image.digest
    assert (reads.store, reads.sql) == (0, 0)
    assert relay.count("GET", "/manifests/") == fetched and relay.count("HEAD", "/manifests/") == 0


async def test_purge_is_visible_at_the_next_request(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, admin={"token": ADMIN_TOKEN})
    repo = repo_name()
    image = await cached(node, upstream, upstream_client, repo)
    async with admin_url(node) as url, httpx.AsyncClient(base_url=url, headers=ADMIN_AUTH) as admin:
        purged = await admin.post("/admin/purge", json={"reference": f"{repo}@{image.digest}"})
    assert purged.status_code == 200 and purged.json()["objects"] >= 1
    assert node.node.store.size(Digest.parse(image.digest)) is None
    async with node.client(headers=ACCEPT) as client:
        for reference in (image.digest, "v1"):
            response = await client.get(f"/v2/{repo}/manifests/{reference}")
            assert response.status_code == 200 and response.content == image.manifest
    assert relay.count("GET", "/manifests/") == 3  # both came from upstream again (the purge took the tag too)


async def test_tag_deleted_by_notification_is_asked_of_upstream(make_mirror, relay, upstream,
                                                                 upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    image = await cached(node, upstream, upstream_client, repo)
    notifications = node.node.ops.notifications
    body = json.dumps({"events": [{"action": "delete", "target": {"repository": repo, "tag": "v1"}}]})
    assert notifications.receive(body.encode())["acted"] == 1
    await notifications.idle()
    assert await node.node.metadata.get_tag(repo, "v1") is None
    async with node.client(headers=ACCEPT) as client:
        response = await client.get(f"/v2/{repo}/manifests/v1")
    assert response.status_code == 200 and response.content == image.manifest
    assert relay.count("GET", "/manifests/") == 2


async def test_tag_pushed_upstream_is_seen_at_once_after_its_notification(make_mirror, relay, upstream,
                                                                            upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")
    repo = repo_name()
    await cached(node, upstream, upstream_client, repo)
    second = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[2048])
    notifications = node.node.ops.notifications
    event = {"action": "push", "target": {"mediaType": DOCKER_SCHEMA2, "digest": second.digest,
                                          "repository": repo, "tag": "v1", "size": len(second.manifest)}}
    assert notifications.receive(json.dumps({"events": [event]}).encode())["acted"] == 1
    await notifications.idle()
    async with node.client(headers=ACCEPT) as client:
        response = await client.get(f"/v2/{repo}/manifests/v1")
    assert response.status_code == 200 and response.content == second.manifest  # well within the hour's TTL


async def test_manifest_unlinked_by_notification_is_not_served_from_memory(make_mirror, relay, upstream,
                                                                          upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    image = await cached(node, upstream, upstream_client, repo)
    await images.delete_manifest(upstream_client, upstream.url, repo, image.digest)
    notifications = node.node.ops.notifications
    event = {"action": "delete", "target": {"repository": repo, "digest": image.digest}}
    assert notifications.receive(json.dumps({"events": [event]}).encode())["acted"] == 1
    await notifications.idle()
    async with node.client(headers=ACCEPT) as client:
        by_digest = await client.get(f"/v2/{repo}/manifests/{image.digest}")
        by_tag = await client.get(f"/v2/{repo}/manifests/v1")
    assert by_digest.status_code == 404 and by_digest.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert by_tag.status_code == 404


async def test_quarantined_manifest_is_refetched_at_the_next_request(make_mirror, relay, upstream,
                                                                     upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    image = await cached(node, upstream, upstream_client, repo)
    path: Path = node.node.store.path(Digest.parse(image.digest))
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0x01
    path.write_bytes(bytes(raw))
    report = await verify_online(node.node.store, node.node.metadata, 1)
    assert image.digest in report.quarantined
    async with node.client(headers=ACCEPT) as client:
        response = await client.get(f"/v2/{repo}/manifests/{image.digest}")
    assert response.status_code == 200 and response.content == image.manifest
    assert relay.count("GET", "/manifests/") == 2
    assert path.read_bytes() == image.manifest


async def test_tag_ttl_expiry_revalidates_at_once(wall_clock, make_mirror, relay, upstream,
                                                 upstream_client) -> None:
    node = await make_mirror(relay.url, tag_ttl="1h")
    repo = repo_name()
    first = await cached(node, upstream, upstream_client, repo)
    second = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[2048])
    async with node.client(headers=ACCEPT) as client:
        fresh = await client.get(f"/v2/{repo}/manifests/v1")
        wall_clock.advance(3601)
        moved = await client.get(f"/v2/{repo}/manifests/v1")
    assert fresh.content == first.manifest  # within the TTL: the cached tag, no upstream call
    assert moved.content == second.manifest  # the first request past it revalidated
    assert relay.count("HEAD", "/manifests/") == 1


async def test_file_deleted_behind_the_nodes_back_is_noticed_after_the_recheck(wall_clock, make_mirror, relay,
                                                                               upstream, upstream_client) -> None:
    """Another process sharing the store deleted the file: served from memory for at most the tag TTL."""
    node = await make_mirror(relay.url, tag_ttl="1h")
    repo = repo_name()
    image = await cached(node, upstream, upstream_client, repo)
    node.node.store.path(Digest.parse(image.digest)).unlink()
    async with node.client(headers=ACCEPT) as client:
        hot = await client.get(f"/v2/{repo}/manifests/{image.digest}")
        wall_clock.advance(3601)  # past the recheck: the next request reads the store
        again = await client.get(f"/v2/{repo}/manifests/{image.digest}")
    assert hot.status_code == again.status_code == 200
    assert hot.content == again.content == image.manifest
    assert relay.count("GET", "/manifests/") == 2  # the missing file was forgotten and refetched


# --------------------------------------------------------------------------- authorization on hits


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("hot-pki")
    return SimpleNamespace(central=make_ca(d, name="central"), rogue=make_ca(d, name="rogue"))


async def test_hot_hits_still_check_the_token(make_mirror, relay, upstream, upstream_client, ca,
                                              tmp_path) -> None:
    node = await make_mirror(relay.url, config=node_config(
        tmp_path, relay.url, auth={"token": token_block(ca.central.cert_path, REALM)}))
    repo, other = repo_name(), repo_name()
    image = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[1024])
    good = ca.central.mint(access=[("repository", repo, ["pull"])])
    refused = {
        "no token": None,
        "another repository": ca.central.mint(access=[("repository", other, ["pull"])]),
        "a bad signature": flip_signature(good),
        "an untrusted issuer": ca.rogue.mint(access=[("repository", repo, ["pull"])]),
        "expired": ca.central.mint(access=[("repository", repo, ["pull"])], exp_delta=-120, iat_delta=-600),
    }
    async with node.client(headers=ACCEPT) as client:
        for reference in ("v1", image.digest):  # cached, and hot
            response = await client.get(f"/v2/{repo}/manifests/{reference}", headers=bearer(good))
            assert response.status_code == 200 and response.content == image.manifest
        assert len(node.node.manifests.hot) >= 1
        for why, token in refused.items():
            for reference in ("v1", image.digest):
                headers = bearer(token) if token else {}
                for method in ("GET", "HEAD"):
                    response = await client.request(method, f"/v2/{repo}/manifests/{reference}",
                                                    headers=headers)
                    assert response.status_code == 401, (why, reference, method)
                    assert "WWW-Authenticate" in response.headers and image.manifest not in response.content
        again = await client.get(f"/v2/{repo}/manifests/{image.digest}", headers=bearer(good))
    assert again.status_code == 200 and again.content == image.manifest
    assert relay.count("GET", "/manifests/") == 1


# --------------------------------------------------------------------------- the map itself


def test_hot_manifests_are_bounded_by_bytes_and_rechecked(monkeypatch: pytest.MonkeyPatch) -> None:
    hot = HotManifests(recheck=10.0, max_bytes=4000)
    digests = [Digest.of(bytes([i]) * 1000) for i in range(6)]
    for i, digest in enumerate(digests):
        hot.put(digest, bytes([i]) * 1000)
    assert hot.bytes <= 4000 and len(hot) == 4
    assert hot.get(digests[0]) is None and hot.get(digests[5]) == bytes([5]) * 1000
    hot.put(Digest.of(b"x" * 1500), b"x" * 1500)  # more than a quarter of the bound: not kept
    assert hot.get(Digest.of(b"x" * 1500)) is None
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 11.0)
    assert hot.get(digests[5]) is None and len(hot) == 3  # due for a re-read of the stored file


# --------------------------------------------------------------------------- a cheap access log


async def test_access_log_builds_nothing_when_info_is_off_and_still_counts(mirror, caplog, monkeypatch) -> None:
    from mirror.observe import accesslog

    built: list[str] = []
    monkeypatch.setattr(accesslog, "client_address", lambda *args: built.append("client") or "-")
    monkeypatch.setattr(accesslog, "next_request_id", lambda: built.append("id") or "-")
    caplog.set_level(logging.WARNING, logger="mirror.access")
    async with mirror.client() as client:
        for _ in range(3):
            assert (await client.get("/v2/")).status_code == 200
    assert built == [] and not [r for r in caplog.records if r.name == "mirror.access"]
    registry = mirror.node.metrics.registry
    assert registry.get_sample_value("mirror_http_requests_total",
                                     {"route": "base", "method": "GET", "status": "200"}) == 3


async def test_generated_request_ids_are_distinct_and_per_process(mirror, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    async with mirror.client() as client:
        for _ in range(3):
            await client.get("/v2/")
    ids = [r.fields["request_id"] for r in caplog.records if r.name == "mirror.access"]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert len({i.split("-")[0] for i in ids}) == 1  # this process's prefix, then a counter
