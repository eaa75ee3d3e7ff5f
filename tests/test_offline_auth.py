"""Link down, pulls go on: offline tokens for the users a token-relaying node has seen.

The zone: a real distribution 2.8 with ``auth.token`` and the token service stand-in
(:class:`TokenIssuer`, GET and OAuth2 POST) make the central side; two counting relays
are the link (node <-> registry, node <-> auth service) and are cut to cut it. The node
relays ``/token`` (``mirror.auth.token_proxy``) and has an account of its own upstream
(for prewarming). Users: alice may pull the app and the warm repositories, bob the app
one (but never used this node), nobody but the node the secret one.

The issuer's tokens live 30 s, at or under the relay's cache margin, so the relay caches
none of them: every answer below is either the auth service's or the node's own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mirror.api.debug import create_debug_app
from mirror.app import TOKEN_RELAY
from mirror.auth.nodekey import KEY_FILE
from mirror.auth.offline import DB_FILE
from mirror.cli import main as mirror_main
from tests.support import images
from tests.support.authenv import Central, basic, bearer, error_body, node_config, token_block
from tests.support.containerd import containerd_unavailable, run_containerd
from tests.support.dockerd import dockerd_unavailable, run_dockerd
from tests.support.images import MANIFEST_ACCEPT
from tests.support.procs import run_skopeo_async
from tests.support.relay import Relay
from tests.support.token_issuer import SERVICE, make_ca

CASES = {
    "R-AUTH-01": "link cut (auth service and registry): alice's skopeo copies of a cached and of a "
                 "prewarmed image succeed on node-signed tokens; bob (never seen here), anonymous, a wrong "
                 "password and a repository alice may not pull are refused; the metric counts the tokens",
    "R-AUTH-02": "containerd's OAuth2 POST (password and refresh_token grants) offline: known credentials "
                 "get a token, others 401 (never 503, so containerd falls back to GET and fails as an "
                 "authentication failure); ctr pulls the cached and the prewarmed image as alice",
    "R-AUTH-03": "docker (registry-mirrors and direct) pulls the cached and the prewarmed image as alice "
                 "during the cut; the repository she may not pull is refused",
    "R-AUTH-04": "the node restarted during the cut answers exactly as before (verifiers, grants and key "
                 "on disk, the key file 0600, no plaintext password in it)",
    "R-AUTH-05": "offline_grace runs out during the cut: every token request and every node token refused",
    "R-AUTH-06": "link restored: the auth service decides again; alice revoked centrally is refused at once, "
                 "and her offline credentials are forgotten",
    "R-AUTH-07": "offline_grace: 0: no node tokens, a 401 for everyone while the auth service is unreachable",
    "R-AUTH-08": "a node-signed token is never sent upstream: an uncached pull on it uses the node's account",
    "R-AUTH-09": "two nodes of a zone with one offline_key: a token one node signed during the cut is "
                 "accepted by the other; a node with its own key refuses it",
}

ALICE, BOB, NODE_ACCOUNT = ("alice", "alice-pw"), ("bob", "bob-pw"), ("node", "node-pw")
ISSUER_TTL = 30  # <= the relay's cache margin: the relay caches nothing (see the module docstring)
_DOCKER = dockerd_unavailable()
_CTR = containerd_unavailable()


def case(case_id: str) -> str:
    assert case_id in CASES, case_id
    return case_id


@dataclass
class Zone:
    """The central side, the two links, one node, and the images."""

    central: Central
    link: Relay
    auth_link: Relay
    node: Any
    app: images.Image  # alice pulls it online: cached
    warm: images.Image  # prewarmed by the node's account: alice never asked for it
    secret: images.Image  # prewarmed; alice may not pull it
    admin_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def node_config(self) -> dict[str, Any]:
        """A config for another node of this zone (set by the fixture)."""
        raise NotImplementedError

    def cut(self) -> None:
        self.link.down = self.auth_link.down = True

    def restore(self) -> None:
        self.link.down = self.auth_link.down = False

    @property
    def issuer(self) -> Any:
        return self.central.issuer

    def offline_tokens(self) -> float:
        return metric(self.node, "mirror_offline_tokens_issued_total")

    async def token(self, creds: tuple[str, str] | None, *repos: str, **params: str) -> httpx.Response:
        """``GET /token`` at the node, as docker and skopeo ask."""
        query = [("service", SERVICE), *[("scope", f"repository:{r}:pull") for r in repos],
                 *params.items()]
        headers = {"Authorization": basic(*creds)} if creds else {}
        async with self.node.client() as client:
            return await client.get("/token", params=query, headers=headers)

    async def oauth(self, form: dict[str, str], *repos: str) -> httpx.Response:
        """``POST /token`` at the node, as containerd asks."""
        body = {"service": SERVICE, "client_id": "containerd-client",
                "scope": " ".join(f"repository:{r}:pull" for r in repos), **form}
        async with self.node.client() as client:
            return await client.post("/token", data=body)

    async def manifest(self, image: images.Image, token: str) -> httpx.Response:
        async with self.node.client() as client:
            return await client.get(f"/v2/{image.repo}/manifests/v1",
                                    headers={"Accept": MANIFEST_ACCEPT, **bearer(token)})

    async def settled(self) -> None:
        """Wait until the node has finished learning from what it relayed."""
        offline = self.node.runner.app[TOKEN_RELAY].offline
        await wait_for(lambda: _true_when(offline.pending == 0))

    async def knows(self, user: str, credentials: int) -> bool:
        """True once the node filed ``credentials`` verifiers for ``user``."""
        async with httpx.AsyncClient(base_url=self.admin_url, timeout=30) as admin:
            users = {u["name"]: u for u in (await admin.get("/admin/users")).json()["users"]}
        return users.get(user, {}).get("credentials", 0) >= credentials

    async def learned(self, user: str, repo: str, timeout: float = 30.0) -> None:
        """Wait until the node learned (in the background) that ``user`` may pull ``repo``."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.admin_url, timeout=30) as admin:
            while True:
                users = {u["name"]: u for u in (await admin.get("/admin/users")).json()["users"]}
                if repo in users.get(user, {}).get("repositories", []):
                    return
                assert time.monotonic() < deadline, users
                await asyncio.sleep(0.1)


