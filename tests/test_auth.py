"""Client auth through the node: `auth.token` validated locally and `auth.htpasswd`.

The reference for every 401 is distribution 2.8 itself, configured with the
same `auth.token` block: the node must answer exactly as the central registry
does, and an unauthorized caller must learn nothing and cost no upstream GET.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bcrypt
import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.support import images
from tests.support.authenv import (
    Central,
    basic,
    bearer,
    challenge_params,
    error_body,
    flip_signature,
    node_config,
    pull_access,
    swap_payload,
    token_block,
)
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import run_skopeo_async
from tests.support.registry import run_registry
from tests.support.relay import run_relay
from tests.support.token_issuer import SERVICE, TokenIssuer, make_ca

REALM = "https://auth.example.test/token"
ACCEPT = {"Accept": DOCKER_SCHEMA2}
API_VERSION = "registry/2.0"
MiB = 1024 * 1024
ZERO_DIGEST = "sha256:" + "0" * 64


def repo_name(prefix: str = "auth") -> str:
    return f"{prefix}/app-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Signing identities, generated once: the trusted one and impostors."""
    d = tmp_path_factory.mktemp("pki")
    return SimpleNamespace(
        ca=make_ca(d, name="central"),
        rogue=make_ca(d, name="rogue"),  # self-signed, never trusted
        rogue_chain=make_ca(d, depth=1, name="rogue-chain"),  # a chain to an untrusted root
        rotated=make_ca(d, name="rotated"),  # the CA a SIGHUP reload switches to
    )


@pytest.fixture(scope="module")
def central_registry(tmp_path_factory: pytest.TempPathFactory, pki: SimpleNamespace):
    """distribution 2.8 with the nodes' own auth.token block: the expected answers."""
    block = token_block(pki.ca.cert_path, REALM)
    with run_registry(tmp_path_factory.mktemp("central"), auth_token=block) as registry:
        yield registry


@pytest.fixture
async def node(make_mirror: Any, relay: Any, pki: SimpleNamespace, tmp_path: Path) -> Any:
    """A node validating tokens locally, in front of the (open) shared upstream."""
    auth = {"token": token_block(pki.ca.cert_path, REALM)}
    return await make_mirror(relay.url, config=node_config(tmp_path, relay.url, auth=auth))


def pull_token(pki: SimpleNamespace, *repos: str, actions: tuple[str, ...] = ("pull",)) -> str:
    return pki.ca.mint(access=[("repository", r, list(actions)) for r in repos])


async def cache_image(node: Any, pki: SimpleNamespace, image: images.Image) -> None:
    """Pull an image through the node with a good token, so it is cached."""
    async with node.client(headers={**ACCEPT, **bearer(pull_token(pki, image.repo))}) as client:
        response = await client.get(f"/v2/{image.repo}/manifests/{image.tag}")
        assert response.status_code == 200 and response.content == image.manifest
        for digest, data in image.blobs.items():
            response = await client.get(f"/v2/{image.repo}/blobs/{digest}")
            assert response.status_code == 200 and response.content == data


def answer(response: httpx.Response, repo: str | None = None) -> tuple[Any, ...]:
    """What a client learns from a refusal, the repository name masked out."""
    def mask(text: Any) -> Any:
        return text.replace(repo, "<repo>") if repo and isinstance(text, str) else text

    refused = response.status_code >= 400 and response.request.method != "HEAD"
    body = error_body(response) if refused else None
    if body is not None:
        body = (body[0], tuple(tuple(sorted((k, mask(v)) for k, v in d.items())) for d in body[1])
                if body[1] else None)
    return (response.status_code, mask(response.headers.get("WWW-Authenticate")), body,
            response.headers.get("Docker-Distribution-API-Version"))


# --------------------------------------------------------------------------- 1. challenge


