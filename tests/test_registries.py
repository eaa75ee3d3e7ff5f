"""One node, several registries (issue 14): `?ns=` and a path prefix route to each upstream.

Two real distribution registries hold different images under the same
repository name (`team/app:v1`) sharing one layer. Registry A is the default
upstream (`proxy.remoteurl`, `mirror.names: [reg-a.example]`), registry B is
one of `mirror.upstreams` (`reg-b.example`). A counting relay in front of
each shows which registry every request reached.

Each provoked failure has a case ID (``pytest -k R-REG-01``), listed in
`CASES` and in README's Reliability table, as in tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror import errors
from mirror.config import ConfigError, load_settings
from mirror.registry.digest import Digest
from tests.conftest import mirror_config
from tests.support import images
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import run_skopeo_async
from tests.support.registry import Registry, run_registry
from tests.support.relay import Relay

ACCEPT = {"Accept": DOCKER_SCHEMA2}
REPO = "team/app"
A_NAME, B_NAME = "reg-a.example", "reg-b.example"

CASES = {
    "R-REG-01": "containerd's ?ns= names a registry the node does not serve: 404 NAME_UNKNOWN (JSON) at "
                "once, no request reaches any upstream",
    "R-REG-02": "one of two upstreams is down: its requests answer 503 UNAVAILABLE (JSON) after its own "
                "retries, while the other registry serves cold and cached pulls and its link stays healthy",
    "R-REG-03": "a digest cached from registry B asked under registry A's repository of the same name: "
                "served only when A's upstream confirms A holds it (404 BLOB_UNKNOWN otherwise); a layer "
                "both hold is stored once",
    "R-REG-04": "a registry that accepts and never answers, with its own upstream.read_timeout 1s while "
                "the default's is 60 s: its client gets 503 UNAVAILABLE after about 1 s, never 60 s",
}


@pytest.fixture(scope="module")
def registry_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-a")) as registry:
        yield registry


@pytest.fixture(scope="module")
def registry_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-b")) as registry:
        yield registry


@pytest.fixture(scope="module")
def shared_layer() -> bytes:
    return images.make_layer("shared-by-both-registries", 300_000)


@pytest.fixture(scope="module")
def pushed(registry_a: Registry, registry_b: Registry, shared_layer: bytes) -> dict[str, images.Image]:
    """`team/app:v1` on each registry: a layer of its own plus the shared one."""
    async def push() -> dict[str, images.Image]:
        async with httpx.AsyncClient(timeout=60) as client:
            a = await images.push_image(client, registry_a.url, REPO, "v1",
                                        layers=[images.make_layer("only-in-a", 200_000), shared_layer])
            b = await images.push_image(client, registry_b.url, REPO, "v1",
                                        layers=[images.make_layer("only-in-b", 250_000), shared_layer])
        return {"a": a, "b": b}

    pushed = asyncio.run(push())
    assert pushed["a"].digest != pushed["b"].digest
    return pushed


@pytest.fixture
def relay_a(registry_a: Registry) -> Iterator[Relay]:
    with Relay(registry_a.url) as link:
        yield link


@pytest.fixture
def relay_b(registry_b: Registry) -> Iterator[Relay]:
    with Relay(registry_b.url) as link:
        yield link


def two_registry_config(root: Path, relay_a: Relay, relay_b: Relay, **mirror: Any) -> dict[str, Any]:
    config = mirror_config(root, relay_a.url, names=[A_NAME], **mirror)
    config["mirror"]["upstreams"] = [{"names": [B_NAME], "remoteurl": relay_b.url,
                                      "upstream": {"retries": 1, "connect_timeout": "2s"}}]
    return config


@pytest.fixture
async def node(make_mirror: Any, relay_a: Relay, relay_b: Relay, tmp_path: Path,
               pushed: dict[str, images.Image]) -> AsyncIterator[Any]:
    root = tmp_path / "two"
    root.mkdir()
    yield await make_mirror(relay_a.url, config=two_registry_config(root, relay_a, relay_b))


async def manifest_digest(client: httpx.AsyncClient, path: str) -> str:
    response = await client.get(path, headers=ACCEPT)
    assert response.status_code == 200, response.text
    return "sha256:" + hashlib.sha256(response.content).hexdigest()


def upstream_requests(relay: Relay) -> int:
    """Requests that named a repository (the `/v2/` ping and token calls are not content)."""
    return sum(1 for r in relay.requests if "/manifests/" in r.path_qs or "/blobs/" in r.path_qs
               or "/tags/" in r.path_qs)


# --------------------------------------------------------------------------- routing


async def test_path_prefix_and_ns_reach_each_registry(node, relay_a, relay_b, pushed) -> None:
    a, b = pushed["a"], pushed["b"]
    async with node.client() as client:
        assert await manifest_digest(client, f"/v2/{REPO}/manifests/v1") == a.digest
        assert await manifest_digest(client, f"/v2/{REPO}/manifests/v1?ns={A_NAME}") == a.digest
        assert await manifest_digest(client, f"/v2/{B_NAME}/{REPO}/manifests/v1") == b.digest
        assert await manifest_digest(client, f"/v2/{REPO}/manifests/v1?ns={B_NAME}") == b.digest
        own_b = b.layer_digests[0]
        for path in (f"/v2/{B_NAME}/{REPO}/blobs/{own_b}", f"/v2/{REPO}/blobs/{own_b}?ns={B_NAME}"):
            response = await client.get(path)
            assert response.status_code == 200 and response.content == b.blobs[own_b]
        listed = await client.get(f"/v2/{B_NAME}/{REPO}/tags/list")
        assert listed.status_code == 200 and listed.json() == {"name": f"{B_NAME}/{REPO}", "tags": ["v1"]}
        listed = await client.get(f"/v2/{REPO}/tags/list?ns={B_NAME}")
        assert listed.status_code == 200 and listed.json() == {"name": REPO, "tags": ["v1"]}
        catalog = (await client.get("/v2/_catalog")).json()["repositories"]
    # B's upstream saw B's own name for the repository, never the prefix
    assert relay_b.count("GET", f"/v2/{REPO}/manifests/v1") == 1  # the second B request was a hit
    assert not any(B_NAME in r.path_qs for r in relay_b.requests)
    assert relay_a.count("GET", f"/v2/{REPO}/manifests/v1") == 1
    assert relay_a.count(path_contains=own_b) == 0
    # kept apart in the metadata: the default upstream's names unchanged, B's under its prefix
    assert REPO in catalog and f"{B_NAME}/{REPO}" in catalog
    tags = node.node.metadata
    assert str((await tags.get_tag(REPO, "v1")).digest) == a.digest
    assert str((await tags.get_tag(f"{B_NAME}/{REPO}", "v1")).digest) == b.digest


@pytest.mark.parametrize("case_id", ["R-REG-01"])
async def test_unknown_ns_is_404_without_an_upstream_request(case_id, node, relay_a, relay_b,
                                                             pushed) -> None:
    async with node.client() as client:
        for path in (f"/v2/{REPO}/manifests/v1?ns=ghcr.io", f"/v2/{REPO}/blobs/{pushed['b'].digest}?ns=quay.io",
                     f"/v2/{B_NAME}/{REPO}/manifests/v1?ns=elsewhere.example:5000"):
            response = await client.get(path, headers=ACCEPT)
            assert response.status_code == 404, response.text
            assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert upstream_requests(relay_a) == 0 and upstream_requests(relay_b) == 0


@pytest.mark.parametrize("case_id", ["R-REG-02"])
async def test_one_upstream_down_the_other_serves(case_id, node, relay_a, relay_b, pushed) -> None:
    a, b = pushed["a"], pushed["b"]
    async with node.client() as client:
        assert await manifest_digest(client, f"/v2/{B_NAME}/{REPO}/manifests/{b.digest}") == b.digest
        relay_b.down = True
        refused = await client.get(f"/v2/{REPO}/manifests/v1?ns={B_NAME}", headers=ACCEPT)
        blob = await client.get(f"/v2/{B_NAME}/{REPO}/blobs/{b.layer_digests[0]}")
        # the other registry: cold pulls go on, and B's cached content is still served by digest
        assert await manifest_digest(client, f"/v2/{REPO}/manifests/v1") == a.digest
        for digest in a.blobs:
            response = await client.get(f"/v2/{REPO}/blobs/{digest}")
            assert response.status_code == 200 and response.content == a.blobs[digest]
        assert await manifest_digest(client, f"/v2/{B_NAME}/{REPO}/manifests/{b.digest}") == b.digest
    for response in (refused, blob):
        assert response.status_code == 503, response.text
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    registries = node.node.upstream
    assert registries.default.client.health.reachable is True
    assert registries.others[0].client.health.reachable is False
    from mirror.api.debug import create_debug_app
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(create_debug_app(node.node))) as debug:
        ready = await debug.get("/debug/ready")
        body = await ready.json()
    assert ready.status == 200 and body["upstream_reachable"] is True  # B down never makes the node unready
    assert body["registries"][B_NAME]["reachable"] is False


@pytest.mark.parametrize("case_id", ["R-REG-03"])
async def test_a_digest_from_one_registry_is_not_served_under_the_other(case_id, node, relay_a, relay_b,
                                                                         pushed, shared_layer) -> None:
    a, b = pushed["a"], pushed["b"]
    own_b, shared = b.layer_digests[0], b.layer_digests[1]
    async with node.client() as client:
        for digest in b.blobs:  # everything of B cached through B
            assert (await client.get(f"/v2/{B_NAME}/{REPO}/blobs/{digest}")).status_code == 200
        relay_a.reset()
        hidden = await client.get(f"/v2/{REPO}/blobs/{own_b}")
        hidden_head = await client.head(f"/v2/{REPO}/blobs/{own_b}?ns={A_NAME}")
        shared_via_a = await client.get(f"/v2/{REPO}/blobs/{shared}")
    assert hidden.status_code == 404 and hidden.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert hidden_head.status_code == 404
    assert relay_a.count("HEAD", f"/v2/{REPO}/blobs/{own_b}") >= 1  # asked of A, never B's cache
    assert shared_via_a.status_code == 200 and shared_via_a.content == shared_layer
    assert relay_a.count("GET", f"/blobs/{shared}") == 0  # A confirmed it: served from the one copy
    assert a.layer_digests[1] == shared
    assert await node.node.metadata.is_linked(REPO, Digest.parse(shared))  # now linked for A too
    objects = [p for p in Path(node.node.settings.storage.root).rglob(shared[7:]) if p.is_file()]
    assert len(objects) == 1, objects  # one copy, whichever registry it came from


async def test_skopeo_copies_by_prefix(node, relay_b, pushed, tmp_path) -> None:
    b = pushed["b"]
    result = await run_skopeo_async("copy", "--src-tls-verify=false",
                                    f"docker://{node.host}/{B_NAME}/{REPO}:v1", f"dir:{tmp_path / 'b'}",
                                    check=False)
    assert result.returncode == 0, result.stderr.decode()
    out = tmp_path / "b"
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == b.digest[7:]
    for digest, data in b.blobs.items():
        assert (out / digest[7:]).read_bytes() == data
    assert relay_b.count("GET", f"/v2/{REPO}/manifests/v1") == 1


# --------------------------------------------------------------------------- names and config


def test_routing_rules_without_a_network(tmp_path: Path) -> None:
    from mirror.node import open_registries

    config = {"proxy": {"remoteurl": "https://hub.yun.example.cn"},
              "mirror": {"names": ["central.example"], "upstreams": [
                  {"names": ["docker.io", "registry-1.docker.io"], "remoteurl": "https://registry-1.docker.io",
                   "tag_ttl": "10m"},
                  {"names": ["ghcr.io"], "remoteurl": "https://ghcr.io"}]}}
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(config))
    settings = load_settings(path, {})
    registries = open_registries(settings)
    resolve = registries.resolve
    assert resolve("org/app") == "org/app"
    assert resolve("org/app", "hub.yun.example.cn") == "org/app"
    assert resolve("org/app", "central.example") == "org/app"
    assert resolve("ghcr.io/org/app") == "ghcr.io/org/app"
    assert resolve("org/app", "ghcr.io") == "ghcr.io/org/app"
    assert resolve("alpine", "docker.io") == "docker.io/library/alpine"
    assert resolve("docker.io/alpine") == "docker.io/library/alpine"
    assert resolve("registry-1.docker.io/alpine") == "docker.io/library/alpine"
    assert resolve("alpine", "registry-1.docker.io") == "docker.io/library/alpine"
    assert resolve("ghcr.io") == "ghcr.io"  # one component: a repository of the default upstream
    assert resolve("org/app", "quay.io") is None
    assert registries.owner("docker.io/library/alpine")[1] == "library/alpine"
    assert registries.owner("ghcr.io/org/app")[0].client.base_url == "https://ghcr.io"
    assert registries.tag_policy("docker.io/library/alpine")[0] == 600.0
    assert registries.tag_policy("org/app")[0] == settings.mirror.tag_ttl
    from mirror.registry.reference import parse_image

    namespaces = frozenset({"hub.yun.example.cn", "central.example"})
    assert parse_image("ghcr.io/org/app:v1", namespaces, registries).repo == "ghcr.io/org/app"
    assert parse_image("docker.io/alpine", namespaces, registries).repo == "docker.io/library/alpine"
    assert parse_image("central.example/team/app:v1", namespaces, registries).repo == "team/app"
    assert parse_image("team/app@sha256:" + "a" * 64, namespaces, registries).repo == "team/app"
    with pytest.raises(errors.NameInvalid):
        parse_image("quay.io/org/app:v1", namespaces, registries)


@pytest.mark.parametrize("upstreams, key", [
    ([{"names": ["ghcr.io"]}], "mirror.upstreams[0].remoteurl"),
    ([{"names": ["ghcr.io:443"], "remoteurl": "https://ghcr.io"}], "mirror.upstreams[0].names"),
    ([{"names": ["central.example"], "remoteurl": "https://x.example"}], "mirror.upstreams[0].names[0]"),
    ([{"names": ["a.io"], "remoteurl": "https://a.io"}, {"names": ["a.io"], "remoteurl": "https://b.io"}],
     "mirror.upstreams[1].names[0]"),
    ([{"names": ["a.io"], "remoteurl": "https://a.io", "username": "u"}], "mirror.upstreams[0].password"),
    ([{"names": ["a.io"], "remoteurl": "https://a.io", "tag_tll": "1m"}], "mirror.upstreams[0].tag_tll"),
])
def test_bad_upstreams_are_one_line_naming_the_key(tmp_path: Path, upstreams: list[Any], key: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text(json.dumps({"mirror": {"names": ["central.example"], "upstreams": upstreams}}))
    with pytest.raises(ConfigError) as raised:
        load_settings(path, {})
    assert str(raised.value).startswith(f"config: {key}:"), str(raised.value)


def test_docker_hub_names_are_the_default_upstream_when_it_is_docker_hub(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(json.dumps({"mirror": {"upstreams": [{"names": ["docker.io"],
                                                          "remoteurl": "https://mirror.gcr.io"}]}}))
    with pytest.raises(ConfigError, match="mirror.upstreams.0..names.0.: 'docker.io' already names proxy"):
        load_settings(path, {})


def test_case_table_is_complete() -> None:
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2, case_id


async def test_ctr_pulls_both_registries_through_one_node(node, registry_a, registry_b, pushed,
                                                          tmp_path) -> None:
    """hosts.toml for both registry names lists the node; containerd's ns picks the upstream."""
    from tests.support.containerd import containerd_unavailable, run_containerd

    why_not = containerd_unavailable()
    if why_not is not None:
        pytest.skip(why_not)
    with Relay(node.url) as front, run_containerd(tmp_path / "containerd") as containerd:
        containerd.write_hosts_toml(A_NAME, server=registry_a.url, mirrors=[front.url])
        hosts = containerd.write_hosts_toml(B_NAME, server=registry_b.url, mirrors=[front.url])
        targets = {}
        for name in (A_NAME, B_NAME):
            await containerd.pull(f"{name}/{REPO}:v1", hosts_dir=hosts)
            targets[name] = await containerd.image_target(f"{name}/{REPO}:v1")
        requests = list(front.records)
    assert targets == {A_NAME: pushed["a"].digest, B_NAME: pushed["b"].digest}
    assert requests and all(r.status == 200 for r in requests), [(r.path_qs, r.status) for r in requests]
    for name in (A_NAME, B_NAME):  # every request carried its registry, and the node served it
        assert any(f"ns={name}" in r.path_qs for r in requests)
    assert all("ns=" in r.path_qs for r in requests if r.path_qs != "/v2/")