async def _true_when(value: bool) -> bool:
    return value


async def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    """Poll an async condition (background learning) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


def metric(node: Any, family: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(node.node.metrics.exposition().decode()):
        total += sum(s.value for s in fam.samples if s.name == family)
    return total


def auth_failure(stderr: str) -> bool:
    """The client reported an authentication or authorization failure (not "unavailable")."""
    text = stderr.lower()
    return "503" not in text and any(w in text for w in ("401", "unauthorized", "denied", "authoriz"))


def token_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer.get("token") or answer["access_token"]


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_ca(tmp_path_factory.mktemp("offline-pki"), name="central")


@pytest.fixture
async def make_zone(make_mirror: Any, ca: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await make_zone(grace="24h", prefix="team")`` -> a learned, online :class:`Zone`."""
    stack = contextlib.ExitStack()
    runners: list[web.AppRunner] = []

    async def make(grace: str = "24h", prefix: str = "team", **mirror_auth: str) -> Zone:
        suffix = uuid.uuid4().hex[:8]
        app, warm, secret = (f"{prefix}/{kind}-{suffix}" for kind in ("app", "warm", "secret"))
        users = {ALICE[0]: (ALICE[1], {app: {"pull"}, warm: {"pull"}}),
                 BOB[0]: (BOB[1], {app: {"pull"}}),
                 NODE_ACCOUNT[0]: (NODE_ACCOUNT[1], {app: {"pull"}, warm: {"pull"}, secret: {"pull"}})}
        central = stack.enter_context(Central(tmp_path / f"central-{suffix}", ca, users=users))
        central.issuer.ttl = ISSUER_TTL
        link = stack.enter_context(Relay(central.registry.url))
        auth_link = stack.enter_context(Relay(central.issuer.url.removesuffix("/token")))
        pushed = []
        async with httpx.AsyncClient(timeout=30) as client:
            for repo in (app, warm, secret):
                pushed.append(await images.push_image(
                    client, central.registry.url, repo, "v1", layers=[60_000, 3_000], seed=repo,
                    headers=bearer(central.admin_token(repo))))
        zone = Zone(central, link, auth_link, None, *pushed)
        zone.node_config = lambda: node_config(  # type: ignore[method-assign]
            tmp_path, link.url, auth={"token": token_block(ca.cert_path, f"{auth_link.url}/token")},
            proxy={"username": NODE_ACCOUNT[0], "password": NODE_ACCOUNT[1]},
            mirror_auth={"token_proxy": True, "offline_grace": grace, **mirror_auth})
        node = zone.node = await make_mirror(link.url, config=zone.node_config())
        runner = web.AppRunner(create_debug_app(node.node))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        zone.admin_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        await prewarm(node, warm, secret)
        return zone

    yield make
    for runner in runners:
        await runner.cleanup()
    stack.close()


