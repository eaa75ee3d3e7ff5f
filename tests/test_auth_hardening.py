"""Auth hardening (issue 10): bounded token checks, no lock-out, nothing fails open,
scoped secrets, reload that never kills.

Against the real parts: distribution 2.8 upstream (with token auth and the
token service stand-in where auth is tested), real sockets, real TLS, real
signals to a real `mirror serve` process.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from aiohttp import web

from mirror.api.debug import create_debug_app
from mirror.auth import keys as auth_keys
from mirror.config import ConfigError, load_settings
from mirror.auth.keys import MAX_SIGNATURE_CHECKS, ChainError, load_trusted_keys, verify_chain
from tests.support import images
from tests.conftest import mirror_config
from tests.support.authenv import basic, bearer, node_config, pull_access, token_block
from tests.support.procs import ManagedProcess, free_port, wait_http
from tests.support.images import DOCKER_SCHEMA2
from tests.support.token_issuer import make_ca, make_cert, mint, new_key

CASES = {
    "H-AUTH-02": "a token whose x5c holds eight self-signed CA certificates sharing one key and "
                 "subject (and a mesh of eight distinct keys): at most MAX_SIGNATURE_CHECKS "
                 "signature checks, 401 each, off the event loop; a legitimate pull alongside "
                 "completes",
    "H-AUTH-03": "forward mode: 200 forged JWT-shaped tokens (edited claims, made-up signatures, "
                 "far-future exp; some naming no key) then 20 fresh valid ones at once: the forged "
                 "ones get 401 (those naming no key at worst 429) and spend only the small "
                 "budget; all 20 valid ones pull",
    "H-ADMIN-01": "the notify token and the admin token each open only their own routes: "
                  "notify refuses the admin token, purge/gc/du refuse the notify token",
    "H-ADMIN-02": "forward_to carries the notify token, never the admin token; plain http "
                  "forward_to refused at start unless allow_insecure_forward; equal tokens refused",
    "H-ADMIN-03": "mirror.admin.trust_loopback: false (the DaemonSet's hostNetwork): no admin "
                  "route answers a loopback caller without the token; the DaemonSet sets it",
    "H-CONF-01": "http.tls.clientcas: a TLS client without a certificate, or with one from "
                 "another CA, is refused at the handshake; one with a certificate from the "
                 "configured CA is served",
    "H-CONF-02": "keys the node cannot honour whose ignoring would weaken security (ciphersuites, "
                 "letsencrypt, auth.silly, jwksrefreshinterval, unknown keys under auth/http.tls, "
                 "clientcas without a certificate, unverified clientauth, conflicting keys) "
                 "refuse the start with one line naming the key",
    "H-CONF-03": "auth.token.autoredirect sends clients to autoredirectpath on the node's external "
                 "base; http.headers are on every response",
    "R-RELOAD-01": "SIGHUP to a `mirror serve` without auth.token (as systemd's ExecReload "
                   "sends it): the node logs that there is nothing to reload and keeps serving",
    "R-RELOAD-02": "SIGHUP with auth.htpasswd: a changed file is re-read; a broken one keeps "
                   "the old entries and the node serving",
}

REALM = "https://auth.example.test/token"
ACCEPT = {"Accept": DOCKER_SCHEMA2}


def repo_name(prefix: str = "hard") -> str:
    return f"{prefix}/app-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("pki")
    return SimpleNamespace(ca=make_ca(d, name="central"), dir=d)


# --------------------------------------------------------------------------- H-AUTH-02


def _x5c(certs: list[Any]) -> list[str]:
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in certs]


def same_key_tangle(count: int = 8) -> tuple[Any, list[Any]]:
    """`count` self-signed CA certificates with one key and one subject: each looks
    like the issuer of every other."""
    key = new_key("ec256")
    return key, [make_cert(key, "tangle", ca=True) for _ in range(count)]


def key_mesh(count: int = 8) -> tuple[Any, list[Any]]:
    """`count` CA certificates with distinct keys and one subject, each signed by the
    next one's key: every pair needs a real signature check to be told apart."""
    keys = [new_key("ec256") for _ in range(count)]
    anchors = [make_cert(k, "mesh", ca=True) for k in keys]
    certs = [make_cert(keys[i], "mesh", keys[(i + 1) % count], anchors[(i + 1) % count], ca=True)
             for i in range(count)]
    return keys[0], certs