# --------------------------------------------------------------------------- operations


@pytest.fixture
async def admin(node) -> AsyncIterator[httpx.AsyncClient]:
    from aiohttp import web

    from mirror.api.debug import create_debug_app

    runner = web.AppRunner(create_debug_app(node.node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    await runner.cleanup()


async def wait_job(admin: httpx.AsyncClient, job: dict[str, Any]) -> dict[str, Any]:
    for _ in range(600):
        if job["state"] not in ("queued", "running"):
            return job
        await asyncio.sleep(0.05)
        job = (await admin.get(f"/admin/jobs/{job['id']}")).json()
    raise AssertionError(job)


async def test_prewarm_pin_top_purge_and_notify_take_registry_references(node, admin, relay_a, relay_b,
                                                                          pushed) -> None:
    a, b = pushed["a"], pushed["b"]
    started = await admin.post("/admin/prewarm", json={"images": [f"{B_NAME}/{REPO}:v1"], "pin": True})
    assert started.status_code == 202, started.text
    job = await wait_job(admin, started.json())
    assert job["state"] == "done", job
    assert relay_a.count(path_contains="/manifests/") == 0  # B's image came from B only
    metadata = node.node.metadata
    assert str((await metadata.get_tag(f"{B_NAME}/{REPO}", "v1")).digest) == b.digest
    pins = (await admin.get("/admin/pins")).json()["pins"]
    assert [(p["registry"], p["repository"], p["reference"]) for p in pins] == [(B_NAME, REPO, "v1")]

    async with node.client() as client:
        for _ in range(2):
            await manifest_digest(client, f"/v2/{REPO}/manifests/v1?ns={B_NAME}")
        await manifest_digest(client, f"/v2/{REPO}/manifests/v1")
    top = (await admin.get("/admin/top")).json()["top"]
    assert [(t["registry"], t["repository"], t["pulls"]) for t in top] == [
        (B_NAME, REPO, 2), (relay_a.host, REPO, 1)]

    # a delete notification from B forgets B's tag only
    envelope = {"events": [{"action": "delete", "target": {"repository": REPO, "tag": "v1"}}]}
    sent = await admin.post(f"/admin/notify/{B_NAME}", json=envelope)
    assert sent.status_code == 200 and sent.json()["acted"] == 1
    assert (await admin.post("/admin/notify/nowhere.example", json=envelope)).status_code == 404
    for _ in range(100):
        if await metadata.get_tag(f"{B_NAME}/{REPO}", "v1") is None:
            break
        await asyncio.sleep(0.05)
    assert await metadata.get_tag(f"{B_NAME}/{REPO}", "v1") is None
    assert str((await metadata.get_tag(REPO, "v1")).digest) == a.digest

    unpinned = await admin.post("/admin/unpin", json={"images": [f"{B_NAME}/{REPO}:v1"]})
    assert unpinned.status_code == 200 and unpinned.json()["unknown"] == [], unpinned.text
    purged = await admin.post("/admin/purge", json={"reference": f"{B_NAME}/{REPO}@{b.digest}"})
    assert purged.status_code == 200, purged.text
    assert not await metadata.is_linked(f"{B_NAME}/{REPO}", Digest.parse(b.digest))
    assert await metadata.is_linked(REPO, Digest.parse(a.digest))


async def test_upstream_requests_are_counted_per_registry(node, relay_a, relay_b, pushed) -> None:
    async with node.client() as client:
        await manifest_digest(client, f"/v2/{REPO}/manifests/v1")
        await manifest_digest(client, f"/v2/{B_NAME}/{REPO}/manifests/v1")
        await manifest_digest(client, f"/v2/{B_NAME}/{REPO}/manifests/{pushed['b'].digest}")
    exposition = node.node.metrics.exposition().decode()
    counted = {}
    for line in exposition.splitlines():
        if line.startswith("mirror_registry_requests_total{"):
            labels, value = line[len("mirror_registry_requests_total{"):].split("} ")
            fields = dict(part.split("=", 1) for part in labels.split(","))
            key = (fields["upstream"].strip('"'), fields["method"].strip('"'))
            counted[key] = counted.get(key, 0) + float(value)
    assert counted[(B_NAME, "GET")] == relay_b.count("GET", "/manifests/")
    assert counted[(relay_a.host, "GET")] == relay_a.count("GET", "/manifests/")
    sample = node.node.metrics.registry.get_sample_value
    miss, hit = {"kind": "manifest", "outcome": "miss"}, {"kind": "manifest", "outcome": "hit"}
    assert sample("mirror_registry_cache_requests_total", {"upstream": B_NAME, **miss}) == 1  # by tag
    assert sample("mirror_registry_cache_requests_total", {"upstream": B_NAME, **hit}) == 1  # by digest
    assert sample("mirror_registry_cache_requests_total", {"upstream": relay_a.host, **miss}) == 1


# --------------------------------------------------------------------------- auth


async def test_forward_mode_each_registry_judges_its_own_requests(make_mirror, relay_a, tmp_path,
                                                                  pushed) -> None:
    """Registry A asks nobody for credentials; registry C (token auth) judges C's requests alone."""
    from tests.support.authenv import Central, bearer, challenge_params
    from tests.support.token_issuer import SERVICE, make_ca

    users = {"alice": ("alice-pw", {"fwd/app": {"pull"}})}
    with Central(tmp_path / "central", make_ca(_made(tmp_path / "pki"), name="central"), users=users) as central, \
            Relay(central.registry.url) as relay_c:
        async with httpx.AsyncClient(timeout=30) as client:
            image = await images.push_image(client, central.registry.url, "fwd/app", "v1",
                                            headers=bearer(central.admin_token("fwd/app")))
        root = tmp_path / "forward"
        root.mkdir()
        config = mirror_config(root, relay_a.url, names=[A_NAME], auth={"mode": "forward"})
        config["mirror"]["upstreams"] = [{"names": ["central.example"], "remoteurl": relay_c.url}]
        node = await make_mirror(relay_a.url, config=config)
        token = central.issuer.mint_for("alice", [_pull("fwd/app")])
        async with node.client(headers=ACCEPT) as client:
            open_a = await client.get(f"/v2/{REPO}/manifests/v1")
            refused = await client.get("/v2/fwd/app/manifests/v1?ns=central.example")
            allowed = await client.get("/v2/central.example/fwd/app/manifests/v1", headers=bearer(token))
            by_ns = await client.get("/v2/fwd/app/manifests/v1?ns=central.example", headers=bearer(token))
    assert open_a.status_code == 200 and open_a.content == pushed["a"].manifest
    assert refused.status_code == 401
    params = challenge_params(refused.headers["WWW-Authenticate"])[1]
    # C's own challenge, scoped to C's own repository name (what C's token service knows)
    assert (params["realm"], params["service"], params["scope"]) == (
        central.issuer.url, SERVICE, "repository:fwd/app:pull")
    assert allowed.status_code == 200 and allowed.content == image.manifest
    assert by_ns.status_code == 200 and by_ns.content == image.manifest
    assert relay_c.count("HEAD", "/v2/fwd/app/manifests/v1") == 1  # the token checked once, by C's path
    assert relay_a.count("HEAD") == 0


async def test_token_mode_never_sends_a_clients_token_to_another_registry(make_mirror, relay_b, tmp_path,
                                                                          pushed) -> None:
    """The node's client auth covers every registry, its scope naming the node's key
    (`reg-b.example/team/app`). The default upstream trusts the node's token service, so
    a client's token goes there; registry B is fetched from with the node's own account."""
    from tests.support.authenv import Central, bearer, challenge_params
    from tests.support.token_issuer import make_ca

    users = {"bob": ("bob-pw", {f"{B_NAME}/{REPO}": {"pull"}, "fwd/app": {"pull"}})}
    with Central(tmp_path / "central", make_ca(_made(tmp_path / "pki"), name="central"), users=users) as central, \
            Relay(central.registry.url) as relay_c:
        async with httpx.AsyncClient(timeout=30) as client:
            image = await images.push_image(client, central.registry.url, "fwd/app", "v1",
                                            headers=bearer(central.admin_token("fwd/app")))
        root = tmp_path / "token"
        root.mkdir()
        config = mirror_config(root, relay_c.url, names=["central.example"])
        config["mirror"]["upstreams"] = [{"names": [B_NAME], "remoteurl": relay_b.url}]
        config["auth"] = {"token": central.token_block}
        node = await make_mirror(relay_c.url, config=config)
        token = central.issuer.mint_for("bob", [_pull(f"{B_NAME}/{REPO}"), _pull("fwd/app")])
        async with node.client(headers=ACCEPT) as client:
            anonymous = await client.get(f"/v2/{REPO}/manifests/v1?ns={B_NAME}")
            for_default = await client.get("/v2/fwd/app/manifests/v1", headers=bearer(token))
            for_b = await client.get(f"/v2/{REPO}/manifests/v1?ns={B_NAME}", headers=bearer(token))
            not_granted = await client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token))
        passed_on = [r for r in relay_c.records if "authorization" in {k.lower() for k in r.request_headers or {}}]
    assert anonymous.status_code == 401
    scope = challenge_params(anonymous.headers["WWW-Authenticate"])[1]["scope"]
    assert scope == f"repository:{B_NAME}/{REPO}:pull"
    assert for_default.status_code == 200 and for_default.content == image.manifest
    assert passed_on  # the default upstream got the client's own token
    assert for_b.status_code == 200 and for_b.content == pushed["b"].manifest
    assert not any("authorization" in {k.lower() for k in r.request_headers or {}} for r in relay_b.records)
    assert not_granted.status_code in (401, 403)  # bob may pull B's team/app, not the default's


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _pull(repo: str) -> Any:
    from mirror.auth.access import Access
    return Access.of("repository", repo, "pull")