async def prewarm(node: Any, *repos: str) -> None:
    """The node's own account fetches the images (alice never asks for them)."""
    job = node.node.ops.warmer.submit([f"{r}:v1" for r in repos])
    deadline = time.monotonic() + 60
    while job.state in ("queued", "running"):
        assert time.monotonic() < deadline, job.to_json()
        await asyncio.sleep(0.05)
    assert job.state == "done", job.to_json()


async def skopeo_copy(zone: Zone, image: images.Image, dest: Path, *creds: str) -> Any:
    auth = ["--src-creds", ":".join(creds)] if creds else ["--src-no-creds"]
    return await run_skopeo_async("copy", "--src-tls-verify=false", *auth,
                                  f"docker://{zone.node.host}/{image.repo}:v1", f"dir:{dest}", check=False)


def copied(dest: Path, image: images.Image) -> bool:
    return (dest / "manifest.json").exists() and all(
        (dest / d.removeprefix("sha256:")).read_bytes() == data for d, data in image.blobs.items())


async def go_online_as_alice(zone: Zone, tmp_path: Path) -> None:
    """alice pulls the app image online (the node learns her), then the background learning ends."""
    result = await skopeo_copy(zone, zone.app, tmp_path / "online", *ALICE)
    assert result.returncode == 0, result.stderr
    await zone.learned(ALICE[0], zone.warm.repo)
    await zone.settled()


# ------------------------------------------------------------------------ skopeo, API, restart


@pytest.mark.parametrize("case_id", [case("R-AUTH-01")])
async def test_link_cut_known_users_pull_with_skopeo(make_zone, tmp_path, case_id) -> None:
    zone = await make_zone()
    await go_online_as_alice(zone, tmp_path)
    # A refresh token handed out online (docker login's identity token) and never used online.
    refresh = (await zone.token(ALICE, offline_token="true")).json()["refresh_token"]
    await wait_for(lambda: zone.knows(ALICE[0], credentials=2))
    zone.cut()
    by_refresh = await zone.oauth({"grant_type": "refresh_token", "refresh_token": refresh},
                                  zone.app.repo)
    assert claims_of(token_of(by_refresh))["sub"] == ALICE[0]
    for image in (zone.app, zone.warm):
        result = await skopeo_copy(zone, image, tmp_path / f"off-{image.repo.split('/')[1]}", *ALICE)
        assert result.returncode == 0, result.stderr
        assert copied(tmp_path / f"off-{image.repo.split('/')[1]}", image)
    refused = {
        "bob": await skopeo_copy(zone, zone.app, tmp_path / "bob", *BOB),
        "anonymous": await skopeo_copy(zone, zone.app, tmp_path / "anon"),
        "wrong password": await skopeo_copy(zone, zone.app, tmp_path / "wrong", ALICE[0], "guess"),
        "not granted": await skopeo_copy(zone, zone.secret, tmp_path / "secret", *ALICE),
    }
    for who, result in refused.items():
        assert result.returncode != 0, who
        assert auth_failure(result.stderr.decode()), (who, result.stderr)
    # At the token step: 401 with the spec's body, never a 503.
    for creds in (BOB, None, (ALICE[0], "guess")):
        answer = await zone.token(creds, zone.app.repo)
        assert answer.status_code == 401 and error_body(answer)[0] == "UNAUTHORIZED"
    ungranted = await zone.token(ALICE, zone.secret.repo, zone.app.repo)
    assert claims_of(token_of(ungranted))["access"] == [
        {"type": "repository", "name": zone.app.repo, "actions": ["pull"]}]
    assert (await zone.manifest(zone.secret, token_of(ungranted))).status_code == 401
    assert zone.offline_tokens() >= 3


