"""A rolling restart of a zone behind the SHIPPED nginx front loses no pull (issue 13, item 5).

Three real node processes (``python -m mirror serve``, built from the shipped
``deploy/config.yml`` plus ``mirror.zone``) share one counting relay to a real distribution
registry; the shipped ``deploy/nginx/mirror.conf`` (ports, servers and certificate paths
rewritten for loopback, nothing else) is in front. Clients pull continuously over verified TLS,
checking every manifest and blob against its digest, with no retries of their own: nginx's
``proxy_next_upstream`` is the only retry. Each node in turn gets SIGTERM (with a slow download
in flight on it) and is started again on its own store.

The cases are ``CASES`` below; README's Reliability table has one row per ID.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import signal
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import images
from tests.support.faults import NodeProcess, pull_image
from tests.support.images import MANIFEST_ACCEPT, Image
from tests.support.nginx import Nginx, TLSFiles, make_tls, nginx_available, render_front
from tests.support.procs import free_port
from tests.support.relay import Relay
from tests.support.waits import wait_until
from tests.test_deploy import FRONT, node_config_from_shipped

CASES = {
    "Z-DEPLOY-01": "rolling restart of 3 zone nodes behind the shipped nginx front (SIGTERM, "
                   "restart, "
                   "one node at a time) while clients pull continuously with no retries of their "
                   "own: every pull completes with verified content; each node drained a download "
                   "in flight and exited 0; nginx routed around the stopped node; a blob crosses "
                   "the link at most once more, only while its one holder was away",
    "Z-DEPLOY-02": "the same roll with mirror.zone.keep_copy and every node warmed: no blob "
                   "crosses "
                   "the link again (one upstream GET per blob in all)",
    "Z-DEPLOY-03": "after the roll every image pulled through every node directly: no upstream "
                   "blob GET",
}

SECRET = "zone-deploy-test-secret"
SLOW_LAYER = 24 << 20  # more than loopback's socket buffers hold: the node is still sending
DOWN_FOR = 2.0  # mirror.zone.down_for: a restarted node is asked again soon


def test_every_case_has_a_test() -> None:
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}') >= 2, case_id


@pytest.fixture
def nginx_installed() -> None:
    if not nginx_available():
        pytest.fail("nginx not found: install the Debian package nginx-light (scripts/test does)")


# --------------------------------------------------------------------------- the zone


@dataclass
class Zone:
    nodes: list[NodeProcess]
    front: Nginx
    base: str  # https://localhost:PORT, the shipped front
    tls: ssl.SSLContext


def zone_node(root: Path, relay: Relay, **zone: Any) -> NodeProcess:
    """A NodeProcess on deploy/config.yml (no auth), its port known before the peers are."""
    node = NodeProcess(root, relay.url)
    node.config = node_config_from_shipped(root, relay.url, token=None,
                                           addr=f"127.0.0.1:{node.port}")
    node.config["log"]["level"] = "info"  # the drain's log line
    node.config["mirror"].update(workers=1, shutdown_grace="15s")
    node.config["mirror"]["zone"] = {"self": node.url, "secret": SECRET,
                                     "down_for": f"{DOWN_FOR}s", **zone}
    return node


def start_zone(tmp_path: Path, relay: Relay, tls: TLSFiles, **zone: Any) -> Zone:
    nodes = [zone_node(tmp_path / f"node{i}", relay, **zone) for i in (1, 2, 3)]
    for node in nodes:
        node.config["mirror"]["zone"]["peers"] = [n.url for n in nodes]
        node.config_path.write_text(yaml.safe_dump(node.config))
        node.start()
    https_port, http_port = free_port(), free_port()
    site = render_front(FRONT.read_text(), https_port=https_port, http_port=http_port,
                        servers=[f"127.0.0.1:{n.port}" for n in nodes], cert=tls.cert,
                        key=tls.key, debug_headers=True)
    front = Nginx(tmp_path / "nginx", site)
    front.check()
    front.start(https_port, http_port)
    return Zone(nodes, front, f"https://localhost:{https_port}",
                ssl.create_default_context(cafile=tls.ca))


@pytest.fixture
def zones() -> Any:
    started: list[Zone] = []
    yield started
    for zone in started:
        zone.front.stop()
        for node in zone.nodes:
            node.close()
        print(zone.front.logs())


async def push_images(client: httpx.AsyncClient, url: str) -> tuple[list[Image], Image]:
    """Four images sharing a base layer, and one with a layer too big to sit in socket buffers."""
    tag = random.randbytes(4).hex()
    base = images.make_layer(f"zone-deploy-base-{tag}", 300_000)
    pulled = [await images.push_image(client, url, f"roll/app{i}-{tag}", "v1",
                                      layers=[base, 40_000 + i, 200_000 + i], seed=f"{tag}-{i}")
              for i in range(4)]
    slow = await images.push_image(client, url, f"roll/big-{tag}", "v1", layers=[SLOW_LAYER],
                                   seed=f"{tag}-big")
    return pulled, slow


# --------------------------------------------------------------------------- clients


async def pull_verified(client: httpx.AsyncClient, image: Image) -> None:
    """A client's pull: the manifest by tag, then every blob, each checked; no retries."""
    r = await client.get(f"/v2/{image.repo}/manifests/{image.tag}",
                         headers={"Accept": MANIFEST_ACCEPT})
    assert r.status_code == 200 and r.content == image.manifest, (r.status_code, r.text[:200])
    for digest in image.blobs:
        r = await client.get(f"/v2/{image.repo}/blobs/{digest}")
        assert r.status_code == 200, (digest, r.status_code, r.text[:200])
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest


@dataclass
class Pulls:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def keep_pulling(base: str, tls: ssl.SSLContext, pool: list[Image], pulls: Pulls,
                       k: int) -> None:
    async with httpx.AsyncClient(base_url=base, verify=tls, timeout=60, trust_env=False) as client:
        i = k
        while not pulls.stop.is_set():
            image = pool[i % len(pool)]
            i += 1
            try:
                await pull_verified(client, image)
                pulls.ok += 1
            except (AssertionError, httpx.HTTPError) as exc:
                pulls.failures.append(f"{image.repo}: {type(exc).__name__}: {exc}")


async def slow_download(node: NodeProcess, image: Image, started: asyncio.Event) -> str:
    """The big layer straight from `node`, read at about 5 MiB/s; returns its digest."""
    digest = image.layer_digests[0]
    hasher = hashlib.sha256()
    async with httpx.AsyncClient(base_url=node.url, timeout=60, trust_env=False) as client:
        async with client.stream("GET", f"/v2/{image.repo}/blobs/{digest}") as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes(256 << 10):
                hasher.update(chunk)
                started.set()
                await asyncio.sleep(0.05)
    return "sha256:" + hasher.hexdigest()


# --------------------------------------------------------------------------- the roll


async def roll(zone: Zone, pool: list[Image], slow: Image, clients: int = 4) -> Pulls:
    """SIGTERM and restart each node in turn while `clients` pull through the front."""
    pulls = Pulls()
    tasks = [asyncio.create_task(keep_pulling(zone.base, zone.tls, pool, pulls, k))
             for k in range(clients)]
    try:
        await wait_until(lambda: pulls.ok >= clients, timeout=120, what="pulls before the roll")
        for node in zone.nodes:
            started = asyncio.Event()
            download = asyncio.create_task(slow_download(node, slow, started))
            await asyncio.wait_for(started.wait(), 60)
            node.process.signal(signal.SIGTERM)
            code = await asyncio.to_thread(node.process.wait, 60)
            assert code == 0, node.log_text()[-3000:]
            assert await download == slow.layer_digests[0]  # drained, not cut
            assert re.search(r"draining: [1-9]\d* requests in flight", node.log_text())
            before = pulls.ok
            await asyncio.to_thread(node.start)
            # Traffic through every node again, and its peers' down marks expired, before the next.
            await wait_until(lambda: pulls.ok >= before + clients, timeout=120,
                             what="pulls after the restart")
            await asyncio.sleep(DOWN_FOR)
    finally:
        pulls.stop.set()
        await asyncio.gather(*tasks)
    return pulls