def test_shipped_hosts_files_all_point_at_one_node_that_serves_their_names() -> None:
    """deploy/clients/containerd/one-node: each registry directory's name is served by
    deploy/config-registries.yml, and every file lists the same node ahead of its server."""
    import tomllib

    from mirror.node import open_registries

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    settings = load_settings(deploy / "config-registries.yml", {})
    registries = open_registries(settings)
    files = sorted((deploy / "clients" / "containerd" / "one-node").glob("*/hosts.toml"))
    assert [f.parent.name for f in files] == ["docker.io", "ghcr.io", "hub.yun.paic.com.cn"]
    nodes = set()
    for path in files:
        hosts = tomllib.loads(path.read_text())
        nodes |= set(hosts["host"])
        assert registries.resolve("org/app", path.parent.name) is not None, path
        served_by = registries.named(path.parent.name)
        assert served_by is not None and hosts["server"].startswith("https://")
    assert nodes == {settings.http.host}
    assert registries.resolve("alpine", "docker.io") == "docker.io/library/alpine"
    assert registries.resolve("team/app", "hub.yun.paic.com.cn") == "team/app"


async def test_pushes_to_another_registry_are_refused(make_mirror, relay_a, relay_b, tmp_path) -> None:
    """passthrough_writes relays to the default upstream only; another registry's name is refused."""
    root = tmp_path / "writes"
    root.mkdir()
    node = await make_mirror(relay_a.url, config=two_registry_config(root, relay_a, relay_b,
                                                                     passthrough_writes=True))
    async with node.client() as client:
        by_prefix = await client.post(f"/v2/{B_NAME}/{REPO}/blobs/uploads/")
        by_ns = await client.post(f"/v2/{REPO}/blobs/uploads/?ns={B_NAME}")
        default = await client.post(f"/v2/{REPO}/blobs/uploads/")
    for refused in (by_prefix, by_ns):
        assert refused.status_code == 405 and refused.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert default.status_code == 202
    assert relay_b.count() == 0 and relay_a.count("POST") == 1


