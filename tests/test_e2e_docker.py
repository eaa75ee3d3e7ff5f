"""The real docker daemon (Debian docker.io) pulling and pushing through the node.

* ``registry-mirrors``: dockerd pulls Docker Hub names (``alpine``, ``multi``) through the
  node; image IDs equal upstream's config digests and every blob crossed the link to the
  upstream once, through the node (dockerd would fall back to Docker Hub silently);
* the source document's path: nginx (the shipped ``deploy/nginx/mirror.conf``) terminating
  TLS in front of a token-auth node relaying ``/token``; ``docker login`` then ``docker pull``,
  the CA trusted through ``/etc/docker/certs.d/<host:port>/ca.crt``;
* one endpoint: ``docker push`` through a node with ``passthrough_writes`` (of an image
  pulled through the node, and of one ``docker load``ed), ``docker rmi``, ``docker pull``:
  same image, upstream has it, no blob byte crossed the link again.

dockerd always treats registries on 127.0.0.0/8 as insecure (plain HTTP allowed, TLS not
verified, certs.d not read), whatever ``insecure-registries`` says; the TLS test therefore
serves nginx on this host's non-loopback address, where dockerd verifies the certificate.
"""

from __future__ import annotations

import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import images
from tests.support.authenv import Central, bearer, node_config
from tests.support.dockerd import dockerd_unavailable, run_dockerd, write_image_archive
from tests.support.images import MANIFEST_ACCEPT
from tests.support.nginx import Nginx, make_tls, nginx_available, render_front
from tests.support.procs import LOOPBACK, free_port
from tests.support.relay import Relay
from tests.support.token_issuer import make_ca

ROOT = Path(__file__).resolve().parent.parent
FRONT = ROOT / "deploy" / "nginx" / "mirror.conf"

_WHY_NOT = dockerd_unavailable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def metric(node: Any, family: str, **labels: str) -> float:
    """Sum of the node's samples of ``family`` (e.g. ``mirror_cache_requests_total``)
    whose labels include ``labels``."""
    text = node.node.metrics.exposition().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == family and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def pulled_digest(output: str) -> str:
    """The ``Digest: sha256:...`` line ``docker pull``/``docker push`` prints."""
    found = re.search(r"digest: (sha256:[0-9a-f]{64})", output, re.IGNORECASE)
    assert found, output
    return found.group(1)


# --------------------------------------------------------------------------- registry-mirrors