@pytest.mark.parametrize("build", [same_key_tangle, key_mesh], ids=["same-key", "mesh"])
def test_hostile_chain_costs_a_bounded_number_of_signature_checks(pki, build, monkeypatch) -> None:
    """H-AUTH-02: the chain search is bounded by a count, not by the machine's speed."""
    checks = 0
    real = auth_keys._issued_by

    def counting(child: Any, parent: Any, below: int) -> bool:
        nonlocal checks
        checks += 1
        return real(child, parent, below)

    monkeypatch.setattr(auth_keys, "_issued_by", counting)
    trusted = load_trusted_keys(pki.ca.cert_path)
    _key, chain = build()
    from datetime import UTC, datetime

    with pytest.raises(ChainError):
        verify_chain(chain, trusted, datetime.now(UTC))
    assert checks <= MAX_SIGNATURE_CHECKS
    # a legitimate chain still verifies with the budget in place
    deep = make_ca(pki.dir, depth=2, name="deep")
    deep_keys = load_trusted_keys(deep.cert_path)
    assert verify_chain(list(deep.chain), deep_keys, datetime.now(UTC)) is not None


def hostile_token(repo: str) -> str:
    key, chain = same_key_tangle()
    token = mint(key, chain, access=pull_access(repo))
    assert len(token) < 8192  # under the size cap: it reaches the chain search
    return token


@pytest.fixture
async def token_node(make_mirror: Any, relay: Any, pki: SimpleNamespace, tmp_path: Path) -> Any:
    auth = {"token": token_block(pki.ca.cert_path, REALM)}
    return await make_mirror(relay.url, config=node_config(tmp_path, relay.url, auth=auth))