async def test_tag_ttl_and_stale_serving_are_per_registry(make_mirror, relay_a, relay_b, tmp_path,
                                                          pushed) -> None:
    """B's `tag_ttl: 0s` override revalidates every pull of B's tags; A keeps mirror.tag_ttl.
    With B down, B's cached tag is served stale while A is untouched."""
    root = tmp_path / "ttl"
    root.mkdir()
    config = two_registry_config(root, relay_a, relay_b, tag_ttl="1h")
    config["mirror"]["upstreams"][0]["tag_ttl"] = "0s"
    node = await make_mirror(relay_a.url, config=config)
    async with node.client() as client:
        for _ in range(2):
            assert await manifest_digest(client, f"/v2/{REPO}/manifests/v1") == pushed["a"].digest
            assert await manifest_digest(client, f"/v2/{B_NAME}/{REPO}/manifests/v1") == pushed["b"].digest
        assert relay_b.count("HEAD", "/manifests/v1") == 1 and relay_a.count("HEAD", "/manifests/v1") == 0
        relay_b.down = True
        stale = await client.get(f"/v2/{REPO}/manifests/v1?ns={B_NAME}", headers=ACCEPT)
        fresh = await client.get(f"/v2/{REPO}/manifests/v1", headers=ACCEPT)
    assert stale.status_code == 200 and stale.content == pushed["b"].manifest
    assert stale.headers["Cache-Control"] == "max-age=0"  # B's own TTL in the answer
    assert fresh.status_code == 200 and fresh.content == pushed["a"].manifest
    assert int(fresh.headers["Cache-Control"].split("=")[1]) > 3000
    assert node.node.metrics.registry.get_sample_value("mirror_stale_tags_served_total") == 1