@pytest.mark.parametrize("path", [
    "/v2/", "/v2/_catalog", "/v2/{repo}/manifests/v1", "/v2/{repo}/manifests/{digest}",
    "/v2/{repo}/blobs/{digest}", "/v2/{repo}/tags/list",
])
async def test_challenge_is_the_central_registrys(node, central_registry, relay, pki, path) -> None:
    repo = repo_name()
    target = path.format(repo=repo, digest=ZERO_DIGEST)
    tokens = {
        "none": None,
        "garbage": "not-a-token",
        "other repository": pull_token(pki, "someone/else"),
    }
    mismatches = []
    async with node.client() as ours, httpx.AsyncClient(base_url=central_registry.url) as theirs:
        for method in ("GET", "HEAD"):
            for kind, token in tokens.items():
                headers = bearer(token) if token else {}
                got = await ours.request(method, target, headers=headers)
                want = await theirs.request(method, target, headers=headers)
                if answer(got) != answer(want):
                    mismatches.append((method, kind, answer(got), answer(want)))
                if got.status_code == 401:
                    scheme, params = challenge_params(got.headers["WWW-Authenticate"])
                    assert scheme == "bearer" and params["realm"] == REALM
                    assert params["service"] == SERVICE
                    assert got.headers["Content-Type"].startswith("application/json")
    assert mismatches == []
    assert relay.count("GET", "/manifests/") + relay.count("GET", "/blobs/") == 0


async def test_refusal_does_not_tell_whether_content_exists(node, relay, upstream, upstream_client,
                                                           pki) -> None:
    cached = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    uncached = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    await cache_image(node, pki, cached)
    probes = []
    for image in (cached, uncached):
        probes += [
            (image.repo, f"/v2/{image.repo}/manifests/v1"),
            (image.repo, f"/v2/{image.repo}/manifests/{image.digest}"),
            (image.repo, f"/v2/{image.repo}/blobs/{image.layer_digests[0]}"),
            (image.repo, f"/v2/{image.repo}/tags/list"),
        ]
    ghost = repo_name("ghost")
    probes += [
        (cached.repo, f"/v2/{cached.repo}/manifests/nope"),
        (cached.repo, f"/v2/{cached.repo}/manifests/{ZERO_DIGEST}"),
        (cached.repo, f"/v2/{cached.repo}/blobs/{ZERO_DIGEST}"),
        (ghost, f"/v2/{ghost}/manifests/v1"),
        (ghost, f"/v2/{ghost}/blobs/{cached.layer_digests[0]}"),
    ]
    relay.reset()
    tokens = {"none": None, "garbage": "x.y.z", "other": pull_token(pki, "someone/else")}
    async with node.client(headers=ACCEPT) as client:
        for method in ("GET", "HEAD"):
            for kind, token in tokens.items():
                seen: dict[str, set[Any]] = {}
                for repo, path in probes:
                    response = await client.request(method, path, headers=bearer(token) if token else {})
                    assert response.status_code == 401, (method, kind, path)
                    seen.setdefault(path.split("/")[-2], set()).add(answer(response, repo))
                # one answer per kind of route, whatever exists
                assert {route: len(answers) for route, answers in seen.items()} == {
                    "manifests": 1, "blobs": 1, "tags": 1}, (method, kind, seen)
    assert relay.requests == []


# --------------------------------------------------------------------------- 2. local validation


def _public_pem(pki: SimpleNamespace) -> bytes:
    return pki.ca.public_key.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


BROKEN_TOKENS = {
    "expired": (lambda p, r: p.ca.mint(access=pull_access(r), exp_delta=-300, iat_delta=-600),
                "invalid_token"),
    "nbf-in-the-future": (lambda p, r: p.ca.mint(access=pull_access(r), nbf_delta=600),
                          "invalid_token"),
    "wrong-issuer": (lambda p, r: p.ca.mint(access=pull_access(r), issuer="evil-issuer"),
                     "invalid_token"),
    "wrong-audience": (lambda p, r: p.ca.mint(access=pull_access(r), audience="other-registry"),
                       "invalid_token"),
    "tampered-signature": (lambda p, r: flip_signature(p.ca.mint(access=pull_access(r))),
                           "invalid_token"),
    "forged-claims": (lambda p, r: swap_payload(
        p.ca.mint(access=pull_access("someone/else")),
        access=[{"type": "repository", "name": r, "actions": ["pull"]}]), "invalid_token"),
    "untrusted-self-signed": (lambda p, r: p.rogue.mint(access=pull_access(r)), "invalid_token"),
    "untrusted-chain": (lambda p, r: p.rogue_chain.mint(access=pull_access(r)), "invalid_token"),
    "alg-none": (lambda p, r: p.ca.mint(access=pull_access(r), alg="none"), "invalid_token"),
    "hs256-public-key-as-secret": (lambda p, r: p.ca.mint(
        access=pull_access(r), alg="HS256", hmac_secret=_public_pem(p)), "invalid_token"),
    "untrusted-embedded-jwk": (lambda p, r: p.rogue.mint(access=pull_access(r), header_mode="jwk"),
                               "invalid_token"),
    "missing-exp": (lambda p, r: p.ca.mint(access=pull_access(r), drop_claims=["exp"]),
                    "invalid_token"),
    "missing-access": (lambda p, r: p.ca.mint(access=None), "insufficient_scope"),
    "empty-access": (lambda p, r: p.ca.mint(access=[]), "insufficient_scope"),
    "wrong-repository": (lambda p, r: p.ca.mint(access=pull_access(r + "-other")),
                         "insufficient_scope"),
    "wrong-type": (lambda p, r: p.ca.mint(access=[("namespace", r, ["pull"])]),
                   "insufficient_scope"),
    "push-only": (lambda p, r: p.ca.mint(access=pull_access(r, "push")), "insufficient_scope"),
}


