"""containerd (Debian containerd, its ``ctr``) pulling through the node with ``hosts.toml``.

The image is named by the central registry's own ``host:port`` (not docker.io); the
registry's ``hosts.toml`` lists the node as a pull/resolve mirror ahead of the server.
containerd adds ``?ns=<registry host>`` to every request to a mirror:

* the node serves ``ns`` naming its upstream's host, so the whole pull comes from it;
* for any other ``ns`` it answers 404, and containerd moves on to the next host (the
  registry itself): the pull still succeeds, and the node never went upstream.
"""

from __future__ import annotations

import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import load_settings
from tests.support import images
from tests.support.containerd import containerd_unavailable, run_containerd
from tests.support.images import MANIFEST_ACCEPT
from tests.support.relay import Relay

_WHY_NOT = containerd_unavailable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def metric(node: Any, family: str, **labels: str) -> float:
    """Sum of the node's samples of ``family`` whose labels include ``labels``."""
    total = 0.0
    for fam in text_string_to_metric_families(node.node.metrics.exposition().decode()):
        for sample in fam.samples:
            if sample.name == family and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def ns_requests(front: Relay, registry: str) -> list[str]:
    """Requests that reached the node through ``front`` carrying ``ns=<registry>``."""
    wanted = {f"ns={registry}", f"ns={registry.replace(':', '%3A')}"}
    return [r.path_qs for r in front.records if any(w in r.path_qs for w in wanted)]


async def test_ctr_pulls_through_a_hosts_toml_mirror(
    make_mirror: Any, upstream: Any, upstream_client: httpx.AsyncClient, tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    index = await images.push_index(upstream_client, upstream.url, f"team/app-{suffix}", "v1",
                                    layer_size=150_000, seed=f"ctr-{suffix}")
    amd64 = index.image_for("linux", "amd64")
    # ns names the registry the image is named by: the node's remoteurl must be that host.
    node = await make_mirror(upstream.url)
    reference = f"{upstream.host}/{index.repo}:v1"

    with Relay(node.url) as front, run_containerd(tmp_path / "containerd") as containerd:
        hosts = containerd.write_hosts_toml(upstream.host, server=upstream.url,
                                            mirrors=[front.url])
        await containerd.pull(reference, hosts_dir=hosts)
        target = await containerd.image_target(reference)
        requests = list(front.records)
        carried_ns = ns_requests(front, upstream.host)

    assert target == index.digest
    # Every request went to the node first and carried ns; the node served them all.
    assert requests and len(carried_ns) == len(requests)
    assert all(r.status == 200 for r in requests), [(r.path_qs, r.status) for r in requests]
    blobs = [r.path_qs for r in requests if r.method == "GET" and "/blobs/" in r.path_qs]
    assert sorted(p.split("/blobs/")[1].split("?")[0] for p in blobs) == sorted(amd64.blobs)
    assert metric(node, "mirror_cache_requests_total", kind="blob", outcome="miss") == len(amd64.blobs)
    assert metric(node, "mirror_http_requests_total", route="blob", method="GET",
                  status="200") == len(amd64.blobs)


async def test_ctr_falls_back_to_the_registry_when_ns_names_another(
    make_mirror: Any, relay: Relay, upstream: Any, upstream_client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    image = await images.push_image(upstream_client, upstream.url, f"team/other-{suffix}", "v1",
                                    layers=[120_000], seed=f"other-{suffix}")
    # The node caches the relay's host, not the name containerd pulls by.
    node = await make_mirror(relay.url)
    reference = f"{upstream.host}/{image.repo}:v1"

    async with httpx.AsyncClient(base_url=node.url, timeout=30) as client:
        path = f"/v2/{image.repo}/manifests/v1"
        foreign = await client.get(path, params={"ns": upstream.host},
                                   headers={"Accept": MANIFEST_ACCEPT})
        own = await client.get(path, params={"ns": relay.host},
                               headers={"Accept": MANIFEST_ACCEPT})
    assert foreign.status_code == 404 and foreign.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert own.status_code == 200 and own.content == image.manifest
    relay.reset()
    before = metric(node, "mirror_http_requests_total", route="manifest", status="404")

    with run_containerd(tmp_path / "containerd") as containerd:
        hosts = containerd.write_hosts_toml(upstream.host, server=upstream.url,
                                            mirrors=[node.url])
        await containerd.pull(reference, hosts_dir=hosts)
        target = await containerd.image_target(reference)

    assert target == image.digest
    # containerd asked the node, got 404 and went on to the registry itself...
    assert metric(node, "mirror_http_requests_total", route="manifest", status="404") > before
    assert metric(node, "mirror_http_requests_total", route="blob", status="200") == 0
    # ...and the node never went upstream for it.
    assert relay.count() == 0


async def test_ctr_pulls_central_names_through_an_ip_upstream_with_mirror_names(
    make_mirror: Any, upstream: Any, upstream_client: httpx.AsyncClient, tmp_path: Path,
) -> None:
    """The shipped ``central-hosts.toml`` and ``mirror.names`` of the shipped config.

    The node's ``proxy.remoteurl`` is the registry's IP (127.0.0.1), the image is named
    by the central registry's own name; containerd sends ``?ns=hub.yun.paic.com.cn``, which
    the node serves because the name is in ``mirror.names``. The registry's own name
    resolves nowhere here: a pull that went around the node would fail.
    """
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    names = load_settings(deploy / "config.yml", {}).mirror.names
    shipped = tomllib.loads((deploy / "clients" / "containerd" / "central-hosts.toml").read_text())
    registry = urlsplit(shipped["server"]).hostname
    assert registry in names
    suffix = uuid.uuid4().hex[:8]
    image = await images.push_image(upstream_client, upstream.url, f"team/central-{suffix}", "v1",
                                    layers=[130_000], seed=f"central-{suffix}")
    node = await make_mirror(upstream.url, names=list(names))
    reference = f"{registry}/{image.repo}:v1"

    with Relay(node.url) as front, run_containerd(tmp_path / "containerd") as containerd:
        # The shipped file with the zone node's URL pointing at this node (plain http, no CA).
        hosts = containerd.write_hosts_toml(registry, server=shipped["server"], mirrors=[front.url])
        await containerd.pull(reference, hosts_dir=hosts)
        target = await containerd.image_target(reference)
        requests = list(front.records)
        carried_ns = ns_requests(front, registry)

    assert target == image.digest
    assert requests and len(carried_ns) == len(requests)
    assert all(r.status == 200 for r in requests), [(r.path_qs, r.status) for r in requests]
    assert metric(node, "mirror_unknown_namespace_total") == 0