@pytest.mark.parametrize("case_id", [case("R-AUTH-04")])
async def test_restart_during_the_cut_changes_nothing(make_zone, tmp_path, case_id) -> None:
    zone = await make_zone()
    await go_online_as_alice(zone, tmp_path)
    zone.cut()
    before = token_of(await zone.token(ALICE, zone.app.repo, zone.warm.repo))
    await zone.node.restart()
    after = await zone.token(ALICE, zone.app.repo, zone.warm.repo)
    assert claims_of(token_of(after))["access"] == claims_of(before)["access"]
    assert claims_of(token_of(after))["iss"] == claims_of(before)["iss"]  # same node key
    assert (await zone.manifest(zone.app, before)).status_code == 200  # a token from before the restart
    result = await skopeo_copy(zone, zone.warm, tmp_path / "warm", *ALICE)
    assert result.returncode == 0, result.stderr
    assert (await zone.token(BOB, zone.app.repo)).status_code == 401
    assert (await zone.token((ALICE[0], "guess"), zone.app.repo)).status_code == 401
    metadata = Path(zone.node.settings.metadata_dir)
    for name in (KEY_FILE, DB_FILE):
        assert stat.S_IMODE(os.stat(metadata / name).st_mode) == 0o600, name
    on_disk = b"".join(p.read_bytes() for p in metadata.iterdir() if p.name.startswith(DB_FILE))
    assert ALICE[1].encode() not in on_disk and base64.b64encode(b"alice:alice-pw") not in on_disk


@pytest.mark.parametrize("case_id", [case("R-AUTH-05")])
async def test_after_offline_grace_everything_is_refused(make_zone, tmp_path, case_id) -> None:
    grace = 8.0
    zone = await make_zone(grace=f"{grace:g}s")
    await go_online_as_alice(zone, tmp_path)
    refresh = (await zone.oauth({"grant_type": "password", "username": ALICE[0], "password": ALICE[1],
                                 "access_type": "offline"}, zone.app.repo)).json()["refresh_token"]
    await zone.oauth({"grant_type": "refresh_token", "refresh_token": refresh}, zone.app.repo)
    await zone.settled()
    cut_at = time.time()  # everything was learned before this
    zone.cut()
    early = await zone.token(ALICE, zone.app.repo)
    if time.time() - cut_at < grace - 2:  # on a very slow machine the window may be gone already
        assert (await zone.manifest(zone.app, token_of(early))).status_code == 200
        assert claims_of(token_of(early))["exp"] <= cut_at + grace + 1  # never past the grace
    await asyncio.sleep(max(0.0, cut_at + grace + 1 - time.time()))
    assert (await zone.token(ALICE, zone.app.repo)).status_code == 401
    assert (await zone.oauth({"grant_type": "password", "username": ALICE[0],
                              "password": ALICE[1]}, zone.app.repo)).status_code == 401
    assert (await zone.oauth({"grant_type": "refresh_token", "refresh_token": refresh},
                             zone.app.repo)).status_code == 401
    if early.status_code == 200:
        assert (await zone.manifest(zone.app, token_of(early))).status_code == 401  # node tokens end too
    result = await skopeo_copy(zone, zone.app, tmp_path / "late", *ALICE)
    assert result.returncode != 0