@pytest.mark.parametrize("case", list(BROKEN_TOKENS))
async def test_broken_token_is_refused_and_serves_nothing(node, central_registry, relay, upstream,
                                                          upstream_client, pki, case) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    await cache_image(node, pki, image)
    build, error = BROKEN_TOKENS[case]
    token = build(pki, image.repo)
    relay.reset()
    paths = [f"/v2/{image.repo}/manifests/v1", f"/v2/{image.repo}/manifests/{image.digest}",
             f"/v2/{image.repo}/blobs/{image.layer_digests[0]}"]
    async with node.client(headers={**ACCEPT, **bearer(token)}) as ours, \
            httpx.AsyncClient(base_url=central_registry.url, headers=bearer(token)) as theirs:
        for method in ("GET", "HEAD"):
            for path in paths:
                got = await ours.request(method, path)
                want = await theirs.request(method, path)
                assert got.status_code == 401, (method, path, got.status_code)
                assert challenge_params(got.headers["WWW-Authenticate"])[1].get("error") == error
                assert got.headers["WWW-Authenticate"] == want.headers["WWW-Authenticate"]
                assert "Docker-Content-Digest" not in got.headers
                if method == "GET":
                    assert error_body(got)[0] == "UNAUTHORIZED"
                    assert image.manifest not in got.content
                else:
                    assert got.content == b""
    assert relay.requests == []


GOOD_TOKENS = {  # name: (token, distribution 2.8 accepts it too)
    "x5c": (lambda p, r: p.ca.mint(access=pull_access(r)), True),
    "kid": (lambda p, r: p.ca.mint(access=pull_access(r), header_mode="kid"), True),
    "trusted-embedded-jwk": (lambda p, r: p.ca.mint(access=pull_access(r), header_mode="jwk"), True),
    "wildcard-action": (lambda p, r: p.ca.mint(access=[("repository", r, ["*"])]), True),
    "expired-within-leeway": (lambda p, r: p.ca.mint(access=pull_access(r), exp_delta=-20,
                                                     iat_delta=-320), True),
    # deliberate (tests/test_token.py): distribution 3 forms, refused by 2.8
    "audience-list": (lambda p, r: p.ca.mint(access=pull_access(r), audience=["other", SERVICE]),
                      False),
}


@pytest.mark.parametrize("case", list(GOOD_TOKENS))
async def test_good_token_pulls(node, central_registry, upstream, upstream_client, pki, case) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    build, central_agrees = GOOD_TOKENS[case]
    token = build(pki, image.repo)
    async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
        response = await client.get(f"/v2/{image.repo}/manifests/v1")
        head = await client.head(f"/v2/{image.repo}/blobs/{image.layer_digests[0]}")
    async with httpx.AsyncClient(base_url=central_registry.url, headers=bearer(token)) as central:
        reference = await central.get(f"/v2/{image.repo}/manifests/v1")
    # authorized there too (it just holds nothing)
    assert reference.status_code == (404 if central_agrees else 401)
    assert response.status_code == 200 and response.content == image.manifest
    assert head.status_code == 200


