"""deploy/: the shipped nginx front, config, unit, manifests and image recipe, checked.

* nginx runs the SHIPPED ``deploy/nginx/mirror.conf`` (ports, upstream servers and certificate
  paths rewritten, nothing else) in front of real nodes built from the SHIPPED
  ``deploy/config.yml``; skopeo pulls through it with TLS verified against our own CA, token
  auth going through the ``/token`` relay location;
* the digest-hash ``map``: one blob under two repository names is one key, one node, one
  upstream fetch; ``Range`` requests pass through; a forged ``X-Forwarded-For`` is dropped;
  directives no running test can observe (buffering, timeouts, TLS versions) are read;
* an edge node pulls through a zone's front (edge-hosts.toml), trusting the zone's CA through
  ``SSL_CERT_FILE``;
* ``mirror serve`` on the shipped config answers the probes the manifests and the Dockerfile
  use, on the debug port, and survives the unit's ``ExecReload`` (SIGHUP);
* ``systemd-analyze verify`` accepts the unit;
* the Kubernetes manifests, the compose file, the Dockerfile and the client files are parsed
  and cross-checked against the node's settings (``mirror.config.load_settings``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from mirror.cli import FLUSH_BUDGET
from mirror.config import Settings, load_settings, parse_duration
from tests.support import images
from tests.support.authenv import challenge_params
from tests.support.images import DOCKER_SCHEMA2, MANIFEST_ACCEPT
from tests.support.nginx import Nginx, TLSFiles, make_tls, nginx_available, render_front
from tests.support.procs import ManagedProcess, free_port, run_skopeo_async, wait_http
from tests.support.token_issuer import ISSUER, SERVICE, TokenIssuer, make_ca

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG = DEPLOY / "config.yml"
FRONT = DEPLOY / "nginx" / "mirror.conf"
UNIT = DEPLOY / "systemd" / "mirror.service"
ENV_FILE = DEPLOY / "systemd" / "mirror.env"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
CLIENTS = DEPLOY / "clients"


@pytest.fixture
def nginx_installed() -> None:
    if not nginx_available():
        pytest.fail("nginx not found: install the Debian package nginx-light (scripts/test does)")


needs_nginx = pytest.mark.usefixtures("nginx_installed")


def node_ports(settings: Settings) -> tuple[int, int]:
    """(registry port, debug port) the node listens on, from http.addr and http.debug.addr."""
    debug = settings.http.debug_bind
    assert debug is not None, "http.debug.addr must be set: probes and metrics live there"
    return settings.http.bind[1], debug[1]


@pytest.fixture(scope="module")
def shipped() -> Settings:
    """The shipped node config, through the node's own loader (no environment)."""
    return load_settings(CONFIG, {})


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def node_config_from_shipped(
    root: Path,
    remote_url: str,
    *,
    token: dict[str, str] | None,
    addr: str = "127.0.0.1:0",
    debug_addr: str | None = None,
) -> dict[str, Any]:
    """deploy/config.yml with only what a test host must change: paths, ports, upstream, auth.

    ``http.host`` is dropped, so the node's absolute URLs come from nginx's
    ``X-Forwarded-Proto``/``X-Forwarded-Host`` (believed from ``trusted_proxies``, which must
    then include loopback: it does in the shipped file).
    """
    config = yaml.safe_load(CONFIG.read_text())
    config["version"] = "0.1"
    config["log"] = {"level": "info", "formatter": "text"}
    config["storage"]["filesystem"]["rootdirectory"] = str(root / "store")
    config["http"].pop("host")
    config["http"]["addr"] = addr
    if debug_addr is None:
        config["http"].pop("debug")
    else:
        config["http"]["debug"]["addr"] = debug_addr
    config["proxy"]["remoteurl"] = remote_url
    if token is None:
        config.pop("auth")
    else:
        config["auth"]["token"].update(token)
    config["mirror"]["metadata_dir"] = str(root / "meta")
    config["mirror"]["negative_ttl"] = "0s"
    return config


def front_for(
    tmp: Path, tls: TLSFiles, servers: list[str], *, debug_headers: bool
) -> tuple[Nginx, int, int]:
    https_port, http_port = free_port(), free_port()
    site = render_front(
        FRONT.read_text(),
        https_port=https_port,
        http_port=http_port,
        servers=servers,
        cert=tls.cert,
        key=tls.key,
        debug_headers=debug_headers,
    )
    nginx = Nginx(tmp, site)
    nginx.check()
    return nginx, https_port, http_port


@pytest.fixture
def started() -> Iterator[list[Nginx]]:
    """nginx instances a test starts, stopped by PID at teardown.

    Their logs are printed, so pytest shows them with a failing test's captured output.
    """
    instances: list[Nginx] = []
    yield instances
    for nginx in instances:
        nginx.stop()
        print(nginx.logs())


# --------------------------------------------------------------------------- nginx + skopeo


