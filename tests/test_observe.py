"""Debug listener (metrics, health, readiness) and the access log."""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import pytest
from aiohttp import web

from mirror.api.debug import create_debug_app
from mirror.logs import JSONFormatter
from tests.support import images
from tests.support.images import DOCKER_SCHEMA2


@pytest.fixture
async def debug_url(mirror):
    runner = web.AppRunner(create_debug_app(mirror.node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_hits_misses_and_bytes(mirror, debug_url, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, f"obs/app-{uuid.uuid4().hex[:6]}", "v1")
    digest, data = image.layers[0]
    async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        await client.get(f"/v2/{image.repo}/manifests/v1")
        await client.get(f"/v2/{image.repo}/blobs/{digest}")
        await client.get(f"/v2/{image.repo}/blobs/{digest}")
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{debug_url}/metrics")).text
    assert metric(text, "mirror_cache_requests_total", kind="blob", outcome="miss") == 1
    assert metric(text, "mirror_cache_requests_total", kind="blob", outcome="hit") == 1
    assert metric(text, "mirror_cache_requests_total", kind="manifest", outcome="miss") == 1
    assert metric(text, "mirror_upstream_bytes_saved_total") == len(data)
    assert metric(text, "mirror_upstream_requests_total", method="GET", status="200") == 2
    assert metric(text, "mirror_http_requests_total", route="blob", method="GET", status="200") == 2
    assert metric(text, "mirror_store_objects") == 2
    assert metric(text, "mirror_inflight_fetches") == 0


async def test_health_and_readiness(mirror, debug_url, relay) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{debug_url}/debug/health")).status_code == 200
        ready = await client.get(f"{debug_url}/debug/ready")
        relay.down = True
        ready_without_link = await client.get(f"{debug_url}/debug/ready")
    assert ready.status_code == 200
    assert (ready.json()["store_writable"], ready.json()["upstream_reachable"]) == (True, True)
    assert ready_without_link.status_code == 200
    assert ready_without_link.json()["upstream_reachable"] is False


async def test_access_log_line_per_request_without_credentials(mirror, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    async with mirror.client() as client:
        await client.get("/v2/", headers={"Authorization": "Bearer secret-token-value", "X-Request-Id": "r-1"})
    records = [r for r in caplog.records if r.name == "mirror.access"]
    assert len(records) == 1
    line = JSONFormatter().format(records[0])
    entry = json.loads(line)
    assert entry["method"] == "GET" and entry["path"] == "/v2/" and entry["status"] == 200
    assert entry["request_id"] == "r-1" and entry["cache"] == "-"
    assert "secret-token-value" not in line


async def test_forwarded_for_only_from_trusted_proxies(make_mirror, relay, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    untrusted = await make_mirror(relay.url)
    trusted = await make_mirror(relay.url, trusted_proxies=["127.0.0.0/8"])
    for node in (untrusted, trusted):
        async with node.client() as client:
            await client.get("/v2/", headers={"X-Forwarded-For": "10.1.2.3"})
    clients = [r.fields["client"] for r in caplog.records if r.name == "mirror.access"]
    assert clients == ["127.0.0.1", "10.1.2.3"]