async def test_catalog_needs_the_catalog_scope_then_lists_everything(node, upstream, upstream_client,
                                                                    pki) -> None:
    first = await images.push_image(upstream_client, upstream.url, repo_name("cat"), "v1")
    second = await images.push_image(upstream_client, upstream.url, repo_name("cat"), "v1")
    await cache_image(node, pki, first)
    await cache_image(node, pki, second)
    repo_only = pull_token(pki, first.repo, second.repo)
    catalog_only = pki.ca.mint(access=[("registry", "catalog", ["*"])])
    async with node.client() as client:
        refused = await client.get("/v2/_catalog", headers=bearer(repo_only))
        listed = await client.get("/v2/_catalog", headers=bearer(catalog_only))
        not_a_pull = await client.get(f"/v2/{first.repo}/manifests/v1", headers=bearer(catalog_only))
    assert refused.status_code == 401
    params = challenge_params(refused.headers["WWW-Authenticate"])[1]
    assert (params["scope"], params["error"]) == ("registry:catalog:*", "insufficient_scope")
    assert listed.status_code == 200
    assert {first.repo, second.repo} <= set(listed.json()["repositories"])
    assert not_a_pull.status_code == 401


async def test_sighup_reloads_the_root_cert_bundle(make_mirror, relay, upstream, upstream_client, pki,
                                                   tmp_path) -> None:
    bundle = tmp_path / "bundle.pem"
    shutil.copyfile(pki.ca.cert_path, bundle)
    node = await make_mirror(relay.url, config=node_config(
        tmp_path, relay.url, auth={"token": token_block(bundle, REALM)}))
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    old = pki.ca.mint(access=pull_access(image.repo))
    new = pki.rotated.mint(access=pull_access(image.repo))
    url = f"/v2/{image.repo}/manifests/v1"
    async with node.client(headers=ACCEPT) as client:
        assert (await client.get(url, headers=bearer(old))).status_code == 200
        assert (await client.get(url, headers=bearer(new))).status_code == 401

        shutil.copyfile(pki.rotated.cert_path, bundle)
        handler = signal.getsignal(signal.SIGHUP)
        # never send SIGHUP without a handler in place: the default action kills pytest
        assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), "node installed no SIGHUP handler"
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):  # at least 20 s for the reload to land
            accepted = await client.get(url, headers=bearer(new))
            if accepted.status_code == 200:
                break
            await asyncio.sleep(0.02)
        refused = await client.get(url, headers=bearer(old))
    assert accepted.status_code == 200 and accepted.content == image.manifest
    assert refused.status_code == 401
    assert challenge_params(refused.headers["WWW-Authenticate"])[1]["error"] == "invalid_token"


async def test_reload_with_a_broken_bundle_keeps_the_old_keys(make_mirror, relay, upstream,
                                                              upstream_client, pki, tmp_path) -> None:
    bundle = tmp_path / "bundle.pem"
    shutil.copyfile(pki.ca.cert_path, bundle)
    node = await make_mirror(relay.url, config=node_config(
        tmp_path, relay.url, auth={"token": token_block(bundle, REALM)}))
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    bundle.write_text("not a certificate\n")
    node.node.access.reload()
    async with node.client(headers={**ACCEPT, **bearer(pull_token(pki, image.repo))}) as client:
        assert (await client.get(f"/v2/{image.repo}/manifests/v1")).status_code == 200


# --------------------------------------------------------------------------- 3. cache privacy


async def test_digest_of_another_repository_is_not_served(node, relay, upstream, upstream_client,
                                                          pki) -> None:
    secret = await images.push_image(upstream_client, upstream.url, repo_name("secret"), "v1")
    mine = await images.push_image(upstream_client, upstream.url, repo_name("mine"), "v1")
    await cache_image(node, pki, secret)  # another user pulled it: now in the store
    relay.reset()
    digests = [secret.digest, *secret.blobs]
    async with node.client(headers={**ACCEPT, **bearer(pull_token(pki, mine.repo))}) as client:
        for digest in digests:
            kind = "manifests" if digest == secret.digest else "blobs"
            for method in ("GET", "HEAD"):
                theirs = await client.request(method, f"/v2/{secret.repo}/{kind}/{digest}")
                assert theirs.status_code == 401, (method, kind)
                ours = await client.request(method, f"/v2/{mine.repo}/{kind}/{digest}")
                assert ours.status_code == 404, (method, kind, ours.status_code)
                assert "Docker-Content-Digest" not in ours.headers
                if method == "GET":
                    unknown = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
                    assert error_body(ours)[0] == unknown
                    assert ours.content not in (secret.manifest, *secret.blobs.values())
    # the node asked upstream about `mine` only, never fetched the secret repository
    assert all(secret.repo not in path for _, path, _, _ in relay.requests)
    assert relay.count("GET", "/blobs/", status=200) == 0