@needs_nginx
async def test_skopeo_pulls_through_the_shipped_nginx_front_with_verified_tls(
    make_mirror: Any,
    relay: Any,
    upstream: Any,
    upstream_client: httpx.AsyncClient,
    tls: TLSFiles,
    tmp_path: Path,
    started: list[Nginx],
) -> None:
    repo = f"deploy/app-{uuid.uuid4().hex[:8]}"
    image = await images.push_image(
        upstream_client, upstream.url, repo, "v1", layers=[4096, 300_000]
    )
    pki = make_ca(tmp_path, name="central")
    with TokenIssuer(pki, users={"alice": ("alice-pw", {repo: {"pull"}})}) as issuer:
        (tmp_path / "front-node").mkdir()
        config = node_config_from_shipped(
            tmp_path / "front-node",
            relay.url,
            token={"realm": issuer.url, "rootcertbundle": str(pki.cert_path)},
        )
        assert config["auth"]["token"]["issuer"] == ISSUER
        assert config["auth"]["token"]["service"] == SERVICE
        node = await make_mirror(relay.url, config=config)
        nginx, https_port, http_port = front_for(
            tmp_path / "nginx", tls, [node.host], debug_headers=False
        )
        started.append(nginx.start(https_port, http_port))
        base = f"https://localhost:{https_port}"

        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=tls.ca), timeout=30, trust_env=False
        ) as client:
            challenge = await client.get(f"{base}/v2/")
            plain = await client.get(f"http://127.0.0.1:{http_port}/v2/")
            metrics = await client.get(f"{base}/metrics")
        # The realm is built from X-Forwarded-Proto/Host: https and the port clients used.
        assert challenge.status_code == 401, challenge.text
        scheme, params = challenge_params(challenge.headers["WWW-Authenticate"])
        assert (scheme, params["realm"], params["service"]) == ("bearer", f"{base}/token", SERVICE)
        assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
        assert metrics.status_code == 404  # the debug listener is never behind the front

        ref = f"docker://localhost:{https_port}/{repo}:v1"
        out = tmp_path / "pulled"
        await run_skopeo_async(
            "copy",
            "--src-cert-dir",
            str(tls.ca_dir),
            "--src-creds",
            "alice:alice-pw",
            ref,
            f"dir:{out}",
        )
        assert (out / "manifest.json").read_bytes() == image.manifest
        for digest, blob in image.blobs.items():
            assert (out / digest.removeprefix("sha256:")).read_bytes() == blob
        assert issuer.requests >= 1  # the token came through `location = /token` and the relay
        assert any(
            line.split('"')[1].startswith("GET /token?")
            for line in nginx.access_log().splitlines()
            if '"' in line
        )

        # TLS really is verified: without the CA, skopeo refuses the front.
        refused = await run_skopeo_async("inspect", "--creds", "alice:alice-pw", ref, check=False)
        assert refused.returncode != 0
        assert b"certificate" in refused.stderr, refused.stderr


