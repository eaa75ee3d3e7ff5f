"""Operating the node: shutdown, the zone's registry names, start-up warnings, prewarm refusals.

Each provoked failure has a case ID (``pytest -k R-OPS-01``), listed in
`CASES` and in README's Reliability table, as in tests/test_reliability.py.
The upstream is the real distribution registry throughout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import images
from tests.support.authenv import Central, bearer
from tests.support.token_issuer import make_ca
from tests.test_notifications import Endpoint, node_with_endpoint
from tests.support.faults import NodeProcess
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import free_port

MiB = 1 << 20
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
ACCEPT = {"Accept": DOCKER_SCHEMA2}

CASES = {
    "R-OPS-01": "SIGTERM with a slow client in the middle of a 32 MiB blob (shutdown_grace 2 s): "
                "/debug/ready answers 503 at once, the client is cut after the grace, the process "
                "exits 0 well inside grace + 5 s, and access times and pull counts are on disk",
    "R-OPS-02": "SIGTERM with nothing in flight: the process exits at once (no wait for the grace)",
    "R-OPS-03": "containerd's ?ns= names the zone's registry while proxy.remoteurl is an IP: with the "
                "name in mirror.names the node serves it; an unknown ns is 404 NAME_UNKNOWN, logged "
                "once per value and counted in mirror_unknown_namespace_total",
    "R-OPS-04": "proxy.remoteurl is an IP and mirror.names is empty: one warning at start naming "
                "mirror.names; none with names configured or with a host name",
    "R-OPS-05": "a prewarm the central registry refuses (wrong proxy.password, or anonymous): the job's "
                "error and the node's log name the refusal and whose credentials were refused",
    "R-OPS-06": "an aiohttp without the internals the slowloris guard reads (an upgrade past the pinned "
                "range): a warning at start says the guard is inactive; the installed aiohttp is "
                "inside the pinned range and guarded",
    "R-OPS-07": "pull events still queued at shutdown (the endpoint failing, then backing off): "
                "delivered before the node stops",
}


def repo_name() -> str:
    return f"ops/app-{uuid.uuid4().hex[:8]}"


def node_with_debug(root: Path, remote_url: str, **mirror: Any) -> tuple[NodeProcess, int]:
    """A `mirror serve` process with its debug listener on a port of its own."""
    node = NodeProcess(root, remote_url, **mirror)
    debug_port = free_port()
    node.config["http"]["debug"] = {"addr": f"127.0.0.1:{debug_port}"}
    node.config_path.write_text(json.dumps(node.config))  # JSON is YAML
    return node, debug_port


async def slow_download(port: int, path: str, cut: asyncio.Event, started: asyncio.Event) -> int:
    """GET `path` through a small receive buffer, reading 4 KiB every 0.2 s; bytes read until cut."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    received = 0
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
            except (OSError, TimeoutError):
                break
            if not data:
                break
            received += len(data)
            started.set()
            await asyncio.sleep(0.2)
    finally:
        sock.close()
        cut.set()
    return received