@pytest.mark.parametrize("case_id", [case("R-AUTH-06")])
async def test_link_restored_the_auth_service_decides(make_zone, tmp_path, case_id, capsys) -> None:
    zone = await make_zone()
    await go_online_as_alice(zone, tmp_path)
    zone.cut()
    assert (await zone.token(ALICE, zone.app.repo)).status_code == 200
    zone.restore()
    del zone.issuer.users[ALICE[0]]  # revoked centrally
    issued = zone.offline_tokens()
    answer = await zone.token(ALICE, zone.app.repo)
    assert answer.status_code == 401 and "incorrect username or password" in answer.text
    assert zone.issuer.log[-1][0] == ALICE[0] and zone.issuer.log[-1][2] == 401  # asked centrally
    assert (await zone.token(BOB, zone.app.repo)).status_code == 200  # bob, online, is fine
    # The refusal made the node forget her credentials: cut again, and she is refused offline too.
    deadline = time.monotonic() + 30
    while True:
        code = await asyncio.to_thread(mirror_main, ["users", "--json", "--server", zone.admin_url])
        listing = json.loads(capsys.readouterr().out)
        users = {u["name"]: u for u in listing["users"]}
        # both learned in the background: alice forgotten, bob (and his grant) filed
        if ALICE[0] not in users and zone.app.repo in users.get(BOB[0], {}).get("repositories", []):
            break
        assert time.monotonic() < deadline, listing
        await asyncio.sleep(0.1)
    assert code == 0
    zone.cut()
    assert (await zone.token(ALICE, zone.app.repo)).status_code == 401
    assert (await zone.token(BOB, zone.app.repo)).status_code == 200  # learned when online
    # The operator forgets bob: refused offline from then on.
    assert await asyncio.to_thread(mirror_main, ["users", "--forget", BOB[0], "--server", zone.admin_url]) == 0
    assert f"forgot {BOB[0]}" in capsys.readouterr().out
    assert (await zone.token(BOB, zone.app.repo)).status_code == 401
    assert zone.offline_tokens() == issued + 1


@pytest.mark.parametrize("case_id", [case("R-AUTH-07")])
async def test_offline_grace_zero_turns_offline_tokens_off(make_zone, tmp_path, case_id) -> None:
    zone = await make_zone(grace="0")
    result = await skopeo_copy(zone, zone.app, tmp_path / "online", *ALICE)
    assert result.returncode == 0, result.stderr
    zone.cut()
    for answer in (await zone.token(ALICE, zone.app.repo),
                   await zone.oauth({"grant_type": "password", "username": ALICE[0],
                                     "password": ALICE[1]}, zone.app.repo)):
        assert answer.status_code == 401 and error_body(answer)[0] == "UNAUTHORIZED"
    assert zone.offline_tokens() == 0
    async with httpx.AsyncClient(base_url=zone.admin_url, timeout=30) as admin:
        assert (await admin.get("/admin/users")).json() == {"offline_grace": 0, "users": []}
        assert (await admin.delete("/admin/users/alice")).status_code == 404
    metadata = Path(zone.node.settings.metadata_dir)
    assert not (metadata / KEY_FILE).exists() and not (metadata / DB_FILE).exists()


@pytest.mark.parametrize("case_id", [case("R-AUTH-08")])
async def test_node_tokens_never_go_upstream(make_zone, tmp_path, case_id) -> None:
    zone = await make_zone()
    await go_online_as_alice(zone, tmp_path)
    zone.auth_link.down = True  # only the auth service is unreachable; the registry is not
    token = token_of(await zone.token(ALICE, zone.app.repo, zone.warm.repo))
    assert claims_of(token)["iss"].startswith("mirror-node/")
    # warm's blobs are cached, but a fresh tag list is not: make the node fetch something new.
    async with httpx.AsyncClient(timeout=30) as client:
        fresh = await images.push_image(client, zone.central.registry.url, zone.warm.repo, "v2",
                                        layers=[5_000], seed=f"fresh-{uuid.uuid4()}",
                                        headers=bearer(zone.central.admin_token(zone.warm.repo)))
    zone.link.reset()
    async with zone.node.client() as client:
        got = await client.get(f"/v2/{fresh.repo}/manifests/v2",
                               headers={"Accept": MANIFEST_ACCEPT, **bearer(token)})
    assert got.status_code == 200 and got.content == fresh.manifest
    sent = [(r.request_headers or {}).get("Authorization", "") for r in zone.link.records]
    assert sent and not any(token in value for value in sent)


# ------------------------------------------------------------------------ containerd (POST) and ctr


