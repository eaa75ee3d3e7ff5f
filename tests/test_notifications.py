"""Notifications: push events in (a real distribution upstream), pull events out."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from mirror.api.debug import create_debug_app
from mirror.ops import events as events_module
from mirror.ops.events import EVENTS_MEDIA_TYPE
from mirror.registry.digest import Digest
from tests.conftest import mirror_config
from tests.support import images
from tests.support.images import DOCKER_LAYER, DOCKER_SCHEMA2, MANIFEST_ACCEPT
from tests.support.procs import free_port
from tests.support.registry import Registry, run_registry
from tests.support.relay import Relay
from tests.support.waits import wait_until

ADMIN_TOKEN = "admin-secret-for-tests"
NOTIFY_TOKEN = "notify-secret-for-tests"  # what the registry holds: /admin/notify only


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]




# -- push notifications in, from a real distribution registry --------------------------------------


@pytest.fixture
def debug_port() -> int:
    return free_port()


@pytest.fixture
def central(tmp_path: Path, debug_port: int) -> Iterator[Registry]:
    """A central registry whose notifications go to the node's admin endpoint (with the notify token)."""
    endpoint = {"name": "edge", "url": f"http://127.0.0.1:{debug_port}/admin/notify", "timeout": "2s",
                "threshold": 3, "backoff": "200ms",
                "headers": {"Authorization": [f"Bearer {NOTIFY_TOKEN}"]}}
    with run_registry(tmp_path / "central", notifications=[endpoint]) as registry:
        yield registry


@pytest.fixture
def central_relay(central: Registry) -> Iterator[Relay]:
    with Relay(central.url) as link:
        yield link


@pytest.fixture
async def notified(make_mirror, central_relay, debug_port) -> AsyncIterator[Any]:
    """A node in front of the central registry (tags trusted 1h), its admin listener on debug_port."""
    node = await make_mirror(central_relay.url, tag_ttl="1h", admin={"token": ADMIN_TOKEN},
                             notify={"token": NOTIFY_TOKEN}, prefetch={"rules": ["warm/*"]})
    runner, _ = await serve(create_debug_app(node.node), debug_port)
    yield node
    await runner.cleanup()


async def cached_digest(node: Any, repo: str, tag: str) -> str | None:
    record = await node.node.metadata.get_tag(repo, tag)
    return str(record.digest) if record is not None else None


async def test_push_moves_the_cached_tag_without_a_pull(notified, central, central_relay) -> None:
    repo = unique("team/app")
    async with httpx.AsyncClient(timeout=30) as pusher, notified.client(
            headers={"Accept": DOCKER_SCHEMA2}) as client:
        v1 = await images.push_image(pusher, central.url, repo, "latest", seed="v1")
        assert (await client.get(f"/v2/{repo}/manifests/latest")).content == v1.manifest
        v2 = await images.push_image(pusher, central.url, repo, "latest", seed="v2")
        await wait_until(lambda: _is(cached_digest(notified, repo, "latest"), v2.digest), what="tag moved")
        client_gets = central_relay.count("GET", f"/manifests/{v2.digest}")
        assert client_gets == 1  # the node fetched v2 itself, once
        central_relay.down = True
        response = await client.get(f"/v2/{repo}/manifests/latest")
    assert response.status_code == 200 and response.content == v2.manifest


async def test_push_to_a_rule_repository_prefetches_its_blobs(notified, central, central_relay) -> None:
    repo = unique("warm/app")  # matches mirror.prefetch.rules
    async with httpx.AsyncClient(timeout=30) as pusher, notified.client(
            headers={"Accept": MANIFEST_ACCEPT}) as client:
        index = await images.push_index(pusher, central.url, repo, "v1")
        await wait_until(lambda: _is(cached_digest(notified, repo, "v1"), index.digest), what="tag cached")
        await wait_until(lambda: all_stored(notified, index.blobs), what="blobs prefetched")
        await notified.node.ops.notifications.idle()
        central_relay.down = True
        assert (await client.get(f"/v2/{repo}/manifests/v1")).content == index.manifest
        for image in index.images:
            assert (await client.get(f"/v2/{repo}/manifests/{image.digest}")).content == image.manifest
            for digest, data in image.blobs.items():
                assert (await client.get(f"/v2/{repo}/blobs/{digest}")).content == data