async def wait_exit(node: NodeProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (code := node.process.poll()) is None:
        assert time.monotonic() < deadline, "the node did not exit"
        await asyncio.sleep(0.05)
    return code


@pytest.mark.parametrize("case_id", ["R-OPS-01"])
async def test_sigterm_drains_within_the_grace_and_flushes(tmp_path, upstream, upstream_client,
                                                           case_id) -> None:
    layer = images.make_layer(uuid.uuid4().hex, 32 * MiB, compresslevel=0)
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[layer])
    digest = image.layer_digests[0]
    node, debug_port = node_with_debug(tmp_path / "node", upstream.url, shutdown_grace="2s")
    node.start()
    try:
        async with httpx.AsyncClient(base_url=node.url, timeout=60) as client:
            manifest = await client.get(f"/v2/{image.repo}/manifests/v1", headers=ACCEPT)
            assert manifest.status_code == 200
            assert (await client.get(f"/v2/{image.repo}/blobs/{digest}")).content == layer  # now stored
        served_after = time.time()
        cut, started = asyncio.Event(), asyncio.Event()
        download = asyncio.create_task(slow_download(node.port, f"/v2/{image.repo}/blobs/{digest}", cut, started))
        await asyncio.wait_for(started.wait(), 10)
        ready = f"http://127.0.0.1:{debug_port}/debug/ready"
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(ready)).status_code == 200
            signalled = time.monotonic()
            node.process.signal(signal.SIGTERM)
            statuses = []
            while not cut.is_set() and len(statuses) < 20:
                try:
                    statuses.append((await client.get(ready)).status_code)
                except httpx.HTTPError:
                    break
                if statuses[-1] == 503:
                    break
                await asyncio.sleep(0.05)
            assert statuses and statuses[-1] == 503, statuses  # out of rotation while still draining
        received = await asyncio.wait_for(download, 30)
        cut_after = time.monotonic() - signalled
        code = await wait_exit(node, 30)
        exited_after = time.monotonic() - signalled
    finally:
        node.stop()
    assert 0 < received < len(layer)  # mid-download, then cut short
    assert cut_after >= 2.0 - 0.1  # the grace was given
    assert code == 0  # not the last-resort exit (grace + 5 s)
    assert exited_after < 2.0 + 5.0, exited_after  # the bound that matters: inside grace + budget
    log = node.process.log_text()
    assert "cutting 1 requests still in flight" in log
    pulls = json.loads((node.store / "metadata" / "popularity.json").read_text())
    assert {"repository": image.repo, "tag": "v1"}.items() <= pulls[0].items()
    db = sqlite3.connect(node.metadata_db)
    try:
        (last_access,) = db.execute("SELECT last_access FROM objects WHERE digest=?", (digest,)).fetchone()
    finally:
        db.close()
    assert last_access >= served_after  # the slow download's access time was flushed


@pytest.mark.parametrize("case_id", ["R-OPS-02"])
async def test_sigterm_when_idle_exits_at_once(tmp_path, upstream, case_id) -> None:
    node, _ = node_with_debug(tmp_path / "node", upstream.url)  # default grace: 20 s
    node.start()
    try:
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
            assert (await client.get("/v2/")).status_code == 200  # a kept-alive idle connection
            signalled = time.monotonic()
            node.process.signal(signal.SIGTERM)
            code = await wait_exit(node, 30)
    finally:
        node.stop()
    assert code == 0
    assert time.monotonic() - signalled < 10  # far below the 20 s grace