async def test_hostile_x5c_tokens_are_refused_while_a_pull_proceeds(
        token_node, upstream, upstream_client, pki) -> None:
    """H-AUTH-02: three hostile requests in flight at all times; a pull alongside completes."""
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1",
                                    layers=(256 * 1024, 256 * 1024, 256 * 1024))
    hostile = [hostile_token(image.repo) for _ in range(6)]
    good = pki.ca.mint(access=pull_access(image.repo))
    durations: list[float] = []
    statuses: list[int] = []
    stop = asyncio.Event()

    async def attacker(client: httpx.AsyncClient, n: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = await client.get(f"/v2/{image.repo}/manifests/v1",
                                        headers=bearer(hostile[n % len(hostile)]))
            durations.append(time.monotonic() - started)
            statuses.append(response.status_code)
            n += 3

    async def pull(client: httpx.AsyncClient) -> float:
        await asyncio.sleep(0.2)  # the attack is under way
        started = time.monotonic()
        headers = {**ACCEPT, **bearer(good)}
        manifest = await client.get(f"/v2/{image.repo}/manifests/v1", headers=headers)
        assert manifest.status_code == 200 and manifest.content == image.manifest
        for digest, data in image.blobs.items():
            blob = await client.get(f"/v2/{image.repo}/blobs/{digest}", headers=headers)
            assert blob.status_code == 200 and blob.content == data
        took = time.monotonic() - started
        stop.set()
        return took

    async with token_node.client() as client:
        attackers = [asyncio.create_task(attacker(client, i)) for i in range(3)]
        pull_took = await pull(client)
        await asyncio.gather(*attackers)
    assert statuses and set(statuses) == {401}
    print(f"H-AUTH-02: {len(statuses)} hostile requests, slowest {max(durations):.3f}s; "
          f"pull alongside {pull_took:.2f}s")
    # The bound is 0.5 s per hostile request (was 2.3 s, and 12-15 s for the pull);
    # the asserted bounds are generous for a loaded 2-core machine, the count bound above is exact.
    assert max(durations) < 2.0
    assert pull_took < 10.0


# --------------------------------------------------------------------------- H-AUTH-03

FWD_REPO = "fwd/locked"


@pytest.fixture
def central(tmp_path: Path, pki: SimpleNamespace) -> Any:
    from tests.support.authenv import Central

    users = {"alice": ("alice-pw", {FWD_REPO: {"pull"}})}
    with Central(tmp_path / "central", pki.ca, users=users) as side:
        yield side


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_tokens(central: Any, count: int) -> dict[str, list[str]]:
    """JWT-shaped tokens nobody issued, claims plausible (right aud, exp ten years out)."""
    import json
    import secrets

    from mirror.auth.access import Access
    from tests.support.authenv import swap_payload

    far = int(time.time()) + 10 * 365 * 86400
    real = central.issuer.mint_for("mallory", [Access.of("repository", "fwd/elsewhere", "pull")])
    header = real.split(".")[0]
    claims = {"iss": "caas-issuer", "aud": "caas-registry", "sub": "alice", "exp": far,
              "access": [{"type": "repository", "name": FWD_REPO, "actions": ["pull"]}]}

    def payload(n: int) -> str:
        return _b64url(json.dumps({**claims, "jti": f"forged-{n}"}).encode())

    kid_header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "AAAA:BBBB"}).encode())
    third = count // 4
    return {
        "edited claims": [swap_payload(real, access=claims["access"], exp=far, jti=f"e-{n}")
                          for n in range(count - 3 * third)],
        "made-up signature": [f"{header}.{payload(n)}.{_b64url(secrets.token_bytes(256))}"
                              for n in range(third)],
        "no key header": [f"{kid_header}.{payload(n)}.{_b64url(secrets.token_bytes(256))}"
                          for n in range(third)],
        "garbage": [f"{_b64url(secrets.token_bytes(30))}.{payload(n)}.{_b64url(secrets.token_bytes(64))}"
                    for n in range(third)],
    }


async def test_forged_tokens_cannot_lock_forward_mode_out(make_mirror, central, tmp_path) -> None:
    """H-AUTH-03: unverified tokens never spend the budget valid ones need."""
    from mirror.auth.access import Access
    from mirror.auth.forward import HEAD_BURST, HEADS_PER_SECOND
    from tests.support.relay import run_relay

    async with httpx.AsyncClient(timeout=30) as seed:
        image = await images.push_image(seed, central.registry.url, FWD_REPO, "v1",
                                        headers=bearer(central.admin_token(FWD_REPO)))
    with run_relay(central.registry.url) as link:
        node = await make_mirror(link.url, config=node_config(tmp_path, link.url,
                                                              mirror_auth={"mode": "forward"}))
        forged = forged_tokens(central, 200)
        url = f"/v2/{FWD_REPO}/manifests/v1"
        started = time.monotonic()
        async with node.client(headers=ACCEPT) as client:
            answers = {kind: await asyncio.gather(*(client.get(url, headers=bearer(t)) for t in tokens))
                       for kind, tokens in forged.items()}
            valid = [central.issuer.mint_for("alice", [Access.of("repository", FWD_REPO, "pull")])
                     for _ in range(20)]
            pulls = await asyncio.gather(*(client.get(url, headers=bearer(t)) for t in valid))
        elapsed = time.monotonic() - started
        heads = link.count("HEAD")
    statuses = {kind: sorted({r.status_code for r in got}) for kind, got in answers.items()}
    print(f"H-AUTH-03: {statuses}, valid {sorted({r.status_code for r in pulls})}, "
          f"{heads} HEADs upstream in {elapsed:.1f}s")
    assert sum(map(len, forged.values())) == 200
    for kind in ("edited claims", "made-up signature", "garbage"):
        assert statuses[kind] == [401], kind  # refused here: no HEAD, no budget
    assert set(statuses["no key header"]) <= {401, 429}  # judged upstream within the small budget
    assert all(image.manifest not in r.content for got in answers.values() for r in got)
    assert [r.status_code for r in pulls] == [200] * 20
    assert all(r.content == image.manifest for r in pulls)
    assert heads <= HEAD_BURST + HEADS_PER_SECOND * elapsed + len(valid) + 1