async def test_delete_forgets_tags_and_links(notified, central) -> None:
    repo = unique("team/gone")
    async with httpx.AsyncClient(timeout=30) as pusher, notified.client(
            headers={"Accept": DOCKER_SCHEMA2}) as client:
        image = await images.push_image(pusher, central.url, repo, "v1")
        assert (await client.get(f"/v2/{repo}/manifests/v1")).status_code == 200
        await images.delete_manifest(pusher, central.url, repo, image.digest)
        await wait_until(lambda: _is(cached_digest(notified, repo, "v1"), None), what="tag forgotten")
        assert not await notified.node.metadata.is_linked(repo, Digest.parse(image.digest))
        assert (await client.get(f"/v2/{repo}/manifests/v1")).status_code == 404


async def _is(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def all_stored(node: Any, blobs: dict[str, bytes]) -> bool:
    return all([await node.node.metadata.get_object(Digest.parse(d)) is not None for d in blobs])


# -- envelopes posted directly: what is acted on, order, duplicates, forwarding ----------------------


def envelope(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def push_event(repo: str, digest: str, tag: str | None = None, media_type: str = DOCKER_SCHEMA2) -> dict[str, Any]:
    target: dict[str, Any] = {"mediaType": media_type, "digest": digest, "repository": repo, "size": 1,
                              "url": "http://elsewhere.invalid/v2/x"}
    if tag:
        target["tag"] = tag
    return {"id": str(uuid.uuid4()), "action": "push", "target": target, "request": {}, "actor": {},
            "source": {}}


@pytest.fixture
async def admin_of(mirror) -> AsyncIterator[httpx.AsyncClient]:
    runner, url = await serve(create_debug_app(mirror.node))
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 headers={"Content-Type": EVENTS_MEDIA_TYPE}) as client:
        yield client
    await runner.cleanup()


async def test_only_tagged_manifest_pushes_and_deletes_are_acted_on(mirror, admin_of) -> None:
    body = envelope(
        push_event("a/b", "sha256:" + "1" * 64, media_type=DOCKER_LAYER),  # a layer
        push_event("a/b", "sha256:" + "2" * 64),  # a manifest without a tag (not a rule repo)
        {**push_event("a/b", "sha256:" + "3" * 64, "v1"), "action": "pull"},
        {"action": "mount", "target": {"repository": "a/b"}},
        push_event("a/b", "sha256:" + "4" * 64, "v1"),
        {"action": "delete", "target": {"repository": "a/b", "tag": "v1"}},
    )
    response = await admin_of.post("/admin/notify", content=body)
    assert response.status_code == 200
    assert response.json() == {"events": 6, "acted": 2, "ignored": 4}
    assert (await admin_of.post("/admin/notify", content=b"not json")).status_code == 400


async def test_a_big_envelope_in_pieces_is_read_whole(mirror, admin_of) -> None:
    """An envelope arriving in pieces is read to its end, not cut at what is buffered (R-PUSH-01)."""
    pulls = [{**push_event("a/b", "sha256:" + "6" * 64, "v1"), "action": "pull"} for _ in range(700)]
    body = envelope(*pulls)
    assert len(body) > 150_000

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 40_000):
            yield body[start:start + 40_000]
            await asyncio.sleep(0.1)

    response = await admin_of.post("/admin/notify", content=pieces())
    assert response.status_code == 200, response.text
    assert response.json() == {"events": 700, "acted": 0, "ignored": 700}