def blob_gets(relay: Relay) -> Counter[str]:
    return Counter(r.path_qs.rsplit("/", 1)[1] for r in relay.records
                   if r.method == "GET" and "/blobs/sha256:" in r.path_qs)


async def every_node_pulls(zone: Zone, pool: list[Image]) -> None:
    for node in zone.nodes:
        for image in pool:
            pulled = await pull_image(node.port, image.repo, "v1", timeout=120)
            assert pulled.ok and not pulled.wrong, (node.url, image.repo, pulled.error)


# --------------------------------------------------------------------------- the cases


@pytest.mark.usefixtures("nginx_installed")
@pytest.mark.parametrize("case_ids", [("Z-DEPLOY-01", "Z-DEPLOY-03")],
                         ids=["Z-DEPLOY-01+Z-DEPLOY-03"])
async def test_rolling_restart_behind_the_shipped_front_loses_no_pull(
    upstream: Any, relay: Relay, upstream_client: httpx.AsyncClient, tmp_path: Path,
    zones: list[Zone], case_ids: tuple[str, str]
) -> None:
    """Default zone (a non-owner keeps no copy)."""
    pool, slow = await push_images(upstream_client, upstream.url)
    zone = start_zone(tmp_path, relay, make_tls(tmp_path / "tls"))
    zones.append(zone)
    async with httpx.AsyncClient(base_url=zone.base, verify=zone.tls, timeout=60) as client:
        await pull_verified(client, slow)  # its config too has crossed once before the roll

    pulls = await roll(zone, pool, slow)

    # Z-DEPLOY-01: nothing lost, nothing wrong, no client retried.
    assert pulls.failures == []
    assert pulls.ok >= 4 * len(zone.nodes)
    # nginx met the stopping and stopped nodes (kept-alive connections closed before an answer,
    # refused connections) and sent those GETs on to the next node.
    errors = (zone.front.dir / "error.log").read_text()
    assert re.search(r"connect\(\) failed \(111|upstream prematurely closed connection while "
                     r"reading response header", errors), errors[-2000:]
    # A blob crosses the link once, and once more at most: when it was asked for while the one
    # node holding it (its owner) was away, the next node in rendezvous order fetched it.
    gets = blob_gets(relay)
    wanted = {d for image in [*pool, slow] for d in image.blobs}
    assert set(gets) <= wanted and max(gets.values()) <= 2, gets
    refetched = sorted(d for d, n in gets.items() if n == 2)
    print(f"blobs {len(wanted)}, upstream GETs {sum(gets.values())}, "
          f"refetched while away: {refetched}")

    # Z-DEPLOY-03: the zone is whole again: every image through every node, no link bytes.
    relay.reset()
    await every_node_pulls(zone, [*pool, slow])
    assert blob_gets(relay) == Counter()


@pytest.mark.usefixtures("nginx_installed")
@pytest.mark.parametrize("case_id", ["Z-DEPLOY-02"])
async def test_rolling_restart_with_copies_kept_crosses_the_link_once_per_blob(
    upstream: Any, relay: Relay, upstream_client: httpx.AsyncClient, tmp_path: Path,
    zones: list[Zone], case_id: str
) -> None:
    """mirror.zone.keep_copy, every image warmed through every node first."""
    pool, slow = await push_images(upstream_client, upstream.url)
    zone = start_zone(tmp_path, relay, make_tls(tmp_path / "tls"), keep_copy=True)
    zones.append(zone)
    await every_node_pulls(zone, [*pool, slow])
    wanted = {d for image in [*pool, slow] for d in image.blobs}
    assert blob_gets(relay) == Counter({d: 1 for d in wanted})

    started = time.monotonic()
    pulls = await roll(zone, pool, slow)

    assert pulls.failures == []
    assert pulls.ok >= 4 * len(zone.nodes)
    took = f"roll took {time.monotonic() - started:.0f}s"
    assert blob_gets(relay) == Counter({d: 1 for d in wanted}), took