# --------------------------------------------------------------------------- H-ADMIN

ADMIN = "admin-secret"
NOTIFY = "notify-secret"
ENVELOPE = b'{"events": []}'


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def admin_answers(node: Any, token: str | None) -> dict[str, int]:
    """Status of notify, du and gc on the node's admin listener, with `token` (or none)."""
    runner, url = await serve_app(create_debug_app(node.node))
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as client:
            return {
                "notify": (await client.post("/admin/notify", content=ENVELOPE)).status_code,
                "du": (await client.get("/admin/du")).status_code,
                "gc": (await client.post("/admin/gc", json={})).status_code,
            }
    finally:
        await runner.cleanup()


async def test_notify_and_admin_tokens_open_only_their_own_routes(make_mirror, relay) -> None:
    """H-ADMIN-01: a registry's notification config can never purge or gc the node."""
    node = await make_mirror(relay.url, admin={"token": ADMIN}, notify={"token": NOTIFY})
    with_notify = await admin_answers(node, NOTIFY)
    with_admin = await admin_answers(node, ADMIN)
    with_none = await admin_answers(node, None)
    assert with_notify["notify"] == 200 and with_notify["du"] == with_notify["gc"] == 401
    assert with_admin["notify"] == 401 and with_admin["du"] == 200
    assert set(with_none.values()) == {401}


async def test_forwarding_carries_the_notify_token_never_the_admin_token(make_mirror, relay,
                                                                         tmp_path) -> None:
    """H-ADMIN-02: what an edge zone receives authorizes notifications, nothing else."""
    received: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        received.append(request.headers.get("Authorization"))
        return web.json_response({})

    edge = web.Application()
    edge.router.add_post("/admin/notify", record)
    edge_runner, edge_url = await serve_app(edge)
    try:
        zone = await make_mirror(relay.url, admin={"token": ADMIN}, notify={
            "token": NOTIFY, "forward_to": [f"{edge_url}/admin/notify"],
            "allow_insecure_forward": True})
        runner, url = await serve_app(create_debug_app(zone.node))
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                sent = await client.post("/admin/notify", content=ENVELOPE,
                                         headers={"Authorization": f"Bearer {NOTIFY}"})
            assert sent.status_code == 200
            deadline = time.monotonic() + 15
            while not received:
                assert time.monotonic() < deadline, "envelope not forwarded"
                await asyncio.sleep(0.05)
        finally:
            await runner.cleanup()
    finally:
        await edge_runner.cleanup()
    assert received == [f"Bearer {NOTIFY}"]