async def test_reordered_and_duplicate_events_end_at_upstreams_truth(mirror, admin_of, relay, upstream,
                                                                     upstream_client) -> None:
    repo = unique("team/order")
    old = await images.push_image(upstream_client, upstream.url, repo, "latest", seed="old")
    async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        await client.get(f"/v2/{repo}/manifests/latest")
    new = await images.push_image(upstream_client, upstream.url, repo, "latest", seed="new")
    ops = mirror.node.ops
    ops.notifications.settle = 0.5
    # the newer event, then a late retry of the older one, then duplicates
    for event in (push_event(repo, new.digest, "latest"), push_event(repo, old.digest, "latest"),
                  push_event(repo, new.digest, "latest"), push_event(repo, new.digest, "latest")):
        assert (await admin_of.post("/admin/notify", content=envelope(event))).status_code == 200
    await ops.notifications.idle()
    assert str((await mirror.node.metadata.get_tag(repo, "latest")).digest) == new.digest
    assert relay.count("GET", f"/manifests/{new.digest}") == 1


async def test_tags_never_served_here_are_left_alone(mirror, admin_of, relay) -> None:
    relay.reset()
    await admin_of.post("/admin/notify", content=envelope(push_event("x/y", "sha256:" + "5" * 64, "v1")))
    await mirror.node.ops.notifications.idle()
    assert relay.requests == []


async def test_envelopes_are_forwarded_to_edge_zones(make_mirror, relay) -> None:
    edge = await make_mirror(relay.url)
    edge_runner, edge_url = await serve(create_debug_app(edge.node))
    try:
        zone = await make_mirror(relay.url, notify={"forward_to": [f"{edge_url}/admin/notify"],
                                                    "allow_insecure_forward": True})
        zone_runner, zone_url = await serve(create_debug_app(zone.node))
        try:
            body = envelope(push_event("a/b", "sha256:" + "6" * 64, "v1"))
            async with httpx.AsyncClient() as client:
                assert (await client.post(f"{zone_url}/admin/notify", content=body)).status_code == 200
            await wait_until(lambda: edge.node.ops.notifications.received == 1, what="forwarded envelope")
        finally:
            await zone_runner.cleanup()
    finally:
        await edge_runner.cleanup()


# -- pull events out --------------------------------------------------------------------------------