async def test_docker_registry_mirrors_pulls_alpine_through_the_node(
    make_mirror: Any, relay: Relay, upstream: Any, upstream_client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    alpine = await images.push_image(upstream_client, upstream.url, "library/alpine", "latest",
                                     layers=[300_000, 20_000], seed=f"alpine-{uuid.uuid4()}")
    multi = await images.push_index(upstream_client, upstream.url, "library/multi", "latest",
                                    layer_size=100_000, seed=f"multi-{uuid.uuid4()}")
    amd64 = multi.image_for("linux", "amd64")
    node = await make_mirror(relay.url)

    with run_dockerd(tmp_path / "dockerd", {"registry-mirrors": [node.url]}) as dockerd:
        pulled_alpine = await dockerd.docker_async("pull", "alpine")
        pulled_multi = await dockerd.docker_async("pull", "multi")
        assert await dockerd.image_id("alpine") == alpine.config_digest
        assert await dockerd.image_id("multi") == amd64.config_digest
        repo_digests = (await dockerd.docker_async(
            "image", "inspect", "--format", "{{json .RepoDigests}}", "multi")).stdout
        log = dockerd.log_text()

    assert pulled_digest(pulled_alpine.stdout) == alpine.digest
    assert pulled_digest(pulled_multi.stdout) == multi.digest
    assert multi.digest in repo_digests
    # Every blob dockerd needed crossed the link once, through the node (the arm64 child's
    # blobs were never asked for)...
    expected = {*alpine.blobs, *amd64.blobs}
    fetched = [r.path_qs.rsplit("/", 1)[1] for r in relay.records
               if r.method == "GET" and "/blobs/" in r.path_qs]
    assert sorted(fetched) == sorted(expected)
    assert metric(node, "mirror_cache_requests_total", kind="blob", outcome="miss") == len(expected)
    assert metric(node, "mirror_http_requests_total", route="blob", method="GET",
                  status="200") == len(expected)
    # ...dockerd asked the node by Docker Hub name, and never fell back to Docker Hub.
    assert relay.count("GET", "/v2/library/alpine/manifests/latest") >= 1
    assert relay.count("GET", "/v2/library/multi/manifests/latest") >= 1
    assert "registry-1.docker.io" not in log, log[-3000:]


# --------------------------------------------------------------------------- nginx + TLS + login


def non_loopback_address() -> str | None:
    """An IPv4 address of this host outside 127.0.0.0/8 that we can listen on, if any."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.123", 9))  # no packet is sent: only picks a route
            address = probe.getsockname()[0]
    except OSError:
        return None
    if address.startswith("127.") or address == "0.0.0.0":
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except OSError:
        return None
    return address


@contextmanager
def docker_certs_d(host: str, ca: Path) -> Iterator[Path]:
    """``/etc/docker/certs.d/<host>/ca.crt`` (dockerd's fixed location), removed afterwards."""
    directory = Path("/etc/docker/certs.d") / host
    created = [p for p in (directory.parent.parent, directory.parent, directory)
               if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(ca, directory / "ca.crt")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                pass


@pytest.mark.skipif(not nginx_available(), reason="nginx not installed (Debian nginx-light)")
async def test_docker_pulls_through_nginx_tls_with_login(make_mirror: Any, tmp_path: Path) -> None:
    repo = "team/app"
    # On loopback dockerd would not verify TLS at all (see the module docstring): use this
    # host's own address when it has one, else fall back to localhost, unverified.
    address = non_loopback_address()
    https_port, http_port = free_port(), free_port()
    registry = f"{address or 'localhost'}:{https_port}"
    ca = make_ca(tmp_path, name="central")
    users = {"alice": ("pw", {repo: {"pull"}})}

    with Central(tmp_path / "central", ca, users=users) as central, \
            Relay(central.registry.url) as link:
        async with httpx.AsyncClient(timeout=30) as client:
            image = await images.push_image(client, central.registry.url, repo, "v1",
                                            layers=[250_000, 10_000], seed=f"tls-{uuid.uuid4()}",
                                            headers=bearer(central.admin_token(repo)))
        config = node_config(tmp_path, link.url, auth={"token": central.token_block},
                             mirror_auth={"token_proxy": True},
                             http={"host": f"https://{registry}"})
        node = await make_mirror(link.url, config=config)

        tls = make_tls(tmp_path / "tls", hosts=("localhost", "127.0.0.1", *filter(None, [address])))
        site = render_front(FRONT.read_text(), https_port=https_port, http_port=http_port,
                            servers=[node.host], cert=tls.cert, key=tls.key)
        loopback_listen = f"listen {LOOPBACK}:{https_port} ssl;"
        assert site.count(loopback_listen) == 1
        if address is not None:
            site = site.replace(loopback_listen, f"{loopback_listen} listen {registry} ssl;")
        front = Nginx(tmp_path / "nginx", site)
        front.check()
        front.start(https_port, http_port)
        try:
            with run_dockerd(tmp_path / "dockerd", {}) as dockerd:
                if address is not None:
                    # Without the CA, dockerd refuses the front: TLS really is verified.
                    refused = await dockerd.docker_async("login", registry, "-u", "alice",
                                                         "--password-stdin", input="pw",
                                                         check=False)
                    assert refused.returncode != 0
                    assert "x509" in refused.stderr, refused.stderr

                with docker_certs_d(registry, tls.ca):
                    bad = await dockerd.docker_async("login", registry, "-u", "alice",
                                                     "--password-stdin", input="wrong",
                                                     check=False)
                    login = await dockerd.docker_async("login", registry, "-u", "alice",
                                                       "--password-stdin", input="pw")
                    pulled = await dockerd.docker_async("pull", f"{registry}/{repo}:v1")
                    image_id = await dockerd.image_id(f"{registry}/{repo}:v1")
        finally:
            front.stop()
            print(front.logs())

    assert bad.returncode != 0 and "unauthorized" in bad.stderr.lower(), bad.stderr
    assert "Login Succeeded" in login.stdout
    assert image_id == image.config_digest
    assert pulled_digest(pulled.stdout) == image.digest
    # The node fetched each blob once over the link, with alice's token; the token requests
    # went through nginx's `location = /token` to the node's relay, then to the issuer.
    blob_gets = [r for r in link.records if r.method == "GET" and "/blobs/" in r.path_qs]
    assert sorted(r.path_qs.rsplit("/", 1)[1] for r in blob_gets) == sorted(image.blobs)
    assert all((r.request_headers or {}).get("Authorization", "").startswith("Bearer ")
               for r in blob_gets)
    assert metric(node, "mirror_cache_requests_total", kind="blob", outcome="miss") == len(image.blobs)
    token_lines = [line for line in front.access_log().splitlines() if '"GET /token?' in line]
    assert token_lines
    assert any(user == "alice" and status == 200 for user, status in central.iter_log())


# --------------------------------------------------------------------------- push, rmi, pull


@pytest.mark.parametrize("source", ["pulled", "loaded"])
async def test_docker_push_through_the_node_then_pull_crosses_no_blob_bytes(
    make_mirror: Any, relay: Relay, upstream: Any, upstream_client: httpx.AsyncClient,
    tmp_path: Path, source: str,
) -> None:
    """``pulled``: an image pulled through the node is re-tagged and pushed (dockerd mounts
    its layers from the source repository, uploads the config). ``loaded``: an image
    ``docker load``ed from an archive is pushed (dockerd compresses and uploads every layer
    through the node). Either way the pull after ``docker rmi`` costs the link nothing."""
    suffix = uuid.uuid4().hex[:8]
    node = await make_mirror(relay.url, passthrough_writes=True, tag_ttl="1h")
    pushed_repo = f"team/pushed-{suffix}"
    target = f"{node.host}/{pushed_repo}:v1"

    with run_dockerd(tmp_path / "dockerd", {}) as dockerd:  # 127.0.0.0/8: plain HTTP allowed
        if source == "pulled":
            base = await images.push_image(upstream_client, upstream.url, f"team/base-{suffix}",
                                           "v1", layers=[300_000, 40_000], seed=f"base-{suffix}")
            await dockerd.docker_async("pull", f"{node.host}/{base.repo}:v1")
            await dockerd.docker_async("tag", f"{node.host}/{base.repo}:v1", target)
            local_refs = [f"{node.host}/{base.repo}:v1", target]
        else:
            base = images.build_image(pushed_repo, "v1", layers=[300_000, 40_000],
                                      seed=f"loaded-{suffix}")
            archive = write_image_archive(tmp_path / "image.tar", base.config,
                                          [gz for _, gz in base.layers], [target])
            await dockerd.docker_async("load", "-i", str(archive))
            local_refs = [target]
        assert await dockerd.image_id(target) == base.config_digest
        relay.reset()
        pushed = await dockerd.docker_async("push", target)
        pushed_digest = pulled_digest(pushed.stdout)
        uploaded = sum(r.request_bytes for r in relay.records if "/blobs/uploads/" in r.path_qs)
        await dockerd.docker_async("rmi", *local_refs)
        gone = await dockerd.docker_async("image", "inspect", target, check=False)
        assert gone.returncode != 0

        relay.reset()
        hits = metric(node, "mirror_cache_requests_total", kind="blob", outcome="hit")
        pulled = await dockerd.docker_async("pull", target)
        image_id = await dockerd.image_id(target)
        served = metric(node, "mirror_cache_requests_total", kind="blob", outcome="hit") - hits

    assert image_id == base.config_digest
    assert pulled_digest(pulled.stdout) == pushed_digest
    if source == "loaded":  # every layer's bytes went up through the node
        assert uploaded >= sum(len(gz) for _, gz in base.layers) * 0.9
    # dockerd downloaded every blob again, and the node answered all of them from its store
    # (what the push left there): not one blob byte crossed the link.
    assert served == len(base.blobs)
    assert relay.bytes_sent("/blobs/") == 0
    assert relay.count("GET", "/blobs/") == 0
    # The push reached the central registry, every blob included.
    async with httpx.AsyncClient(timeout=30) as client:
        direct = await client.get(f"{upstream.url}/v2/{pushed_repo}/manifests/v1",
                                  headers={"Accept": MANIFEST_ACCEPT})
        assert direct.status_code == 200, direct.text
        assert direct.headers["Docker-Content-Digest"] == pushed_digest
        manifest = direct.json()
        assert manifest["config"]["digest"] == base.config_digest
        for blob in [manifest["config"], *manifest["layers"]]:
            found = await client.head(f"{upstream.url}/v2/{pushed_repo}/blobs/{blob['digest']}")
            assert found.status_code == 200, blob
