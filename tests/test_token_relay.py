"""The token relay (`mirror.auth.token_proxy: true`): the node answers `/token`.

The central token service is the TokenIssuer stand-in (its requests are
counted); the registry behind the node is the shared open upstream, through
the counting relay, so "the link" can be cut on both sides. Offline tokens are
off here (`offline_grace: 0`), so the issuer's count is the relay's alone: the
background questions they add are tested in ``tests/test_offline_auth.py``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import images
from tests.support.authenv import (
    basic,
    bearer,
    challenge_params,
    error_body,
    node_config,
    token_block,
)
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import run_skopeo_async
from tests.support.token_issuer import SERVICE, TokenIssuer, make_ca

ACCEPT = {"Accept": DOCKER_SCHEMA2}


def repo_name() -> str:
    return f"relay/app-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return SimpleNamespace(ca=make_ca(tmp_path_factory.mktemp("pki"), name="central"))


@pytest.fixture
async def image(upstream: Any, upstream_client: Any) -> images.Image:
    return await images.push_image(upstream_client, upstream.url, repo_name(), "v1")


@pytest.fixture
def issuer(pki: SimpleNamespace, image: images.Image) -> Iterator[TokenIssuer]:
    users = {"alice": ("alice-pw", {image.repo: {"pull"}}), "bob": ("bob-pw", {})}
    with TokenIssuer(pki.ca, users=users) as service:
        yield service


async def relay_node(make_mirror: Any, relay: Any, pki: SimpleNamespace, issuer: TokenIssuer,
                     tmp_path: Path, **http: Any) -> Any:
    config = node_config(tmp_path, relay.url, auth={"token": token_block(pki.ca.cert_path, issuer.url)},
                         mirror_auth={"token_proxy": True, "offline_grace": 0}, http=http)
    return await make_mirror(relay.url, config=config)


@pytest.fixture
async def node(make_mirror, relay, pki, issuer, tmp_path) -> Any:
    return await relay_node(make_mirror, relay, pki, issuer, tmp_path)


async def test_challenge_sends_clients_to_the_node(node, image) -> None:
    async with node.client() as client:
        response = await client.get(f"/v2/{image.repo}/manifests/v1")
        # forwarding headers from a peer that is not a trusted proxy are not believed
        spoofed = await client.get("/v2/", headers={"X-Forwarded-Host": "evil.example",
                                                    "X-Forwarded-Proto": "https"})
    assert response.status_code == 401
    scheme, params = challenge_params(response.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert params == {"realm": f"{node.url}/token", "service": SERVICE,
                      "scope": f"repository:{image.repo}:pull"}
    assert challenge_params(spoofed.headers["WWW-Authenticate"])[1]["realm"] == f"{node.url}/token"


async def test_challenge_realm_follows_http_host(make_mirror, relay, pki, issuer, image,
                                                 tmp_path) -> None:
    node = await relay_node(make_mirror, relay, pki, issuer, tmp_path,
                            host="https://mirror.example.test")
    async with node.client() as client:
        response = await client.get("/v2/")
    assert challenge_params(response.headers["WWW-Authenticate"])[1]["realm"] == (
        "https://mirror.example.test/token")


async def test_token_requests_are_forwarded_then_answered_from_cache(node, issuer, image) -> None:
    query = {"service": SERVICE, "scope": f"repository:{image.repo}:pull"}
    alice = {"Authorization": basic("alice", "alice-pw")}
    async with node.client() as client:
        first = await client.get("/token", params=query, headers=alice)
        assert issuer.requests == 1
        repeated = [await client.get("/token", params=query, headers=alice) for _ in range(5)]
        assert issuer.requests == 1
        token = first.json()["token"]
        pulled = await client.get(f"/v2/{image.repo}/manifests/v1", headers={**ACCEPT, **bearer(token)})
        other_user = await client.get("/token", params=query, headers={"Authorization": basic("bob", "bob-pw")})
        assert issuer.requests == 2  # another credential is another question
        bob_pull = await client.get(f"/v2/{image.repo}/manifests/v1",
                                    headers={**ACCEPT, **bearer(other_user.json()["token"])})
    assert first.status_code == 200
    assert all(r.status_code == 200 and r.content == first.content for r in repeated)
    assert pulled.status_code == 200 and pulled.content == image.manifest
    assert other_user.status_code == 200 and bob_pull.status_code == 401
    assert [(user, status) for user, _, status in issuer.log] == [("alice", 200), ("bob", 200)]


async def test_refused_credentials_are_passed_back_and_never_cached(node, issuer, image) -> None:
    query = {"service": SERVICE, "scope": f"repository:{image.repo}:pull"}
    wrong = {"Authorization": basic("alice", "guess")}
    async with node.client() as client:
        answers = [await client.get("/token", params=query, headers=wrong) for _ in range(3)]
    assert [r.status_code for r in answers] == [401] * 3
    assert all("token" not in r.text for r in answers)
    assert issuer.requests == 3


async def test_token_service_down_and_nothing_learned_is_an_auth_failure(node, issuer, image) -> None:
    """Never 503: that would stop containerd's POST-to-GET fallback and make clients retry."""
    issuer.stop()
    async with node.client() as client:
        response = await client.get("/token", params={"service": SERVICE},
                                    headers={"Authorization": basic("alice", "alice-pw")})
    assert response.status_code == 401
    assert error_body(response)[0] == "UNAUTHORIZED"


async def test_no_token_route_without_the_relay(make_mirror, relay, pki, issuer, tmp_path) -> None:
    config = node_config(tmp_path, relay.url, auth={"token": token_block(pki.ca.cert_path, issuer.url)})
    node = await make_mirror(relay.url, config=config)
    async with node.client() as client:
        response = await client.get("/token", params={"service": SERVICE},
                                    headers={"Authorization": basic("alice", "alice-pw")})
    assert response.status_code == 404
    assert issuer.requests == 0


async def test_cached_image_pulls_with_skopeo_while_the_link_is_cut(node, relay, issuer, image,
                                                                   tmp_path) -> None:
    source = f"docker://{node.host}/{image.repo}:v1"

    async def copy(name: str) -> Path:
        await run_skopeo_async("copy", "--src-tls-verify=false", "--src-creds", "alice:alice-pw",
                               source, f"dir:{tmp_path / name}")
        return tmp_path / name

    online = await copy("online")
    asked = issuer.requests
    assert asked >= 1
    issuer.stop()
    relay.down = True
    offline = await copy("offline")
    for out in (online, offline):
        manifest = (out / "manifest.json").read_bytes()
        assert hashlib.sha256(manifest).hexdigest() == image.digest.removeprefix("sha256:")
        for digest, data in image.blobs.items():
            assert (out / digest.removeprefix("sha256:")).read_bytes() == data
    assert issuer.requests == asked