@pytest.mark.parametrize("case_id", ["R-REG-04"])
async def test_a_registrys_own_read_timeout_bounds_its_clients_wait(case_id, make_mirror, relay_a, registry_b,
                                                                    tmp_path, pushed) -> None:
    """B's `upstream.read_timeout: 1s` bounds a wait on B, though the default's read_timeout is 60 s."""
    from tests.support import faults

    root = tmp_path / "stall"
    root.mkdir()
    with faults.FaultRelay(registry_b.url) as stalled_b:
        config = mirror_config(root, relay_a.url, names=[A_NAME])
        config["mirror"]["upstreams"] = [{"names": [B_NAME], "remoteurl": stalled_b.url,
                                          "upstream": {"read_timeout": "1s", "retries": 1}}]
        node = await make_mirror(relay_a.url, config=config)
        stalled_b.inject(faults.hang(), path="/blobs/", times=None)
        started = asyncio.get_running_loop().time()
        async with node.client() as client:
            blob = await client.get(f"/v2/{B_NAME}/{REPO}/blobs/{pushed['b'].layer_digests[0]}")
        waited = asyncio.get_running_loop().time() - started
        stalled_b.clear()
    assert blob.status_code == 503 and blob.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert waited < 20, waited  # B's 1 s (plus margin for a loaded machine), never the default's 60 s