async def test_joining_another_repositorys_fetch_in_flight_is_refused(node, relay, upstream,
                                                                      upstream_client, pki) -> None:
    layer = images.make_layer("privacy-in-flight", 6 * MiB)
    secret = await images.push_image(upstream_client, upstream.url, repo_name("secret"), "v1",
                                     layers=[layer])
    other = await images.push_image(upstream_client, upstream.url, repo_name("other"), "v1")
    digest = secret.layer_digests[0]
    relay.rate = len(layer) / 3  # the owner's fetch lasts about 3 s
    owner = node.client(headers=bearer(pull_token(pki, secret.repo)))
    intruder = node.client(headers=bearer(pull_token(pki, other.repo)))
    async with owner, intruder:
        fetch = asyncio.create_task(owner.get(f"/v2/{secret.repo}/blobs/{digest}"))
        await relay.wait_for_async(1, "GET", f"/blobs/{digest}")
        await asyncio.sleep(0.3)  # bytes are flowing into the store
        joined_get = await intruder.get(f"/v2/{other.repo}/blobs/{digest}")
        joined_head = await intruder.head(f"/v2/{other.repo}/blobs/{digest}")
        direct = await intruder.get(f"/v2/{secret.repo}/blobs/{digest}")
        still_running = not fetch.done()
        owned = await fetch
    assert still_running
    assert owned.status_code == 200 and owned.content == layer
    assert joined_get.status_code == 404 and error_body(joined_get)[0] == "BLOB_UNKNOWN"
    assert len(joined_get.content) < 1024
    assert joined_head.status_code == 404
    assert direct.status_code == 401 and len(direct.content) < 1024
    assert relay.count("GET", "/blobs/") == 1


# --------------------------------------------------------------------------- 4. upstream with token auth


