"""Forward-mode auth (`mirror.auth.mode: forward`): the node holds no keys, upstream judges.

Upstream here is a real distribution 2.8 with token auth and its token
service; the node sits behind a counting relay to it, so every verification
HEAD is counted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from mirror.auth.forward import HEAD_BURST, HEADS_PER_SECOND
from tests.support import images
from tests.support.authenv import (
    Central,
    bearer,
    challenge_params,
    error_body,
    node_config,
    pull_access,
)
from tests.support.images import DOCKER_SCHEMA2
from tests.support.relay import Relay, run_relay
from tests.support.token_issuer import SERVICE, make_ca

ACCEPT = {"Accept": DOCKER_SCHEMA2}
REPO = "fwd/app"
OTHER = "fwd/other"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("pki")
    return SimpleNamespace(ca=make_ca(d, name="central"), rogue=make_ca(d, name="rogue"))


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory, pki: SimpleNamespace) -> Iterator[Central]:
    users = {"alice": ("alice-pw", {REPO: {"pull"}})}
    with Central(tmp_path_factory.mktemp("central"), pki.ca, users=users) as side:
        yield side


@pytest.fixture(scope="module")
def image(central: Central) -> images.Image:
    async def seed() -> images.Image:
        async with httpx.AsyncClient(timeout=30) as client:
            await images.push_image(client, central.registry.url, OTHER, "v1", seed="other",
                                    headers=bearer(central.admin_token(OTHER)))
            return await images.push_image(client, central.registry.url, REPO, "v1",
                                           headers=bearer(central.admin_token(REPO)))
    return asyncio.run(seed())


@pytest.fixture
def link(central: Central) -> Iterator[Relay]:
    with run_relay(central.registry.url) as relay:
        yield relay


@pytest.fixture
async def node(make_mirror: Any, link: Relay, image: images.Image, tmp_path: Path) -> Any:
    config = node_config(tmp_path, link.url, mirror_auth={"mode": "forward"})
    return await make_mirror(link.url, config=config)


def alice_token(central: Central, repo: str = REPO) -> str:
    """A fresh token as the central token service issues it (distinct every call)."""
    return central.issuer.mint_for("alice", [_access(repo)])


def _access(repo: str) -> Any:
    from mirror.auth.access import Access

    return Access.of("repository", repo, "pull")


async def warm(node: Any) -> None:
    """Let the node learn upstream's challenge (one GET /v2/) before counting."""
    async with node.client() as client:
        assert (await client.get(f"/v2/{REPO}/manifests/v1")).status_code == 401


@pytest.mark.parametrize("path", ["/v2/", "/v2/_catalog", f"/v2/{REPO}/manifests/v1",
                                  f"/v2/{REPO}/blobs/sha256:{'0' * 64}", f"/v2/{REPO}/tags/list"])
async def test_challenge_is_upstreams_with_the_requests_scope(node, central, link, path) -> None:
    async with node.client() as ours, httpx.AsyncClient(base_url=central.registry.url) as theirs:
        for headers in ({}, bearer("garbage")):
            got, want = await ours.get(path, headers=headers), await theirs.get(path, headers=headers)
            assert got.status_code == want.status_code == 401
            assert got.headers["WWW-Authenticate"] == want.headers["WWW-Authenticate"]
            assert error_body(got)[0] == "UNAUTHORIZED"
    params = challenge_params(got.headers["WWW-Authenticate"])[1]
    assert (params["realm"], params["service"]) == (central.issuer.url, SERVICE)
    assert link.count("HEAD") == 0 and link.count("GET", "/manifests/") == 0


async def test_good_token_pulls_and_its_verdict_is_cached(node, central, link, image) -> None:
    await warm(node)
    token = alice_token(central)
    async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
        first = await client.get(f"/v2/{REPO}/manifests/v1")
        assert link.count("HEAD") == 1
        again = await client.get(f"/v2/{REPO}/manifests/v1")
        blobs = {d: (await client.get(f"/v2/{REPO}/blobs/{d}")).content for d in image.blobs}
        assert link.count("HEAD") == 1  # same token, same repository: no new check
        elsewhere = [await client.get(f"/v2/{OTHER}/manifests/v1") for _ in range(3)]
    assert first.status_code == again.status_code == 200
    assert first.content == again.content == image.manifest
    assert blobs == image.blobs
    assert [r.status_code for r in elsewhere] == [401] * 3
    assert all(image.manifest not in r.content for r in elsewhere)
    assert link.count("HEAD") == 2  # one check for the other repository, refusal remembered
    fetches = [r for r in link.records if r.method == "GET" and "/v2/fwd/" in r.path_qs]
    assert fetches and all(r.request_headers.get("Authorization") == f"Bearer {token}" for r in fetches)


async def test_garbage_tokens_cost_no_upstream_check(node, central, link, pki) -> None:
    await warm(node)
    garbage = [
        *(f"not-a-jwt-{i}" for i in range(5)),
        *(f"{uuid.uuid4().hex}.{uuid.uuid4().hex}.{uuid.uuid4().hex}" for _ in range(5)),
        *(pki.ca.mint(access=pull_access(REPO), exp_delta=-600, iat_delta=-900) for _ in range(5)),
        *(pki.ca.mint(access=pull_access(REPO), audience="another-registry") for _ in range(5)),
    ]
    async with node.client(headers=ACCEPT) as client:
        answers = [await client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(t)) for t in garbage]
    assert [r.status_code for r in answers] == [401] * len(garbage)
    assert {challenge_params(r.headers["WWW-Authenticate"])[1].get("error") for r in answers} == {
        "invalid_token"}
    assert link.count("HEAD") == 0
    assert link.count("GET", "/manifests/") == 0