@pytest.mark.parametrize(("mirror", "key"), [
    ({"notify": {"forward_to": ["http://edge.example:5001/admin/notify"]}}, "mirror.notify.forward_to[0]"),
    ({"notify": {"forward_to": ["https://a.example/admin/notify", "HTTP://b.example/admin/notify"]}},
     "mirror.notify.forward_to[1]"),
    ({"admin": {"token": "same"}, "notify": {"token": "same"}}, "mirror.notify.token"),
])
def test_unsafe_notify_settings_refuse_to_start(tmp_path, mirror, key) -> None:
    """H-ADMIN-02: plain http forwarding and a shared secret are refused, naming the key."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"version": 0.1, "mirror": mirror}))
    with pytest.raises(ConfigError) as refused:
        load_settings(path, {})
    assert str(refused.value).startswith(f"config: {key}:")
    mirror["notify"]["allow_insecure_forward"] = True
    path.write_text(yaml.safe_dump({"version": 0.1, "mirror": mirror}))
    if key.startswith("mirror.notify.forward_to"):
        assert load_settings(path, {}).mirror.notify.allow_insecure_forward is True


async def test_untrusted_loopback_needs_the_token(make_mirror, relay) -> None:
    """H-ADMIN-03: with trust_loopback false, loopback is nobody special."""
    closed = await make_mirror(relay.url, admin={"trust_loopback": False})
    assert set((await admin_answers(closed, None)).values()) == {403}
    trusted = await make_mirror(relay.url)  # the default: loopback without a token is trusted
    assert (await admin_answers(trusted, None))["du"] == 200
    guarded = await make_mirror(relay.url, admin={"trust_loopback": False, "token": ADMIN})
    assert (await admin_answers(guarded, None))["du"] == 401
    assert (await admin_answers(guarded, ADMIN))["du"] == 200


def test_daemonset_does_not_trust_the_hosts_loopback(tmp_path) -> None:
    """H-ADMIN-03: the DaemonSet (hostNetwork) sets trust_loopback false and the token from a Secret."""
    docs = [d for d in yaml.safe_load_all(
        (Path(__file__).parent.parent / "deploy/kubernetes/daemonset.yaml").read_text()) if d]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    path = tmp_path / "config.yml"
    path.write_text(configmap["data"]["config.yml"])
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert load_settings(path, {}).mirror.admin.trust_loopback is False
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert "secretKeyRef" in env["REGISTRY_MIRROR_ADMIN_TOKEN"]["valueFrom"]
    with_token = load_settings(path, {"REGISTRY_MIRROR_ADMIN_TOKEN": "s3cret"}).mirror.admin
    assert (with_token.token, with_token.trust_loopback) == ("s3cret", False)


# --------------------------------------------------------------------------- H-CONF


def _client_ca_and_cert(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A client CA and a client certificate it issued (what an mTLS deployment hands out):
    (ca.pem, client.pem, client-key.pem)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} client CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       **usage), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    client = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} host")]))
              .issuer_name(ca_name).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                           crl_sign=False, **usage), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "client.pem", directory / "client-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _tls_get(port: int, server_ca: Path, client: tuple[Path, Path] | None) -> int | str:
    """GET /v2/ over a real TLS connection: the status, or the failure's class name."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(server_ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = tls.recv(64)  # TLS 1.3 reports a refused client certificate here
            return int(head.split()[1]) if head else "EOF"
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__


def test_client_cas_require_a_client_certificate(upstream, tmp_path) -> None:
    """H-CONF-01: an mTLS deployment never serves a client without a certificate of its CA."""
    from tests.support.nginx import make_tls

    server = make_tls(tmp_path / "server")
    ca, cert, key = _client_ca_and_cert(tmp_path / "clients", "zone")
    _other_ca, other_cert, other_key = _client_ca_and_cert(tmp_path / "rogue", "rogue")
    config = mirror_config(tmp_path, upstream.url)
    config["http"]["tls"] = {"certificate": str(server.cert), "key": str(server.key),
                             "clientcas": [str(ca)]}
    process, url = serve(tmp_path, config)
    port = int(url.rsplit(":", 1)[1])
    with process:
        deadline = time.monotonic() + 20
        while (served := _tls_get(port, server.ca, (cert, key))) != 200:
            assert process.poll() is None, process.log_tail()
            assert time.monotonic() < deadline, served
            time.sleep(0.1)
        without = _tls_get(port, server.ca, None)
        rogue = _tls_get(port, server.ca, (other_cert, other_key))
    print(f"H-CONF-01: with the zone's certificate {served}, without {without}, rogue CA {rogue}")
    assert served == 200
    assert without not in (200, 401) and rogue not in (200, 401), (without, rogue)