async def _issued(issuer_url: str, user: str, password: str, service: str, scope: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(issuer_url, params={"service": service, "scope": scope},
                                    headers={"Authorization": basic(user, password)})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


async def test_client_token_is_passed_to_an_upstream_of_the_same_service(make_mirror, pki,
                                                                         tmp_path) -> None:
    repo = repo_name("central")
    users = {"alice": ("alice-pw", {repo: {"pull"}})}
    with Central(tmp_path, pki.ca, users=users) as central, run_relay(central.registry.url) as link:
        async with httpx.AsyncClient(timeout=30) as seed:
            image = await images.push_image(seed, central.registry.url, repo, "v1",
                                            headers=bearer(central.admin_token(repo)))
        node = await make_mirror(link.url, config=node_config(
            tmp_path, link.url, auth={"token": central.token_block}))
        token = await _issued(central.issuer.url, "alice", "alice-pw", SERVICE, f"repository:{repo}:pull")
        async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
            manifest = await client.get(f"/v2/{repo}/manifests/v1")
            blobs = {d: (await client.get(f"/v2/{repo}/blobs/{d}")).content for d in image.blobs}
        fetches = [r for r in link.records if "/manifests/" in r.path_qs or "/blobs/" in r.path_qs]
        issued = central.issuer.requests
    assert manifest.status_code == 200 and manifest.content == image.manifest
    assert blobs == image.blobs
    assert fetches and all(r.request_headers.get("Authorization") == f"Bearer {token}" for r in fetches)
    assert all(r.status == 200 for r in fetches)
    assert issued == 1  # alice's own token request; the node asked for none of its own


async def test_node_credentials_serve_an_upstream_of_another_service(make_mirror, pki,
                                                                     tmp_path) -> None:
    repo = repo_name("central")
    users = {"mirror-bot": ("bot-pw", {repo: {"pull"}})}
    with Central(tmp_path, pki.ca, users=users, service="upstream-registry") as central, \
            run_relay(central.registry.url) as link:
        async with httpx.AsyncClient(timeout=30) as seed:
            image = await images.push_image(seed, central.registry.url, repo, "v1",
                                            headers=bearer(central.admin_token(repo)))
        node = await make_mirror(link.url, config=node_config(
            tmp_path, link.url, auth={"token": token_block(pki.ca.cert_path, REALM)},
            proxy={"username": "mirror-bot", "password": "bot-pw"}))
        token = pull_token(pki, repo)  # for the node's service: upstream would refuse it
        async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
            manifest = await client.get(f"/v2/{repo}/manifests/v1")
            blobs = {d: (await client.get(f"/v2/{repo}/blobs/{d}")).content for d in image.blobs}
            refused = await client.get(f"/v2/{repo}/manifests/v1",
                                       headers=bearer(pull_token(pki, "someone/else")))
        fetched = [r for r in link.records
                   if ("/manifests/" in r.path_qs or "/blobs/" in r.path_qs) and r.status == 200]
        issuer_log = list(central.iter_log())
    assert manifest.status_code == 200 and manifest.content == image.manifest
    assert blobs == image.blobs
    assert refused.status_code == 401
    assert fetched and all(r.request_headers.get("Authorization", "").startswith("Bearer ")
                           and token not in r.request_headers["Authorization"] for r in fetched)
    assert issuer_log and {user for user, _ in issuer_log} == {"mirror-bot"}
    assert {status for _, status in issuer_log} == {200}


# --------------------------------------------------------------------------- 7. skopeo


async def test_skopeo_with_credentials_through_the_node(make_mirror, relay, upstream, upstream_client,
                                                        pki, tmp_path) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name("skopeo"), "v1",
                                     layers=[MiB, 4000])
    users = {"alice": ("alice-pw", {image.repo: {"pull"}}), "bob": ("bob-pw", {"bob/own": {"pull"}})}
    with TokenIssuer(pki.ca, users=users) as issuer:
        node = await make_mirror(relay.url, config=node_config(
            tmp_path, relay.url, auth={"token": token_block(pki.ca.cert_path, issuer.url)}))
        source = f"docker://{node.host}/{image.repo}:v1"

        async def copy(creds: str, name: str) -> Any:
            return await run_skopeo_async("copy", "--src-tls-verify=false", "--src-creds", creds,
                                          source, f"dir:{tmp_path / name}", check=False)

        denied = await copy("bob:bob-pw", "bob")
        wrong_password = await copy("alice:nope", "wrong")
        assert relay.count("GET", "/manifests/") + relay.count("GET", "/blobs/") == 0
        allowed = await copy("alice:alice-pw", "alice")
    assert allowed.returncode == 0, allowed.stderr.decode()
    out = tmp_path / "alice"
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() == image.digest[7:]
    for digest, data in image.blobs.items():
        assert (out / digest[7:]).read_bytes() == data
    assert denied.returncode != 0 and not (tmp_path / "bob" / "manifest.json").exists()
    assert wrong_password.returncode != 0


# --------------------------------------------------------------------------- 8. htpasswd


async def test_htpasswd_basic_auth(make_mirror, relay, upstream, upstream_client, tmp_path) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name("basic"), "v1")
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"# users\nalice:{hashed}\n")
    auth = {"htpasswd": {"realm": "mirror-realm", "path": str(htpasswd)}}
    node = await make_mirror(relay.url, config=node_config(tmp_path, relay.url, auth=auth))
    url = f"/v2/{image.repo}/manifests/v1"
    with run_registry(tmp_path / "reference", extra={"auth": auth}) as reference:
        async with node.client(headers=ACCEPT) as ours, \
                httpx.AsyncClient(base_url=reference.url, headers=ACCEPT) as theirs:
            for headers in ({}, {"Authorization": basic("alice", "wrong")},
                            {"Authorization": basic("mallory", "alice-pw")}):
                for path in ("/v2/", url):
                    got, want = await ours.get(path, headers=headers), await theirs.get(path, headers=headers)
                    assert got.status_code == want.status_code == 401, (path, headers)
                    assert got.headers["WWW-Authenticate"] == want.headers["WWW-Authenticate"]
                    assert got.headers["WWW-Authenticate"] == 'Basic realm="mirror-realm"'
                    assert error_body(got)[0] == "UNAUTHORIZED"
            assert relay.count("GET", "/manifests/") == 0
            creds = {"Authorization": basic("alice", "alice-pw")}
            base = await ours.get("/v2/", headers=creds)
            pulled = await ours.get(url, headers=creds)
    assert base.status_code == 200
    assert pulled.status_code == 200 and pulled.content == image.manifest