@pytest.mark.skipif(_CTR is not None, reason=_CTR or "")
@pytest.mark.parametrize("case_id", [case("R-AUTH-02")])
async def test_containerd_pulls_with_the_link_cut(make_zone, tmp_path, case_id) -> None:
    zone = await make_zone()
    with run_containerd(tmp_path / "containerd") as containerd:
        hosts = containerd.write_hosts_toml(zone.node.host, server=zone.node.url)

        async def pull(image: images.Image, user: str) -> Any:
            return await containerd.ctr_async(
                "images", "pull", "--hosts-dir", str(hosts), "--plain-http", "--snapshotter", "native",
                "--user", user, f"{zone.node.host}/{image.repo}:v1", timeout=60, check=False)

        online = await pull(zone.app, ":".join(ALICE))  # POST password grant, relayed
        assert online.returncode == 0, online.stderr
        assert any(r.method == "POST" and r.status == 200 for r in zone.auth_link.records)
        await zone.learned(ALICE[0], zone.warm.repo)
        refresh = (await zone.oauth({"grant_type": "password", "username": ALICE[0], "password": ALICE[1],
                                     "access_type": "offline"}, zone.app.repo)).json()["refresh_token"]
        await zone.oauth({"grant_type": "refresh_token", "refresh_token": refresh}, zone.app.repo)
        await containerd.ctr_async("images", "rm", f"{zone.node.host}/{zone.app.repo}:v1")
        zone.cut()
        for image in (zone.app, zone.warm):
            issued = zone.offline_tokens()
            result = await pull(image, ":".join(ALICE))
            assert result.returncode == 0, result.stderr
            assert zone.offline_tokens() > issued  # answered by the node itself
        for user, image in (("alice:guess", zone.app), (":".join(BOB), zone.app),
                            (":".join(ALICE), zone.secret)):
            result = await pull(image, user)
            assert result.returncode != 0, user
            assert auth_failure(result.stderr), (user, result.stderr)
    known = await zone.oauth({"grant_type": "password", "username": ALICE[0], "password": ALICE[1]},
                             zone.app.repo)
    by_refresh = await zone.oauth({"grant_type": "refresh_token", "refresh_token": refresh}, zone.app.repo)
    assert claims_of(token_of(known))["sub"] == claims_of(token_of(by_refresh))["sub"] == ALICE[0]
    for form in ({"grant_type": "password", "username": ALICE[0], "password": "guess"},
                 {"grant_type": "refresh_token", "refresh_token": refresh + "x"},
                 {"grant_type": "password", "username": BOB[0], "password": BOB[1]}):
        answer = await zone.oauth(form, zone.app.repo)
        assert answer.status_code == 401 and error_body(answer)[0] == "UNAUTHORIZED", form


# ------------------------------------------------------------------------ docker


@pytest.mark.skipif(_DOCKER is not None, reason=_DOCKER or "")
@pytest.mark.parametrize("case_id", [case("R-AUTH-03")])
async def test_docker_pulls_with_the_link_cut(make_zone, tmp_path, case_id) -> None:
    zone = await make_zone(prefix="library")  # Docker Hub names, for registry-mirrors
    alice = base64.b64encode(":".join(ALICE).encode()).decode()
    with run_dockerd(tmp_path / "dockerd", {"registry-mirrors": [zone.node.url]}) as dockerd:
        (dockerd.client_config / "config.json").write_text(json.dumps({"auths": {
            "https://index.docker.io/v1/": {"auth": alice}, zone.node.host: {"auth": alice}}}))
        name = {image.repo: image.repo.removeprefix("library/") for image in (zone.app, zone.warm, zone.secret)}

        async def pull(reference: str) -> Any:
            return await dockerd.docker_async("pull", reference, check=False, timeout=90)

        online = await pull(f"{zone.node.host}/{zone.app.repo}:v1")
        assert online.returncode == 0, online.stderr
        await zone.learned(ALICE[0], zone.warm.repo)
        await dockerd.docker_async("image", "rm", f"{zone.node.host}/{zone.app.repo}:v1")
        zone.cut()
        for image in (zone.app, zone.warm):
            for reference in (f"{zone.node.host}/{image.repo}:v1", f"{name[image.repo]}:v1"):
                result = await pull(reference)
                assert result.returncode == 0, (reference, result.stderr)
                assert await dockerd.image_id(reference) == image.config_digest
                await dockerd.docker_async("image", "rm", reference)
        refused = await pull(f"{zone.node.host}/{zone.secret.repo}:v1")
        assert refused.returncode != 0
        assert auth_failure(refused.stderr), refused.stderr
    assert zone.offline_tokens() >= 4