async def test_distinct_forged_tokens_cost_at_most_the_rate_limit(node, central, link, pki) -> None:
    await warm(node)
    forged = [pki.rogue.mint(access=pull_access(REPO)) for _ in range(60)]
    started = time.monotonic()
    async with node.client(headers=ACCEPT) as client:
        answers = await asyncio.gather(*(client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(t))
                                         for t in forged))
    elapsed = time.monotonic() - started
    assert {r.status_code for r in answers} <= {401, 429}
    assert link.count("GET", "/manifests/") == 0
    assert link.count("HEAD") <= HEAD_BURST + HEADS_PER_SECOND * elapsed + 1
    assert link.count("HEAD") < len(forged)


async def test_identical_concurrent_checks_share_one_head(node, central, link, image) -> None:
    await warm(node)
    token = alice_token(central)
    link.latency = 0.3  # every request arrives while the first check is in flight
    async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
        answers = await asyncio.gather(*(client.get(f"/v2/{REPO}/manifests/v1") for _ in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert link.count("HEAD") == 1


async def test_upstream_down_without_a_verdict_denies(node, central, link, image) -> None:
    known = alice_token(central)
    async with node.client(headers={**ACCEPT, **bearer(known)}) as client:
        assert (await client.get(f"/v2/{REPO}/manifests/v1")).content == image.manifest
    link.down = True
    fresh = alice_token(central)
    async with node.client(headers=ACCEPT) as client:
        denied = await client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(fresh))
        denied_blob = await client.get(f"/v2/{REPO}/blobs/{image.config_digest}", headers=bearer(fresh))
        anonymous = await client.get(f"/v2/{REPO}/manifests/v1")
        remembered = await client.get(f"/v2/{REPO}/manifests/v1", headers=bearer(known))
    for response in (denied, denied_blob, anonymous):
        assert response.status_code in (401, 503)
        assert response.content not in (image.manifest, image.config)
        assert "Docker-Content-Digest" not in response.headers
    # a verdict given while upstream was reachable still serves the cached image
    assert remembered.status_code == 200 and remembered.content == image.manifest


async def test_upstream_never_reached_denies(make_mirror, link, image, tmp_path) -> None:
    link.down = True
    node = await make_mirror(link.url, config=node_config(tmp_path, link.url,
                                                          mirror_auth={"mode": "forward"}))
    async with node.client(headers=ACCEPT) as client:
        response = await client.get(f"/v2/{REPO}/manifests/v1", headers=bearer("a.b.c"))
    assert response.status_code in (401, 503)
    assert response.content != image.manifest


async def test_upstream_error_is_not_remembered_as_a_refusal(node, central, link, image) -> None:
    await warm(node)
    token = alice_token(central)
    link.fault = lambda rec: 503 if rec.method == "HEAD" else None
    async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
        during = await client.get(f"/v2/{REPO}/manifests/v1")
        link.fault = None
        after = await client.get(f"/v2/{REPO}/manifests/v1")
    assert during.status_code in (401, 503) and during.content != image.manifest
    assert after.status_code == 200 and after.content == image.manifest


async def test_valid_token_lists_tags(node, central, link, image) -> None:
    await warm(node)
    token = alice_token(central)
    async with node.client(headers={**ACCEPT, **bearer(token)}) as client:
        tags = await client.get(f"/v2/{REPO}/tags/list")
        manifest = await client.get(f"/v2/{REPO}/manifests/v1")
    assert tags.status_code == 200 and "v1" in tags.json()["tags"]
    assert manifest.status_code == 200 and manifest.content == image.manifest


async def test_valid_catalog_token_lists_the_catalog(node, central, link, image) -> None:
    from mirror.auth.access import Access

    await warm(node)
    token = central.issuer.mint_for("alice", [Access.of("registry", "catalog", "*")])
    async with node.client(headers=bearer(token)) as client:
        response = await client.get("/v2/_catalog")
    assert response.status_code == 200


async def test_basic_auth_upstream_challenge_is_relayed_as_basic(make_mirror, tmp_path) -> None:
    import bcrypt

    from tests.support.authenv import basic
    from tests.support.registry import run_registry

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)).decode() + "\n")
    auth = {"htpasswd": {"realm": "up-realm", "path": str(htpasswd)}}
    with run_registry(tmp_path / "basic-upstream", extra={"auth": auth}) as registry:
        async with httpx.AsyncClient(timeout=30) as seed:
            image = await images.push_image(seed, registry.url, "basic/app", "v1",
                                            auth=("alice", "alice-pw"))
        node = await make_mirror(registry.url, config=node_config(
            tmp_path, registry.url, mirror_auth={"mode": "forward"}))
        async with node.client(headers=ACCEPT) as client:
            anonymous = await client.get("/v2/basic/app/manifests/v1")
            alice = await client.get("/v2/basic/app/manifests/v1",
                                     headers={"Authorization": basic("alice", "alice-pw")})
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="up-realm"'
    assert alice.status_code == 200 and alice.content == image.manifest