def unknown_namespaces(node: Any) -> float:
    for family in text_string_to_metric_families(node.node.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == "mirror_unknown_namespace_total":
                return sample.value
    raise AssertionError("mirror_unknown_namespace_total not exported")


@pytest.mark.parametrize("case_id", ["R-OPS-03"])
async def test_zone_registry_name_is_served_and_unknown_ns_counted(make_mirror, upstream, upstream_client,
                                                                  caplog, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[2048])
    node = await make_mirror(upstream.url, names=["Hub.Yun.Paic.Com.Cn", "registry.zone.example:5000"])
    path = f"/v2/{image.repo}/manifests/v1"
    async with node.client() as client:
        for ns in ("hub.yun.paic.com.cn", "HUB.yun.paic.com.cn", "registry.zone.example:5000",
                   upstream.host):
            got = await client.get(path, params={"ns": ns}, headers=ACCEPT)
            assert (got.status_code, got.content) == (200, image.manifest), ns
        layer = image.layer_digests[0]
        blob = await client.get(f"/v2/{image.repo}/blobs/{layer}", params={"ns": "hub.yun.paic.com.cn"})
        assert blob.status_code == 200
        assert unknown_namespaces(node) == 0
        caplog.clear()
        for _ in range(3):
            other = await client.get(path, params={"ns": "docker.io"}, headers=ACCEPT)
            assert other.status_code == 404 and other.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        third = await client.get(path, params={"ns": "quay.io"}, headers=ACCEPT)
        assert third.status_code == 404
    assert unknown_namespaces(node) == 4
    warnings = [r.getMessage() for r in caplog.records if "(?ns=)" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once per value
    assert "'docker.io'" in warnings[0] and "mirror.names" in warnings[0]


@pytest.mark.parametrize("case_id", ["R-OPS-04"])
async def test_ip_upstream_without_names_warns_at_start(make_mirror, upstream, caplog, case_id) -> None:
    caplog.set_level("WARNING", logger="mirror.node")
    await make_mirror(upstream.url)  # http://127.0.0.1:PORT
    warned = [r.getMessage() for r in caplog.records if "mirror.names is empty" in r.getMessage()]
    assert len(warned) == 1 and "127.0.0.1" in warned[0]
    caplog.clear()
    await make_mirror(upstream.url, names=["hub.yun.paic.com.cn"])
    await make_mirror(upstream.url.replace("127.0.0.1", "localhost"))
    assert not [r for r in caplog.records if "mirror.names is empty" in r.getMessage()]


@pytest.mark.parametrize(("case_id", "proxy", "whose"), [
    ("R-OPS-05", {"username": "zone-bot", "password": "wrong"}, "the node's own account (proxy.username zone-bot)"),
    ("R-OPS-05-anonymous", None, "the node's own account (anonymous: no proxy.username)"),
])
async def test_prewarm_refused_upstream_says_why_and_whose(make_mirror, tmp_path, caplog, case_id, proxy,
                                                           whose) -> None:
    repo = repo_name()
    users = {"zone-bot": ("right", {repo: {"pull"}})}
    (tmp_path / "pki").mkdir()
    with Central(tmp_path / "central", make_ca(tmp_path / "pki"), users=users) as central:
        async with httpx.AsyncClient(timeout=30) as seed:
            await images.push_image(seed, central.registry.url, repo, "v1", layers=[1024],
                                    headers=bearer(central.admin_token(repo)))
        node = await make_mirror(central.registry.url)
        if proxy is not None:
            await node.stop()
            node.config["proxy"].update(proxy)
            await node.start()
        job = node.node.ops.warmer.submit([f"{repo}:v1"])
        assert job.task is not None
        await asyncio.wait_for(job.task, 60)
    assert job.state == "failed"
    (error,) = job.errors
    assert "refused" in error["error"] and whose in error["error"], error
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prewarm job")]
    assert logged and f"{repo}:v1" in logged[-1] and whose in logged[-1], logged


@pytest.mark.parametrize("case_id", ["R-OPS-07"])
async def test_queued_pull_events_are_delivered_at_shutdown(make_mirror, upstream, upstream_client, tmp_path,
                                                            case_id) -> None:
    endpoint = Endpoint(fail=2)  # then backs off 500 ms, while the node is asked to stop
    app = web.Application()
    app.router.add_post("/events", endpoint.handle)
    receiver = web.AppRunner(app)
    await receiver.setup()
    site = web.TCPSite(receiver, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        node = await node_with_endpoint(make_mirror, tmp_path, upstream.url, f"http://127.0.0.1:{port}/events")
        image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[1024])
        async with node.client(headers=ACCEPT) as client:
            for _ in range(7):  # a miss, then 6 hits: 6 pull events
                assert (await client.get(f"/v2/{image.repo}/manifests/v1")).status_code == 200
        assert len(endpoint.events) < 6  # still queued
        await node.stop()
    finally:
        await receiver.cleanup()
    assert len(endpoint.events) == 6


@pytest.mark.parametrize("case_id", ["R-OPS-06"])
def test_inactive_header_guard_is_announced(monkeypatch, caplog, case_id) -> None:
    import aiohttp
    from packaging.specifiers import SpecifierSet

    from mirror.api import server

    assert server.warn_if_unguarded() is True  # the installed aiohttp: guarded, nothing said
    assert not caplog.records
    pinned = next(d for d in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
                  if d.startswith("aiohttp"))
    specifier = SpecifierSet(pinned.removeprefix("aiohttp"))
    assert aiohttp.__version__ in specifier, pinned
    assert "3.99.0" not in specifier and "4.0.0" not in specifier, pinned  # an upper bound

    monkeypatch.setattr(server, "SUPPORTED", False)  # as after an upgrade that renamed them
    assert server.warn_if_unguarded() is False
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "INACTIVE" in record.getMessage()
    assert aiohttp.__version__ in record.getMessage()


def test_case_table_is_complete() -> None:
    """Every case ID of the table is the id of a test in this module."""
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2 or f'"{case_id}-' in source, case_id