class Endpoint:
    """A notification endpoint that records envelopes; fails the first `fail` deliveries."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts: list[float] = []
        self.envelopes: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for envelope in self.envelopes for e in envelope["events"]]

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.fail:
            return web.Response(status=500)
        self.envelopes.append(json.loads(await request.read()))
        self.headers.append(dict(request.headers))
        return web.Response(status=200)


@pytest.fixture
async def endpoint_server() -> AsyncIterator[Any]:
    runners = []

    async def start(endpoint: Endpoint) -> str:
        app = web.Application()
        app.router.add_post("/events", endpoint.handle)
        runner, url = await serve(app)
        runners.append(runner)
        return f"{url}/events"

    yield start
    for runner in runners:
        await runner.cleanup()


async def node_with_endpoint(make_mirror: Any, tmp_path: Path, remote: str, url: str, **endpoint: Any) -> Any:
    root = tmp_path / f"events-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    config = mirror_config(root, remote)
    config["notifications"] = {"endpoints": [{"name": "central", "url": url, "timeout": "5s",
                                              "threshold": 2, "backoff": "500ms",
                                              "headers": {"X-Zone": ["edge-1"]}, **endpoint}]}
    return await make_mirror(remote, config=config)


async def test_pull_events_in_distributions_format(make_mirror, relay, tmp_path, endpoint_server, upstream,
                                                   upstream_client) -> None:
    endpoint = Endpoint()
    node = await node_with_endpoint(make_mirror, tmp_path, relay.url, await endpoint_server(endpoint))
    image = await images.push_image(upstream_client, upstream.url, unique("pulls/app"), "v1")
    async with node.client(headers={"Accept": DOCKER_SCHEMA2, "User-Agent": "docker/27.0",
                                    "X-Request-Id": "req-42"}) as client:
        await client.get(f"/v2/{image.repo}/manifests/v1")  # a miss: upstream saw that GET itself
        await client.get(f"/v2/{image.repo}/manifests/v1")  # a hit: event
        await client.head(f"/v2/{image.repo}/manifests/v1")  # HEAD: no event
        await client.get(f"/v2/{image.repo}/manifests/{image.digest}")  # by digest, a hit: event
    await wait_until(lambda: len(endpoint.events) == 2, what="two pull events")
    await asyncio.sleep(0.2)
    assert len(endpoint.events) == 2
    by_tag, by_digest = endpoint.events
    assert set(by_tag) == {"id", "timestamp", "action", "target", "request", "actor", "source"}
    assert by_tag["action"] == "pull" and by_tag["actor"] == {}
    assert by_tag["target"] == {
        "mediaType": DOCKER_SCHEMA2, "size": len(image.manifest), "digest": image.digest,
        "length": len(image.manifest), "repository": image.repo, "tag": "v1",
        "url": f"{node.url}/v2/{image.repo}/manifests/{image.digest}"}
    assert "tag" not in by_digest["target"]
    request = by_tag["request"]
    assert request["id"] == "req-42" and request["method"] == "GET" and request["useragent"] == "docker/27.0"
    assert request["host"] == node.host and request["addr"].startswith("127.0.0.1:")
    assert set(by_tag["source"]) == {"addr", "instanceID"}
    assert by_tag["source"]["instanceID"] == node.node.ops.instance_id
    assert by_tag["timestamp"].endswith("Z") and by_tag["id"] != by_digest["id"]
    headers = endpoint.headers[0]
    assert headers["Content-Type"] == EVENTS_MEDIA_TYPE and headers["X-Zone"] == "edge-1"


async def test_pull_events_retry_with_threshold_and_backoff(make_mirror, relay, tmp_path, endpoint_server,
                                                            upstream, upstream_client) -> None:
    endpoint = Endpoint(fail=3)
    node = await node_with_endpoint(make_mirror, tmp_path, relay.url, await endpoint_server(endpoint),
                                    backoff="2s")  # long enough to tell "at once" on a loaded machine
    image = await images.push_image(upstream_client, upstream.url, unique("pulls/retry"), "v1")
    async with node.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        await client.get(f"/v2/{image.repo}/manifests/v1")
        await client.get(f"/v2/{image.repo}/manifests/v1")
    await wait_until(lambda: len(endpoint.events) == 1, what="the event after retries")
    gaps = [b - a for a, b in zip(endpoint.attempts, endpoint.attempts[1:])]
    assert len(endpoint.attempts) == 4
    assert gaps[0] < 1.0  # under the threshold (2): retried at once (typically ms)
    assert all(g >= 1.95 for g in gaps[1:])  # then backoff (2s) between attempts


async def test_pull_event_queue_is_bounded(make_mirror, relay, tmp_path, upstream, upstream_client,
                                           monkeypatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_LIMIT", 3)
    dead = f"http://127.0.0.1:{free_port()}/events"  # nothing listens
    node = await node_with_endpoint(make_mirror, tmp_path, relay.url, dead, backoff="10s")
    image = await images.push_image(upstream_client, upstream.url, unique("pulls/drop"), "v1")
    async with node.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        for _ in range(21):
            assert (await client.get(f"/v2/{image.repo}/manifests/v1")).status_code == 200
    sink = node.node.ops.events.sinks[0]
    assert len(sink.queue) <= 3
    assert sink.dropped >= 20 - 3 - 1  # one batch may be out for delivery
    exposition = node.node.metrics.exposition().decode()
    assert 'mirror_notification_events_dropped_total{endpoint="central"}' in exposition