@needs_nginx
async def test_blobs_hash_on_digest_across_repositories_and_ranges_pass(
    make_mirror: Any,
    relay: Any,
    upstream: Any,
    upstream_client: httpx.AsyncClient,
    tls: TLSFiles,
    tmp_path: Path,
    started: list[Nginx],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.access")
    tag = uuid.uuid4().hex[:8]
    base_layer = images.make_layer(f"shared-base-{tag}", 200_000)
    first = await images.push_image(
        upstream_client,
        upstream.url,
        f"team-a/web-{tag}",
        "v1",
        layers=[base_layer, 2048],
        seed=f"a-{tag}",
    )
    second = await images.push_image(
        upstream_client,
        upstream.url,
        f"team-b/api-{tag}",
        "v1",
        layers=[base_layer, 3072],
        seed=f"b-{tag}",
    )
    base = images.sha256_digest(base_layer)
    assert base in first.layer_digests and base in second.layer_digests
    nodes = []
    for i in range(2):
        (tmp_path / f"front-node{i}").mkdir()
        nodes.append(
            await make_mirror(
                relay.url,
                config=node_config_from_shipped(tmp_path / f"front-node{i}", relay.url, token=None),
            )
        )
    nginx, https_port, http_port = front_for(
        tmp_path / "nginx", tls, [n.host for n in nodes], debug_headers=True
    )
    started.append(nginx.start(https_port, http_port))
    url = f"https://localhost:{https_port}"

    async with httpx.AsyncClient(
        base_url=url, verify=ssl.create_default_context(cafile=tls.ca), timeout=30, trust_env=False
    ) as client:
        by_tag = await client.get(
            f"/v2/{first.repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        )
        by_digest = await client.get(
            f"/v2/{first.repo}/manifests/{first.digest}", headers={"Accept": MANIFEST_ACCEPT}
        )
        blob_a = await client.get(f"/v2/{first.repo}/blobs/{base}")
        forged = {"X-Forwarded-For": "203.0.113.9"}  # a client choosing its logged address
        blob_b = await client.get(f"/v2/{second.repo}/blobs/{base}", headers=forged)
        ranged = await client.get(
            f"/v2/{second.repo}/blobs/{base}", headers={"Range": "bytes=1000-50999"}
        )
        cold = second.layer_digests[1]  # never fetched yet: a range on a cold blob
        cold_ranged = await client.get(
            f"/v2/{second.repo}/blobs/{cold}", headers={"Range": "bytes=10-19"}
        )

    assert by_tag.status_code == 200 and by_tag.content == first.manifest
    assert by_tag.headers["X-Mirror-Key"] == f"/v2/{first.repo}/manifests/v1"
    assert by_digest.status_code == 200 and by_digest.headers["X-Mirror-Key"] == first.digest
    assert blob_a.status_code == blob_b.status_code == 200
    assert blob_a.content == blob_b.content == base_layer
    # One key, hence one node, for the shared layer, whichever repository names it...
    assert blob_a.headers["X-Mirror-Key"] == blob_b.headers["X-Mirror-Key"] == base
    assert blob_a.headers["X-Mirror-Upstream"] == blob_b.headers["X-Mirror-Upstream"]
    # ...so it crossed the link to the central registry once.
    assert relay.count("GET", f"/blobs/{base}") == 1
    access = [r.getMessage() for r in caplog.records if r.name == "mirror.access"]
    assert any(f"/v2/{second.repo}/blobs/{base}" in line for line in access)
    assert not any("203.0.113.9" in line for line in access)  # nginx replaced the header

    assert ranged.status_code == 206, ranged.text
    assert ranged.headers["Content-Range"] == f"bytes 1000-50999/{len(base_layer)}"
    assert ranged.content == base_layer[1000:51000]
    assert ranged.headers["X-Mirror-Upstream"] == blob_a.headers["X-Mirror-Upstream"]
    cold_blob = dict(second.layers)[cold]
    assert cold_ranged.status_code == 206, cold_ranged.text
    assert cold_ranged.headers["Content-Range"] == f"bytes 10-19/{len(cold_blob)}"
    assert cold_ranged.content == cold_blob[10:20]


async def pull_through_edge(
    make_mirror: Any,
    relay: Any,
    upstream: Any,
    upstream_client: httpx.AsyncClient,
    tls: TLSFiles,
    tmp_path: Path,
    started: list[Nginx],
) -> httpx.Response:
    """An edge node whose upstream is a zone node's shipped nginx front (edge-hosts.toml)."""
    image = await images.push_image(
        upstream_client, upstream.url, f"edge/app-{uuid.uuid4().hex[:8]}", "v1"
    )
    (tmp_path / "zone").mkdir()
    zone = await make_mirror(
        relay.url, config=node_config_from_shipped(tmp_path / "zone", relay.url, token=None)
    )
    nginx, https_port, http_port = front_for(
        tmp_path / "nginx", tls, [zone.host], debug_headers=False
    )
    started.append(nginx.start(https_port, http_port))
    (tmp_path / "edge").mkdir()
    front = f"https://localhost:{https_port}"
    edge = await make_mirror(
        front, config=node_config_from_shipped(tmp_path / "edge", front, token=None)
    )
    async with edge.client() as client:
        response = await client.get(
            f"/v2/{image.repo}/manifests/v1", headers={"Accept": DOCKER_SCHEMA2}
        )
    assert response.status_code != 200 or response.content == image.manifest
    return response


@needs_nginx
async def test_edge_node_trusts_the_zone_ca_from_ssl_cert_file(
    make_mirror: Any,
    relay: Any,
    upstream: Any,
    upstream_client: httpx.AsyncClient,
    tls: TLSFiles,
    tmp_path: Path,
    started: list[Nginx],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    response = await pull_through_edge(
        make_mirror, relay, upstream, upstream_client, tls, tmp_path, started
    )
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- read, not run: front and config


def front_directives() -> dict[str, list[str]]:
    """Directive -> argument strings, for every simple directive of the shipped front."""
    found: dict[str, list[str]] = {}
    for line in FRONT.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.endswith(";"):
            name, _, args = line[:-1].partition(" ")
            found.setdefault(name, []).append(" ".join(args.split()))
    return found


def test_front_config_streams_blobs_and_hashes_on_the_digest() -> None:
    """What the source document's nginx needed, plus what a cache in front needs; the running
    tests above cannot tell buffering or the hash directive apart, so they are read here."""
    d = front_directives()
    assert d["client_max_body_size"] == ["0"]
    assert d["chunked_transfer_encoding"] == ["on"]
    assert d["proxy_buffering"] == ["off"] and d["proxy_request_buffering"] == ["off"]
    assert d["proxy_read_timeout"] in (["900"], ["900s"])
    assert d["proxy_http_version"] == ["1.1"] and d["proxy_set_header"].count('Connection ""') == 1
    assert d["keepalive"] and int(d["keepalive"][0]) > 0
    headers = {args.split()[0]: args.split()[1] for args in d["proxy_set_header"]}
    assert headers["X-Forwarded-Proto"] == "$scheme"
    assert headers["X-Forwarded-Host"] == headers["Host"] == "$http_host"
    assert headers["X-Forwarded-For"] == "$remote_addr"  # replaced: the node reads the 1st hop
    (protocols,) = d["ssl_protocols"]
    assert set(protocols.split()) == {"TLSv1.2", "TLSv1.3"}
    assert d["hash"] == ["$mirror_key consistent"] and "ip_hash" not in d
    # A node that is restarting: idempotent requests go to the next node (a rolling restart
    # loses no pull, tests/test_zone_deploy.py); never on the node's own 5xx answers.
    assert d["proxy_next_upstream"] == ["error timeout"]
    assert int(d["proxy_next_upstream_tries"][0]) >= len(front_upstream_servers()) == 3
    assert "non_idempotent" not in d["proxy_next_upstream"][0]
    assert d["listen"] == ["80", "443 ssl"]
    text = FRONT.read_text()
    assert re.search(r"^map \$request_uri \$mirror_key \{", text, re.MULTILINE)
    assert re.search(r"location = /token \{\s*proxy_pass http://mirror_nodes;", text)


def test_shipped_config_is_the_documented_zone_node(shipped: Settings) -> None:
    assert shipped.ignored_keys == () and shipped.unknown_keys == ()
    assert (shipped.version, shipped.log.formatter) == ("0.1", "json")
    assert str(shipped.storage.root) == "/var/lib/mirror"
    assert (shipped.http.addr, shipped.http.debug_addr) == (":5000", ":5001")
    assert shipped.http.host is not None and shipped.http.host.startswith("https://")
    assert shipped.http.tls is None  # TLS ends at nginx
    assert shipped.proxy.remoteurl.startswith("https://")
    token = shipped.auth.token
    assert token is not None
    assert (token.issuer, token.service) == ("caas-issuer", "caas-registry")
    assert str(token.rootcertbundle) == "/etc/mirror/root.crt"
    assert shipped.mirror.tag_ttl == 300
    assert shipped.mirror.auth.token_proxy is True
    # SQLite on local disk even when the store is a NAS mount: not inside the store.
    assert shipped.mirror.metadata_dir is not None
    assert not shipped.metadata_dir.is_relative_to(shipped.storage.root)
    assert shipped.mirror.trusted_proxies
    # What the cut-over plan has operators set is in the file, commented where it is a choice.
    text = CONFIG.read_text()
    for needle in ("# passthrough_writes: true", "# username:", "# password:", "prewarm"):
        assert needle in text, needle
    assert shipped.mirror.names and shipped.mirror.shutdown_grace <= 25


def test_hub_mirror_config_differs_only_where_documented(shipped: Settings) -> None:
    hub = load_settings(DEPLOY / "config-hub.yml", {})
    assert hub.ignored_keys == () and hub.unknown_keys == ()
    assert hub.proxy.remoteurl == "https://registry-1.docker.io"
    assert hub.auth.token is None and hub.auth.htpasswd is None  # docker sends mirrors no creds
    assert hub.http.host is not None and hub.http.host != shipped.http.host
    assert (hub.http.addr, hub.http.debug_addr) == (shipped.http.addr, shipped.http.debug_addr)
    assert (hub.storage.root, hub.metadata_dir) == (shipped.storage.root, shipped.metadata_dir)


def test_mirror_serve_on_the_shipped_config_answers_probes_and_reload(
    upstream: Any, tmp_path: Path
) -> None:
    """`mirror serve` (as the unit and the image run it) on deploy/config.yml, paths and
    ports moved: the probe paths the manifests and the Dockerfile use answer on the debug port,
    not on the registry port; SIGHUP (ExecReload) reloads keys and keeps serving; SIGTERM
    (systemctl stop, docker stop) exits 0."""
    pki = make_ca(tmp_path, name="probe")
    registry_port, debug_port = free_port(), free_port()
    (tmp_path / "node").mkdir()
    config = node_config_from_shipped(
        tmp_path / "node",
        upstream.url,
        token={"realm": "http://127.0.0.1:9/token", "rootcertbundle": str(pki.cert_path)},
        addr=f"127.0.0.1:{registry_port}",
        debug_addr=f"127.0.0.1:{debug_port}",
    )
    config["log"]["formatter"] = "json"
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    probe_paths = {probe["httpGet"]["path"] for _, _, probe in all_probes()}
    probe_paths.add(dockerfile_healthcheck_url()[1])
    assert probe_paths == {"/debug/health", "/debug/ready"}

    with ManagedProcess(
        [sys.executable, "-m", "mirror", "serve", str(path)], log_dir=tmp_path, name="mirror"
    ) as node:
        for probe in sorted(probe_paths):
            assert (
                wait_http(
                    f"http://127.0.0.1:{debug_port}{probe}",
                    expect_status=200,
                    process=node,
                    timeout=60,
                )
                == 200
            )
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(f"http://127.0.0.1:{registry_port}/v2/").status_code == 401
            for probe in probe_paths | {"/metrics"}:
                assert client.get(f"http://127.0.0.1:{registry_port}{probe}").status_code == 404
            node.signal(signal.SIGHUP)
            wait_until(lambda: "token keys reloaded" in node.log_text(), node)
            assert node.poll() is None
            assert client.get(f"http://127.0.0.1:{debug_port}/debug/health").status_code == 200
        assert node.stop(timeout=15) == 0
        records = [line for line in node.log_text().splitlines() if line.startswith("{")]
        assert records and all(json.loads(line) for line in records)  # log.formatter: json


def wait_until(predicate: Any, process: ManagedProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"exited: {process.log_tail()}"
        assert time.monotonic() < deadline, f"timed out: {process.log_tail()}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- systemd


def unit_entries(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file (all sections), values in order."""
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def test_systemd_unit_runs_the_shipped_config_hardened(shipped: Settings) -> None:
    unit = unit_entries(UNIT.read_text())
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "simple" and one["User"] == "mirror"
    argv = shlex.split(one["ExecStart"])
    assert argv[0] == "/usr/local/bin/mirror"
    assert argv[1:] == dockerfile_entrypoint()[1:] == ["serve", "/etc/mirror/config.yml"]
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure" and one["LimitNOFILE"] == "65536"
    assert one["NoNewPrivileges"] == "yes" and one["ProtectSystem"] == "strict"
    assert one["PrivateTmp"] == "yes"
    writable = {p for value in unit["ReadWritePaths"] for p in value.split()}
    assert writable == {str(shipped.storage.root), str(shipped.metadata_dir)}
    assert "time-sync.target" in one["After"]  # token checks allow 60 s of skew
    # SIGTERM: the drain, the cut and the flush end before systemd's SIGKILL.
    assert shipped.mirror.shutdown_grace + FLUSH_BUDGET <= go_seconds(one["TimeoutStopSec"])
    # The upstream's private CA and the node's own account come from a root-only file.
    assert one["EnvironmentFile"] == f"-/etc/mirror/{ENV_FILE.name}"


def go_seconds(text: str) -> float:
    """A systemd/Go-style duration ("30s", "1min") in seconds."""
    return parse_duration(text.replace("min", "m"), "TimeoutStopSec")


def test_systemd_environment_file_names_known_settings() -> None:
    """deploy/systemd/mirror.env: comments and VAR=value; every REGISTRY_* names a key."""
    variables = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, line
            variables[name] = value
        elif line.startswith("#") and re.fullmatch(r"#[A-Z_]+=.*", line):
            name, _, value = line[1:].partition("=")
            variables[name] = value or "x"
    assert "SSL_CERT_FILE" in variables
    assert {"REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_PASSWORD"} <= variables.keys()
    env = {k: v for k, v in variables.items() if k.startswith("REGISTRY_")}
    settings = load_settings(CONFIG, env)
    assert settings.unknown_keys == ()
    assert settings.proxy.username == variables["REGISTRY_PROXY_USERNAME"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail(
            "systemd-analyze not found: install the Debian package 'systemd' "
            "(scripts/test installs it)"
        )
    # /usr/local/bin/mirror is where the README installs the command; here it is wherever pip
    # put it. Only ExecStart's program is changed; User=mirror need not exist for verify.
    program = shutil.which("mirror") or f"{sys.executable} -m mirror"
    text = UNIT.read_text()
    text, count = re.subn(
        r"^ExecStart=/usr/local/bin/mirror ", f"ExecStart={program} ", text, flags=re.MULTILINE
    )
    assert count == 1
    unit = tmp_path / "mirror.service"
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=30
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "mirror.service" in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


# --------------------------------------------------------------------------- Kubernetes


def manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def configmap_settings(
    docs: list[dict[str, Any]], tmp_path: Path, environ: dict[str, str] | None = None
) -> Settings:
    """The ConfigMap's config.yml through the node's loader, with the pod's environment."""
    (configmap,) = of_kind(docs, "ConfigMap")
    path = tmp_path / f"{configmap['metadata']['name']}.yml"
    path.write_text(configmap["data"]["config.yml"])
    settings = load_settings(path, environ or {})
    assert settings.ignored_keys == () and settings.unknown_keys == ()
    return settings


POD_IP = "10.244.1.7"  # what the downward API would give one pod
ZONE_SECRET = "s3cret-from-the-kubernetes-secret"


def pod_environment(
    container: dict[str, Any], secrets: dict[tuple[str, str], str]
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: the downward API's
    ``status.podIP``, ``secretKeyRef`` values from ``secrets`` ((name, key) -> value), and
    ``$(VAR)`` references to variables defined before."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"]
            )
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", var
            env[var["name"]] = POD_IP
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def all_probes() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind of probe, container, probe) for every container of both manifests."""
    for name in ("statefulset.yaml", "daemonset.yaml"):
        for workload in manifests(name):
            if workload["kind"] in ("StatefulSet", "DaemonSet"):
                for container in workload["spec"]["template"]["spec"]["containers"]:
                    for kind in ("livenessProbe", "readinessProbe"):
                        yield kind, container, container[kind]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return found


def check_workload(
    workload: dict[str, Any], docs: list[dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    """What both workloads must get right; returns the pod spec."""
    spec = workload["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["containerPort"] for p in container["ports"]}
    registry_port, debug_port = node_ports(settings)
    assert ports == {registry_port, debug_port}
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"]["path"] == "/debug/health"
    assert readiness["httpGet"]["path"] == "/debug/ready"
    for probe in (liveness, readiness):
        assert container_port(container, probe["httpGet"]["port"]) == debug_port
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(settings.storage.root) in mounts and str(settings.metadata_dir) in mounts
    assert not mounts[str(settings.storage.root)].get("readOnly")
    assert not mounts[str(settings.metadata_dir)].get("readOnly")
    # The config lands where the image's ENTRYPOINT reads it; the token certificate where the
    # config points.
    assert mounts[dockerfile_entrypoint()[-1]]["readOnly"] is True
    assert settings.auth.token is not None and str(settings.auth.token.rootcertbundle) in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    assert not claims & volumes.keys()
    assert {m["name"] for m in container["volumeMounts"]} <= volumes.keys() | claims
    (configmap,) = of_kind(docs, "ConfigMap")
    config_volume = volumes[mounts[dockerfile_entrypoint()[-1]]["name"]]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["securityContext"]["runAsNonRoot"] is True
    return pod


def test_kubernetes_statefulset_runs_a_zone(shipped: Settings, tmp_path: Path) -> None:
    """A StatefulSet of zone nodes: stable identities, a volume each, rolling updates, a
    headless Service for membership, a Service for clients, a PodDisruptionBudget; the pod's
    config (ConfigMap + its environment: pod IP, Secret) loads as a zone node."""
    docs = manifests("statefulset.yaml")
    assert sorted(doc["kind"] for doc in docs) == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    (statefulset,) = of_kind(docs, "StatefulSet")
    spec = statefulset["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    environ = pod_environment(container, {("mirror-zone", "secret"): ZONE_SECRET})
    settings = configmap_settings(docs, tmp_path, environ)

    # The embedded config is deploy/config.yml but for the proxies nginx connects from and
    # the zone (and the file it was read from).
    def without_site(s: Settings) -> Settings:
        return replace(s, mirror=replace(s.mirror, trusted_proxies=(), zone=None), source=None)

    assert without_site(settings) == without_site(shipped)
    zone = settings.mirror.zone
    assert zone is not None
    assert zone.self_url == f"http://{POD_IP}:{settings.http.bind[1]}"  # the downward API
    assert zone.secret == ZONE_SECRET  # from the Secret, never in the ConfigMap
    assert "secret" not in yaml.safe_load(of_kind(docs, "ConfigMap")[0]["data"]["config.yml"])[
        "mirror"]["zone"]

    assert spec["replicas"] >= 3
    assert spec["updateStrategy"]["type"] == "RollingUpdate"  # never Recreate: the zone serves
    assert "strategy" not in spec
    pod = check_workload(statefulset, docs, settings)
    # SIGTERM after preStop: the drain, the cut and the flush end before the kubelet's SIGKILL.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = float(pre_stop[1]) + settings.mirror.shutdown_grace + FLUSH_BUDGET
    assert budget <= pod["terminationGracePeriodSeconds"]
    # One volume per node, holding the store and the metadata.
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(settings.storage.root)] == mounts[str(settings.metadata_dir)]
    assert mounts[str(settings.storage.root)] == claim["metadata"]["name"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])

    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    headless = services[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    # Membership is the headless Service's DNS name, on the port the nodes listen on.
    (peers,) = zone.peers
    peer = urlsplit(peers)
    assert peer.hostname == headless["metadata"]["name"]
    assert peer.port == settings.http.bind[1]
    (clients,) = [s for name, s in services.items() if name != spec["serviceName"]]
    assert clients["spec"].get("clusterIP") != "None"
    for service in (headless, clients):
        assert service["spec"]["selector"].items() <= pod_labels(statefulset).items()
        targets = {container_port(container, p["targetPort"]) for p in service["spec"]["ports"]}
        assert targets == {settings.http.bind[1]}  # the debug port stays on the pod

    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(statefulset).items()
    assert pdb["spec"]["maxUnavailable"] == 1 < spec["replicas"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_kubernetes_daemonset_keeps_the_store_on_the_host(tmp_path: Path) -> None:
    docs = manifests("daemonset.yaml")
    assert sorted(doc["kind"] for doc in docs) == ["ConfigMap", "DaemonSet"]
    settings = configmap_settings(docs, tmp_path)
    (daemonset,) = of_kind(docs, "DaemonSet")
    pod = check_workload(daemonset, docs, settings)
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if mount["mountPath"] in (str(settings.storage.root), str(settings.metadata_dir)):
            assert volumes[mount["name"]]["hostPath"]["path"] == mount["mountPath"]
    registry = [p for p in container["ports"] if p["containerPort"] == settings.http.bind[1]]
    assert pod.get("hostNetwork") or registry[0].get("hostPort") == settings.http.bind[1]
    # A node-local cache of the zone node: its upstream is the zone's registry host.
    assert settings.proxy.remoteurl == load_settings(CONFIG, {}).http.host


# --------------------------------------------------------------------------- compose


def compose_volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def front_upstream_servers() -> list[str]:
    block = re.search(
        r"^upstream mirror_nodes \{\n(.*?)^\}", FRONT.read_text(), re.MULTILINE | re.DOTALL
    )
    assert block is not None
    return re.findall(r"^[ \t]*server (\S+?)(?: [^;]*)?;", block.group(1), re.MULTILINE)


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment (mapping syntax) plus a stand-in for its env_file's secret."""
    assert service["env_file"] == "./secrets/zone.env"  # REGISTRY_MIRROR_ZONE_SECRET, not here
    env = {k: str(v) for k, v in service["environment"].items()}
    assert "REGISTRY_MIRROR_ZONE_SECRET" not in env
    return {**env, "REGISTRY_MIRROR_ZONE_SECRET": ZONE_SECRET}


def test_compose_runs_a_zone_behind_nginx(shipped: Settings) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    nginx = services["nginx"]
    nginx_mounts = compose_volumes(nginx)
    site = [
        target
        for target, source in nginx_mounts.items()
        if (COMPOSE.parent / source).resolve() == FRONT
    ]
    assert len(site) == 1 and re.fullmatch(r"/etc/nginx/conf\.d/[^/]+\.conf", site[0])
    cert_paths = re.findall(
        r"^\s*ssl_certificate(?:_key)?\s+(\S+);", FRONT.read_text(), re.MULTILINE
    )
    assert len(cert_paths) == 2
    for path in cert_paths:
        assert str(Path(path).parent) in nginx_mounts
    published = {str(p).rsplit(":", 2)[-1] for p in nginx["ports"]}
    assert published == {"443", "80"}

    servers = front_upstream_servers()
    assert len(servers) == 3  # a 3-node zone behind the front
    zones, selves, volumes = [], [], []
    for server in servers:
        host, _, port = server.rpartition(":")
        node = services[host]  # each upstream server is a compose service...
        assert int(port) == shipped.http.bind[1]  # ...on the node's http.addr port
        assert {int(p) for p in node["expose"]} == set(node_ports(shipped))
        mounts = compose_volumes(node)
        assert (COMPOSE.parent / mounts[dockerfile_entrypoint()[-1]]).resolve() == CONFIG
        assert str(shipped.storage.root) in mounts and str(shipped.metadata_dir) in mounts
        volumes += [mounts[str(shipped.storage.root)], mounts[str(shipped.metadata_dir)]]
        assert shipped.auth.token is not None and str(shipped.auth.token.rootcertbundle) in mounts
        assert (
            COMPOSE.parent / node["build"]["context"] / node["build"]["dockerfile"]
        ).resolve() == DOCKERFILE
        assert nginx["depends_on"][host]["condition"] == "service_healthy"
        # The node's config as the container sees it: deploy/config.yml plus its environment.
        settings = load_settings(CONFIG, compose_environment(node))
        assert settings.unknown_keys == () and settings.ignored_keys == ()
        zone = settings.mirror.zone
        assert zone is not None and zone.secret == ZONE_SECRET
        assert zone.self_url == f"http://{server}"  # its service name, as its peers reach it
        zones.append(zone.peers)
        selves.append(zone.self_url)
    # Every node knows the whole zone, self included: the nodes nginx sends clients to.
    assert all(peers == zones[0] for peers in zones)
    assert sorted(zones[0]) == sorted(selves)
    # A store and a metadata volume per node, each declared.
    assert len(set(volumes)) == len(volumes) == 2 * len(servers)
    assert set(volumes) <= compose["volumes"].keys()
    assert dockerfile_healthcheck_url()  # what service_healthy waits on


# --------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def dockerfile_entrypoint() -> list[str]:
    (entrypoint,) = instruction("ENTRYPOINT")
    return json.loads(entrypoint)


def dockerfile_uid() -> int:
    found = re.search(r"useradd\b[^&]*--uid (\d+)[^&]*\bmirror\b", " ".join(instruction("RUN")))
    assert found is not None
    return int(found.group(1))


def dockerfile_healthcheck_url() -> tuple[int, str]:
    (check,) = instruction("HEALTHCHECK")
    found = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", check)
    assert found is not None
    return int(found.group(1)), found.group(2)


def test_dockerfile_builds_the_documented_image(shipped: Settings) -> None:
    """Static: no Docker engine here. Base image, user, volumes, ports, health check,
    entrypoint, and every COPY source present in the build context (the repository root)."""
    words = [word for word, _ in dockerfile()]
    assert instruction("FROM") == ["python:3.11-slim"]
    (user,) = instruction("USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert words.index("USER") < words.index("ENTRYPOINT")
    assert dockerfile_uid() != 0

    volumes = {v for args in instruction("VOLUME") for v in json.loads(args)}
    assert volumes == {str(shipped.storage.root), str(shipped.metadata_dir)}
    exposed = {int(p) for args in instruction("EXPOSE") for p in args.split()}
    assert exposed == set(node_ports(shipped))
    assert dockerfile_healthcheck_url() == (node_ports(shipped)[1], "/debug/health")

    entrypoint = dockerfile_entrypoint()
    assert entrypoint == ["mirror", "serve", "/etc/mirror/config.yml"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mirror"] == "mirror.cli:main"  # `mirror` exists after pip install
    assert project["requires-python"] == ">=3.11"

    copied: dict[str, str] = {}
    for args in instruction("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} missing from the repository"
            copied[source] = parts[-1]
    assert {"pyproject.toml", project["readme"], "mirror"} <= copied.keys()  # what pip builds
    assert copied["deploy/config.yml"] == entrypoint[-1]
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in instruction("RUN"))
    # BuildKit's per-Dockerfile ignore file must let every COPY source through.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for source in copied:
        assert source in allowed or f"{source}/**" in allowed, source


# --------------------------------------------------------------------------- clients


def test_client_files_point_at_the_zone_nodes(shipped: Settings) -> None:
    hub = load_settings(DEPLOY / "config-hub.yml", {})
    daemon = json.loads((CLIENTS / "daemon.json").read_text())
    assert daemon["registry-mirrors"] == [hub.http.host]

    hub_hosts = tomllib.loads((CLIENTS / "containerd" / "hosts.toml").read_text())
    assert hub_hosts["server"] == "https://registry-1.docker.io"
    assert list(hub_hosts["host"]) == [hub.http.host]

    edge = tomllib.loads((CLIENTS / "containerd" / "edge-hosts.toml").read_text())
    assert edge["server"] == shipped.http.host  # names stay the zone's
    assert shipped.http.host not in edge["host"]

    # The central registry's own name, pulled through the zone node: the node must serve
    # containerd's ?ns=<that name>, i.e. the name is in the shipped mirror.names.
    central = tomllib.loads((CLIENTS / "containerd" / "central-hosts.toml").read_text())
    central_name = urlsplit(central["server"]).hostname
    assert central["server"] == f"https://{central_name}"
    assert central_name in shipped.mirror.names
    assert list(central["host"]) == [shipped.http.host]
    for hosts in (hub_hosts, edge, central):
        for host in hosts["host"].values():
            assert set(host["capabilities"]) == {"pull", "resolve"}  # a mirror never takes pushes
            assert host["ca"].startswith("/etc/containerd/certs.d/")

    readme = (DEPLOY / "README.md").read_text()
    for needle in (
        "/etc/docker/certs.d/",
        "registry-mirrors",
        "docker login",
        "chrony",
        "skopeo inspect",
        "/debug/ready",
        "systemd-analyze verify",
        "NFS",
    ):
        assert needle in readme, needle


# --------------------------------------------------------------------------- quick start

QUICK_START = ["./scripts/serve", "./scripts/test"]
DEBIAN_PYTHON = Path("/usr/bin/python3")


def quick_start_commands() -> list[str]:
    """The commands of README's "Quick start" code block, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_that_exist() -> None:
    assert quick_start_commands() == QUICK_START
    for command in QUICK_START:
        script = ROOT / command
        assert script.is_file() and script.stat().st_mode & 0o111, command
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("exec ./scripts/test")


def test_quick_start_serves_on_a_stock_debian_python(tmp_path: Path) -> None:
    """`./scripts/serve` as written, with Debian 12's own externally managed Python (PEP 668).

    A copy of the checkout, so the .venv it makes is its own; the address is moved off
    :5000 through the environment, as an operator could.
    """
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no distribution Python at /usr/bin/python3")
    managed = subprocess.run([str(DEBIAN_PYTHON), "-c", "import sysconfig, os; print(os.path.exists("
                              "os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    checkout = tmp_path / "checkout"
    for name in files:
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    port = free_port()
    env = {"PYTHON": str(DEBIAN_PYTHON), "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}"}
    with ManagedProcess(["./scripts/serve"], cwd=checkout, env=env, name="serve") as serve:
        wait_http(f"http://127.0.0.1:{port}/v2/", timeout=240, process=serve, interval=0.5)
        log = serve.log_text()
    venv_python = checkout / ".venv" / "bin" / "python"
    base = subprocess.run([str(venv_python), "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert base == "/usr"  # the venv was made from Debian's Python
    assert "serving on 127.0.0.1" in log and "externally-managed-environment" not in log
    if managed == "True":
        refused = subprocess.run([str(DEBIAN_PYTHON), "-m", "pip", "install", "--dry-run", str(checkout)],
                                 capture_output=True, text=True)
        assert refused.returncode != 0  # what the old quick start ran into