REFUSED = {
    "ciphersuites": ("http: {tls: {certificate: /c.pem, key: /k.pem, "
                     "ciphersuites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]}}", "http.tls.ciphersuites"),
    "letsencrypt": ("http: {tls: {letsencrypt: {cachefile: /le.json, email: a@b.c}}}",
                    "http.tls.letsencrypt"),
    "silly": ("auth: {silly: {realm: r, service: s}}", "auth.silly"),
    "jwks-refresh": ("auth: {token: {realm: r, service: s, issuer: i, jwks: /j.json, "
                     "jwksrefreshinterval: 1h}}", "auth.token.jwksrefreshinterval"),
    "tls-typo": ("http: {tls: {certificate: /c.pem, key: /k.pem, clientca: [/ca.pem]}}",
                 "http.tls.clientca"),
    "token-typo": ("auth: {token: {realm: r, service: s, issuer: i, rootcertbundle: /r.pem, "
                   "signingalgorithm: [RS256]}}", "auth.token.signingalgorithm"),
    "clientcas-without-tls": ("http: {tls: {clientcas: [/ca.pem]}}", "http.tls.clientcas"),
    "unverified-clientauth": ("http: {tls: {certificate: /c.pem, key: /k.pem, clientcas: [/ca.pem], "
                              "clientauth: require-any-client-cert}}", "http.tls.clientauth"),
    "autoredirect-and-relay": ("auth: {token: {realm: r, service: s, issuer: i, rootcertbundle: "
                               "/r.pem, autoredirect: true}}\nmirror: {auth: {token_proxy: true}}",
                               "auth.token.autoredirect"),
    "readonly-relaying-pushes": ("storage: {maintenance: {readonly: {enabled: true}}}\n"
                                 "mirror: {passthrough_writes: true}",
                                 "storage.maintenance.readonly.enabled"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_keys_that_cannot_be_honoured_refuse_the_start(tmp_path, case) -> None:
    """H-CONF-02: never silently weaker than the config reads."""
    text, key = REFUSED[case]
    path = tmp_path / "config.yml"
    path.write_text(f"version: 0.1\n{text}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(path, {})
    assert str(refused.value).startswith(f"config: {key}:"), str(refused.value)


@pytest.mark.parametrize(("env", "key"), [
    ({"REGISTRY_HTTP_TLS_CLIENTCA": "/ca.pem"}, "env:REGISTRY_HTTP_TLS_CLIENTCA"),
    ({"REGISTRY_AUTH_SILLY_REALM": "r"}, "auth.silly"),
    ({"REGISTRY_HTTP_TLS_LETSENCRYPT_CACHEFILE": "/le.json"}, "http.tls.letsencrypt"),
])
def test_environment_overrides_are_refused_alike(env, key) -> None:
    """H-CONF-02: a REGISTRY_* variable is no way around the refusal."""
    with pytest.raises(ConfigError) as refused:
        load_settings(None, env)
    assert str(refused.value).startswith(f"config: {key}:"), str(refused.value)


def test_a_refused_key_is_one_line_and_exit_2(tmp_path) -> None:
    """H-CONF-02: as `mirror serve` reports it."""
    import subprocess

    path = tmp_path / "config.yml"
    path.write_text("version: 0.1\nauth: {silly: {realm: r, service: s}}\n")
    result = subprocess.run([sys.executable, "-m", "mirror", "serve", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth.silly" in lines[0] and "Traceback" not in result.stderr


async def test_autoredirect_realm_and_configured_headers(make_mirror, relay, pki, tmp_path) -> None:
    """H-CONF-03: what was a silent no-op is honoured."""
    block = {**token_block(pki.ca.cert_path, REALM), "autoredirect": True}
    config = node_config(tmp_path, relay.url, auth={"token": block})
    config["http"]["headers"] = {"X-Content-Type-Options": ["nosniff"],
                                 "Strict-Transport-Security": ["max-age=31536000"]}
    node = await make_mirror(relay.url, config=config)
    async with node.client() as client:
        default = await client.get("/v2/")
    assert default.status_code == 401
    assert f'realm="http://{node.host}/auth/token"' in default.headers["WWW-Authenticate"]
    assert default.headers["X-Content-Type-Options"] == "nosniff"
    assert default.headers["Strict-Transport-Security"] == "max-age=31536000"
    config["http"]["host"] = "https://zone-node.example"
    config["auth"]["token"]["autoredirectpath"] = "/central/token"
    other = await make_mirror(relay.url, config=config)
    async with other.client() as client:
        hosted = await client.get("/v2/team/app/manifests/v1")
    assert 'realm="https://zone-node.example/central/token"' in hosted.headers["WWW-Authenticate"]
    assert hosted.headers["X-Content-Type-Options"] == "nosniff"


# --------------------------------------------------------------------------- R-RELOAD


def serve(tmp_path: Path, config: dict[str, Any]) -> tuple[ManagedProcess, str]:
    """`mirror serve` on a config, as systemd runs it; returns (process, base URL)."""
    port = free_port()
    config["http"]["addr"] = f"127.0.0.1:{port}"
    config["mirror"].setdefault("workers", 1)  # one process: a reload is seen by the next request
    path = tmp_path / f"config-{port}.yml"
    path.write_text(yaml.safe_dump(config))
    process = ManagedProcess([sys.executable, "-m", "mirror", "serve", str(path)],
                             log_dir=tmp_path, name=f"mirror-{port}")
    return process, f"http://127.0.0.1:{port}"


def wait_for_log(process: ManagedProcess, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log_text():
        assert process.poll() is None, f"node exited: {process.log_tail()}"
        assert time.monotonic() < deadline, f"no {text!r} in: {process.log_tail()}"
        time.sleep(0.05)


async def test_sighup_without_token_auth_keeps_serving(upstream, upstream_client, tmp_path) -> None:
    """R-RELOAD-01: `systemctl reload` no longer takes a node without auth.token down."""
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    process, url = serve(tmp_path, mirror_config(tmp_path, upstream.url))
    with process:
        wait_http(f"{url}/v2/", process=process, timeout=20)
        for _ in range(2):
            process.signal(signal.SIGHUP)
            wait_for_log(process, "SIGHUP: nothing to reload")
        assert process.poll() is None
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=ACCEPT) as client:
            response = await client.get(f"/v2/{image.repo}/manifests/v1")
        assert response.status_code == 200 and response.content == image.manifest
        assert process.stop(timeout=15) == 0


def _htpasswd_line(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"


async def test_sighup_rereads_htpasswd_and_survives_a_broken_file(upstream, tmp_path) -> None:
    """R-RELOAD-02: SIGHUP reloads htpasswd; a broken file keeps the old entries."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(_htpasswd_line("alice", "alice-pw"))
    config = mirror_config(tmp_path, upstream.url)
    config["auth"] = {"htpasswd": {"realm": "zone", "path": str(htpasswd)}}
    process, url = serve(tmp_path, config)
    with process, httpx.Client(base_url=url, timeout=30) as client:
        wait_http(f"{url}/v2/", process=process, timeout=20, expect_status=401)
        bob = {"Authorization": basic("bob", "bob-pw")}
        alice = {"Authorization": basic("alice", "alice-pw")}
        assert client.get("/v2/", headers=bob).status_code == 401
        seen = htpasswd.stat()
        htpasswd.write_text(_htpasswd_line("bob", "bob-pw"))
        os.utime(htpasswd, ns=(seen.st_atime_ns, seen.st_mtime_ns))  # unchanged mtime: only SIGHUP
        process.signal(signal.SIGHUP)
        wait_for_log(process, "htpasswd reloaded")
        assert client.get("/v2/", headers=bob).status_code == 200
        htpasswd.write_text("not an htpasswd line\n")
        process.signal(signal.SIGHUP)
        wait_for_log(process, "SIGHUP: reload failed, keeping the old state")
        assert process.poll() is None
        assert client.get("/v2/", headers=bob).status_code == 200
        assert client.get("/v2/", headers=alice).status_code == 401
        assert process.stop(timeout=15) == 0


def test_case_table_is_complete() -> None:
    """Every case ID of the table is named by a test of this module."""
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f"{case_id}:") >= 1 and source.count(case_id) >= 2, case_id