# ------------------------------------------------------------------------ relaying both flows online


async def test_post_answers_are_relayed_and_cached_like_get(make_zone, tmp_path) -> None:
    zone = await make_zone()
    zone.issuer.ttl = 300  # long enough for the relay to cache
    form = {"grant_type": "password", "username": ALICE[0], "password": ALICE[1]}
    first = await zone.oauth(form, zone.app.repo)
    await zone.learned(ALICE[0], zone.warm.repo)  # the background question, asked once
    asked = zone.issuer.requests
    again = [await zone.oauth(form, zone.app.repo) for _ in range(3)]
    assert zone.issuer.requests == asked  # answered from the relay's cache
    assert all(a.content == first.content for a in again)
    assert claims_of(token_of(first))["sub"] == ALICE[0]
    wrong = await zone.oauth({**form, "password": "guess"}, zone.app.repo)
    assert wrong.status_code == 401  # the auth service's own refusal, passed back
    relay = zone.node.runner.app[TOKEN_RELAY]
    assert relay.offline is not None
    unsupported = await zone.oauth({"grant_type": "client_credentials"}, zone.app.repo)
    assert unsupported.status_code == 400


def test_case_table_is_complete() -> None:
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2, case_id


@pytest.mark.parametrize("case_id", [case("R-AUTH-09")])
async def test_nodes_sharing_offline_key_accept_each_others_tokens(make_zone, make_mirror, tmp_path,
                                                                   case_id) -> None:
    shared = tmp_path / "zone-offline-key.pem"
    zone = await make_zone(offline_key=str(shared))
    other = await make_mirror(zone.link.url, config=zone.node_config())  # the same offline_key
    config = zone.node_config()
    config["mirror"]["auth"].pop("offline_key")
    stranger = await make_mirror(zone.link.url, config=config)  # a key of its own
    for node in (other, stranger):
        await prewarm(node, zone.app.repo)
    await go_online_as_alice(zone, tmp_path)
    zone.cut()
    token = token_of(await zone.token(ALICE, zone.app.repo))
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o600
    for node, status in ((other, 200), (stranger, 401)):
        async with node.client() as client:
            got = await client.get(f"/v2/{zone.app.repo}/manifests/v1",
                                   headers={"Accept": MANIFEST_ACCEPT, **bearer(token)})
        assert got.status_code == status, got.text


async def test_token_requests_the_node_cannot_vouch_for(make_zone, tmp_path) -> None:
    """Oversized forms are refused before anything; odd credentials are never vouched for."""
    zone = await make_zone()
    await go_online_as_alice(zone, tmp_path)
    async with zone.node.client() as client:
        huge = await client.post("/token", content=b"a=" + b"x" * 70_000,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        zone.cut()
        no_colon = await client.get("/token", params={"service": SERVICE}, headers={
            "Authorization": "Basic " + base64.b64encode(b"alice").decode()})
        bearer_only = await client.get("/token", params={"service": SERVICE},
                                       headers=bearer("x.y.z"))
        bad_scope = await client.get("/token", params={"service": SERVICE, "scope": "nonsense"},
                                     headers={"Authorization": basic(*ALICE)})
        unknown_grant = await zone.oauth({"grant_type": "client_credentials"}, zone.app.repo)
        put = await client.put("/token")
    assert huge.status_code == 413
    for answer in (no_colon, bearer_only, bad_scope, unknown_grant):
        assert answer.status_code == 401 and error_body(answer)[0] == "UNAUTHORIZED", answer.text
    assert put.status_code in (400, 405)
    assert zone.offline_tokens() == 0
