"""A zone of nodes (issue 13): each blob crosses the link once zone-wide, whatever node a client reaches.

Unit tests for rendezvous, membership, signing and the settings; process
tests with 3-4 real node processes (`NodeProcess`) in front of the real
registry through a counting relay. Case IDs Z-01...Z-08 (README Reliability).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from mirror.config import ConfigError, load_settings
from mirror.zone import signing
from mirror.zone.membership import Membership
from mirror.zone.peers import blob_path, credential_headers
from mirror.zone.rendezvous import ranked
from mirror.config.zone import ZoneSettings
from mirror.upstream.credential import Credential
from mirror.registry.digest import Digest
from tests.support import images
from tests.support.faults import FaultRelay, NodeProcess
from tests.support.procs import free_port, wait_http
from tests.support.waits import wait_until

MiB = 1 << 20
SECRET = "zone-secret-0123456789abcdef"
ACCEPT = {"Accept": images.DOCKER_SCHEMA2}

CASES = {
    "Z-01": "round-robin over 3 nodes, every blob of an image asked at every node at once: one "
            "upstream GET per blob zone-wide, every body verified; a manifest by digest likewise; blob "
            "HEADs and ranges at every node answered from the owner's store (no upstream request)",
    "Z-02": "a non-owner (keep_copy off) stores nothing: each blob is stored on its owner only",
    "Z-03": "a 4th node joins (peer lists changed, SIGHUP on all): pulling everything again through "
            "every node costs 0 upstream blob bytes (owners copy from peers that hold it)",
    "Z-04": "a peer killed: its keys go to the next node in rendezvous order, pulls succeed",
    "Z-05": "/zone/ without a signature, with a wrong secret or a stale time: 401 with the spec JSON "
            "body, no content",
    "Z-06": "a client asking through a repository that does not hold a digest cached by another node "
            "gets 404 BLOB_UNKNOWN at the owner and at a non-owner, no content; one pull event per pull "
            "upstream did not see, from the node the client reached (none from peer requests)",
    "Z-07": "kill -9 of the owner mid-stream: clients at other nodes get the complete correct body "
            "(resumed from the next owner) or a cut-short one, never a wrong complete body; a retry succeeds",
    "Z-09": "keep_copy on, one node with 2 worker processes: still one upstream GET per blob zone-wide, "
            "every node ends up storing every blob it served, bodies verified",
    "Z-10": "an owner sends bytes that do not match the digest: the client at the non-owner is cut "
            "short of Content-Length, nothing is stored",
    "Z-11": "SIGTERM to the owner while clients at the other nodes read a blob it is filling: it drains "
            "first, every client gets the complete verified body; then its keys move and pulls succeed",
    "Z-12": "htpasswd on every node: a blob cached through one node is refused 401 (JSON, no content) "
            "at every node to a client without credentials or with a wrong password; the user gets it",
    "Z-13": "a peer request's credential is the one upstream receives for it: the client's own "
            "Authorization header when the reaching node said `client`, none of it when `node`",
    "Z-08": "a peer DNS name resolving to several addresses: each is a member, re-resolved; a failed "
            "resolution keeps the last addresses",
}


def test_every_case_has_a_test() -> None:
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}') >= 2, case_id


# -- units ----------------------------------------------------------------------------------------

PEERS = ("http://10.0.0.11:5000", "http://10.0.0.12:5000", "http://10.0.0.13:5000")


def zone(**overrides: Any) -> ZoneSettings:
    values: dict[str, Any] = {"self_url": PEERS[0], "peers": PEERS, "secret": SECRET, **overrides}
    return ZoneSettings(**values)


def test_rendezvous_is_stable_and_spreads() -> None:
    keys = [f"sha256:{i:064x}" for i in range(3000)]
    owners = Counter(ranked(PEERS, key)[0] for key in keys)
    assert set(owners) == set(PEERS) and min(owners.values()) > 800
    assert all(ranked(PEERS, k) == ranked(reversed(PEERS), k) for k in keys[:50])  # order-free


def test_rendezvous_moves_only_the_keys_of_a_peer_that_leaves_or_joins() -> None:
    keys = [f"sha256:{i:064x}" for i in range(2000)]
    before = {k: ranked(PEERS, k) for k in keys}
    after = {k: ranked(PEERS[1:], k)[0] for k in keys}
    for k in keys:
        if before[k][0] != PEERS[0]:
            assert after[k] == before[k][0]
        else:
            assert after[k] == before[k][1]  # the next one takes its keys
    joined = (*PEERS, "http://10.0.0.14:5000")
    moved = [k for k in keys if ranked(joined, k)[0] != before[k][0]]
    assert all(ranked(joined, k)[0] == joined[3] for k in moved)
    assert 300 < len(moved) < 700


def test_signature_round_trip_and_refusals() -> None:
    path = blob_path(Digest.parse("sha256:" + "a" * 64), "library/app")
    headers = credential_headers(Credential.client("Bearer abc"))
    headers |= signing.sign(SECRET, "GET", path, headers, now=1000)
    assert signing.verify(SECRET, "GET", path, headers, 60, now=1030) is None
    assert signing.verify("another-secret-0123456", "GET", path, headers, 60, now=1030) is not None
    assert signing.verify(SECRET, "GET", path, headers, 60, now=1100) is not None  # skew
    assert signing.verify(SECRET, "HEAD", path, headers, 60, now=1000) is not None  # method signed
    assert signing.verify(SECRET, "GET", path + "x", headers, 60, now=1000) is not None
    swapped = headers | {signing.CLIENT_AUTHORIZATION: "Bearer stolen"}  # credential headers signed
    assert signing.verify(SECRET, "GET", path, swapped, 60, now=1000) is not None
    assert signing.verify(SECRET, "GET", path, credential_headers(Credential.node()), 60) is not None


def test_settings_from_file_and_env(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"mirror": {"zone": {"peers": list(PEERS), "connect_timeout": "200ms",
                                                          "keep_copy": True}}}))
    env = {"REGISTRY_MIRROR_ZONE_SELF": PEERS[1] + "/", "REGISTRY_MIRROR_ZONE_SECRET": SECRET}
    settings = load_settings(config, env).mirror.zone
    assert settings.self_url == PEERS[1] and settings.peers == PEERS and settings.secret == SECRET
    assert settings.connect_timeout == 0.2 and settings.keep_copy is True and settings.down_for == 15.0
    assert SECRET not in repr(settings)
    assert load_settings(None, {}).mirror.zone is None  # no zone: alone, as before


@pytest.mark.parametrize(("zone_config", "key"), [
    ({"self": PEERS[0], "peers": list(PEERS)}, "mirror.zone.secret"),
    ({"self": PEERS[0], "peers": list(PEERS), "secret": "short"}, "mirror.zone.secret"),
    ({"peers": list(PEERS), "secret": SECRET}, "mirror.zone.self"),
    ({"self": PEERS[0], "secret": SECRET}, "mirror.zone.peers"),
    ({"self": PEERS[0], "peers": ["ftp://x"], "secret": SECRET}, "mirror.zone.peers[0]"),
    ({"self": PEERS[0], "peers": list(PEERS), "secret": SECRET, "down_for": "soon"}, "mirror.zone.down_for"),
    ({"self": PEERS[0], "peers": list(PEERS), "secret": SECRET, "colour": 1}, "mirror.zone.colour"),
])
def test_bad_settings_name_the_key(tmp_path: Path, zone_config: dict[str, Any], key: str) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"mirror": {"zone": zone_config}}))
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {})
    assert raised.value.key == key and "\n" not in str(raised.value)


async def test_membership_down_marks_move_keys_to_the_next_peer() -> None:
    now = [0.0]
    membership = Membership(zone(down_for=10.0), clock=lambda: now[0])
    await membership.refresh()
    key = next(f"k{i}" for i in range(100) if ranked(PEERS, f"k{i}")[0] == PEERS[1])
    assert membership.owner(key) == PEERS[1]
    membership.mark_down(PEERS[1], "test")
    assert membership.owner(key) == ranked(PEERS, key)[1]
    membership.mark_down(PEERS[0], "self is never down")
    assert PEERS[0] in membership.live()
    now[0] = 10.5
    assert membership.owner(key) == PEERS[1]


async def test_membership_resolves_names_to_several_members_Z08() -> None:
    """Case "Z-08": a headless Service name: each address is a member; re-resolved; failure keeps them."""
    answers: dict[str, Any] = {"mirror.zone.svc": ["10.1.0.1", "10.1.0.2", "fd00::3"]}

    async def resolver(host: str, port: int) -> list[str]:
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    settings = zone(self_url="http://10.1.0.2:5000", peers=("http://mirror.zone.svc:5000",))
    membership = Membership(settings, resolver)
    await membership.refresh()
    assert membership.members == ("http://10.1.0.1:5000", "http://10.1.0.2:5000", "http://[fd00::3]:5000")
    assert membership.others() == ["http://10.1.0.1:5000", "http://[fd00::3]:5000"]
    answers["mirror.zone.svc"] = ["10.1.0.2", "10.1.0.4"]  # a pod replaced
    await membership.refresh()
    assert membership.members == ("http://10.1.0.2:5000", "http://10.1.0.4:5000")
    answers["mirror.zone.svc"] = OSError("resolver down")
    await membership.refresh()
    assert membership.members == ("http://10.1.0.2:5000", "http://10.1.0.4:5000")
    localhost = Membership(zone(self_url="http://localhost:5000", peers=("http://localhost:5000",)))
    await localhost.refresh()  # the real resolver; `self` by name becomes its member address
    assert "http://127.0.0.1:5000" in localhost.members and localhost.self_url in localhost.members


# -- processes ------------------------------------------------------------------------------------


@pytest.fixture
def link(upstream: Any) -> Any:
    with FaultRelay(upstream.url) as relay:
        yield relay


def zone_config(node: NodeProcess, peers: list[str], secret: str = SECRET, **extra: Any) -> None:
    node.config["mirror"]["zone"] = {"self": node.url, "peers": peers, "secret": secret,
                                     "down_for": "30s", **extra}
    node.config_path.write_text(yaml.safe_dump(node.config))


def start_zone(root: Path, link: FaultRelay, count: int, events: str | None = None,
               **extra: Any) -> list[NodeProcess]:
    nodes = [NodeProcess(root / f"node{i}", link.url, upstream={"read_timeout": "10s"}) for i in range(count)]
    for node in nodes:
        if events is not None:
            node.config["notifications"] = {"endpoints": [{"name": "central", "url": events,
                                                           "timeout": "5s", "backoff": "200ms"}]}
        zone_config(node, [n.url for n in nodes], **extra)
    return start_all(nodes)


def start_all(nodes: list[NodeProcess]) -> list[NodeProcess]:
    for node in nodes:
        node.process.start()
    for node in nodes:
        wait_http(f"{node.url}/v2/", timeout=60, process=node.process)
    return nodes


def stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.stop()


def owner_of(nodes: list[NodeProcess], digest: str) -> NodeProcess:
    first = ranked([n.url for n in nodes], digest)[0]
    return next(n for n in nodes if n.url == first)


def stored(node: NodeProcess, digest: str) -> bool:
    return any(p.is_file() for p in node.store.rglob(digest.split(":")[1]))


async def get(url: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await client.get(path, **kwargs)


async def _head(url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await client.head(path)


async def pull_everywhere(nodes: list[NodeProcess], image: Any) -> None:
    """Every blob at every node, all at once; each body must hash to its digest."""
    jobs = [(node, digest) for node in nodes for digest in image.blobs]
    responses = await asyncio.gather(*(get(n.url, f"/v2/{image.repo}/blobs/{d}") for n, d in jobs))
    for (node, digest), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, (node.url, digest, response.text[:300])
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest


async def push(upstream_client: Any, upstream: Any, layers: list[int]) -> Any:
    repo = f"zone/app-{uuid.uuid4().hex[:8]}"
    return await images.push_image(upstream_client, upstream.url, repo, "v1", layers=layers)


def upstream_gets(link: FaultRelay, digest: str) -> int:
    return link.count("GET", f"/blobs/{digest}")


async def test_round_robin_one_fetch_zone_wide_and_owner_only_storage(
        tmp_path: Path, link: FaultRelay, upstream: Any, upstream_client: Any) -> None:
    """Cases "Z-01" and "Z-02"."""
    image = await push(upstream_client, upstream, [MiB, 2 * MiB, 3 * MiB, 512 * 1024])
    untagged = await images.push_image(upstream_client, upstream.url, image.repo, None, layers=[1000])
    nodes = start_zone(tmp_path, link, 3)
    try:
        by_digest = await asyncio.gather(*(get(n.url, f"/v2/{image.repo}/manifests/{untagged.digest}",
                                               headers=ACCEPT) for n in nodes for _ in range(2)))
        assert all(r.status_code == 200 and r.content == untagged.manifest for r in by_digest)
        assert link.count("GET", f"/manifests/{untagged.digest}") == 1
        for node in nodes:  # each node resolves the tag itself
            manifest = await get(node.url, f"/v2/{image.repo}/manifests/v1", headers=ACCEPT)
            assert manifest.status_code == 200 and manifest.content == image.manifest
        await pull_everywhere(nodes, image)  # Z-01: concurrently, every blob at every node
        await pull_everywhere(nodes, image)  # and again, round robin: all from the owners
        heads = await asyncio.gather(*(_head(n.url, f"/v2/{image.repo}/blobs/{d}") for n in nodes
                                       for d in image.blobs))
        assert all(r.status_code == 200 and r.headers["Content-Length"] == str(len(image.blobs[d]))
                   for r, d in zip(heads, [d for _ in nodes for d in image.blobs], strict=True))
        assert link.count("HEAD", "/blobs/") == 0  # a HEAD anywhere is answered by the owner's store
        for node in nodes:  # a Range at any node: the owner's verified object, relayed
            for digest, body in image.blobs.items():
                ranged = await get(node.url, f"/v2/{image.repo}/blobs/{digest}", headers={"Range": "bytes=10-99"})
                assert ranged.status_code == 206 and ranged.content == body[10:100], (node.url, ranged.status_code)
                assert ranged.headers["Content-Range"] == f"bytes 10-99/{len(body)}"
        for digest in image.blobs:
            assert upstream_gets(link, digest) == 1, digest
            owner = owner_of(nodes, digest)  # Z-02: stored on the owner only
            await wait_until(lambda owner=owner, digest=digest: stored(owner, digest), timeout=30)
            assert [n.url for n in nodes if stored(n, digest)] == [owner.url]
    finally:
        stop_all(nodes)


async def test_joining_node_costs_no_link_bytes_and_a_dead_peer_hands_over(
        tmp_path: Path, link: FaultRelay, upstream: Any, upstream_client: Any) -> None:
    """Cases "Z-03" (a 4th node joins, SIGHUP) and "Z-04" (a peer killed)."""
    everyone = [NodeProcess(tmp_path / f"node{i}", link.url, upstream={"read_timeout": "10s"})
                for i in range(4)]
    fourth = everyone[3]
    for _ in range(20):  # an image with a blob the fourth node will own (ports are random)
        image = await push(upstream_client, upstream, [MiB, MiB, 2 * MiB, 256 * 1024, 700 * 1024])
        if any(owner_of(everyone, d) is fourth for d in image.blobs):
            break
    nodes = everyone[:3]
    for node in nodes:
        zone_config(node, [n.url for n in nodes])
    start_all(nodes)
    try:
        await pull_everywhere(nodes, image)
        for digest in image.blobs:
            await wait_until(lambda d=digest: stored(owner_of(nodes, d), d), timeout=30)
        for node in everyone:
            zone_config(node, [n.url for n in everyone])
        start_all([fourth])
        nodes = everyone
        for node in nodes[:3]:
            os.kill(node.pid, signal.SIGHUP)
        for node in nodes[:3]:
            await wait_until(lambda n=node: f"zone: members {', '.join(sorted(m.url for m in everyone))}"
                             in _members_logged(n), timeout=30)
        assert any(owner_of(nodes, d) is fourth for d in image.blobs)
        link.reset()
        await pull_everywhere(nodes, image)  # Z-03
        assert link.count("GET", "/blobs/") == 0 and link.bytes_sent("/blobs/") == 0, \
            (link.requests, fourth.log_text()[-3000:])
        for digest in image.blobs:  # the new owner copied what it owns from the peers
            await wait_until(lambda d=digest: stored(owner_of(nodes, d), d), timeout=30)

        victim = nodes[1]  # Z-04: killed; its keys go to the next node in rendezvous order
        victim.kill9()
        survivors = [n for n in nodes if n is not victim]
        link.reset()
        await pull_everywhere(survivors, image)
        for digest in image.blobs:  # what it alone held is fetched once, by the next owner
            lost = owner_of(nodes, digest) is victim
            assert upstream_gets(link, digest) == (1 if lost else 0), digest
            if lost:
                await wait_until(lambda d=digest: stored(owner_of(survivors, d), d), timeout=30)
    finally:
        stop_all(nodes)


def _members_logged(node: NodeProcess) -> str:
    """The node's last "zone: members" line, its URLs sorted."""
    lines = [line for line in node.log_text().splitlines() if "zone: members " in line]
    if not lines:
        return ""
    members = lines[-1].split("zone: members ", 1)[1].strip().split(", ")
    return "zone: members " + ", ".join(sorted(members))


async def test_peer_interface_refuses_unsigned_and_cross_repository_reads(
        tmp_path: Path, link: FaultRelay, upstream: Any, upstream_client: Any) -> None:
    """Cases "Z-05" (401 without the secret) and "Z-06" (no content through a repository without it)."""
    image = await push(upstream_client, upstream, [MiB, 300 * 1024])
    other = await push(upstream_client, upstream, [200 * 1024])
    untagged = await images.push_image(upstream_client, upstream.url, image.repo, None, layers=[900])
    events: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        events.extend((await request.json())["events"])
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/events", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    nodes = start_zone(tmp_path, link, 3, events=f"http://127.0.0.1:{port}/events")
    try:
        owner = owner_of(nodes, untagged.digest)
        first, second = [n for n in nodes if n is not owner]
        path = f"/v2/{image.repo}/manifests/{untagged.digest}"
        for node in (first, first, second, owner):  # a miss upstream sees, then three hits
            assert (await get(node.url, path, headers=ACCEPT)).status_code == 200
        expected = [first.url, second.url, owner.url]  # the node each client reached
        await wait_until(lambda: len(events) >= 3, timeout=30)
        await asyncio.sleep(1.0)
        assert sorted(e["target"]["url"].split("/v2/")[0] for e in events) == sorted(expected)
        assert link.count("GET", f"/manifests/{untagged.digest}") == 1

        await pull_everywhere(nodes, image)
        digest = image.layer_digests[0]
        owner = owner_of(nodes, digest)
        path = blob_path(Digest.parse(digest), image.repo)
        headers = credential_headers(Credential.node())
        refused = [
            await get(owner.url, path),  # unsigned
            await get(owner.url, path, headers=headers | signing.sign("wrong-secret-0123456789", "GET", path, headers)),
            await get(owner.url, path, headers=headers | signing.sign(SECRET, "GET", path, headers,
                                                                      now=time.time() - 3600)),
            await get(owner.url, "/zone/v1/anything"),
        ]
        for response in refused:  # Z-05
            assert response.status_code == 401, response.text
            assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
            assert len(response.content) < 300
        signed = await get(owner.url, path, headers=headers | signing.sign(SECRET, "GET", path, headers))
        assert signed.status_code == 200 and hashlib.sha256(signed.content).hexdigest() == digest[7:]

        for node in nodes:  # Z-06: a repository that does not hold it, at the owner and elsewhere
            response = await get(node.url, f"/v2/{other.repo}/blobs/{digest}")
            assert response.status_code == 404, (node.url, response.text)
            assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    finally:
        stop_all(nodes)
        await runner.cleanup()


async def test_owner_killed_mid_stream(tmp_path: Path, link: FaultRelay, upstream: Any,
                                       upstream_client: Any) -> None:
    """Case "Z-07": kill -9 of the owner mid-stream: complete correct bodies or cut ones; retry succeeds."""
    image = await push(upstream_client, upstream, [12 * MiB])
    digest = image.layer_digests[0]
    nodes = start_zone(tmp_path, link, 3)
    try:
        owner = owner_of(nodes, digest)
        others = [n for n in nodes if n is not owner]
        link.rate = 3 * MiB  # bytes/s on the link: the owner's fill takes about 4 s

        async def fetch(node: NodeProcess) -> tuple[str, bytes | None]:
            try:
                response = await get(node.url, f"/v2/{image.repo}/blobs/{digest}")
            except (httpx.RemoteProtocolError, httpx.ReadError):
                return "cut", None
            return ("ok", response.content) if response.status_code == 200 else (str(response.status_code), None)

        clients = [asyncio.create_task(fetch(node)) for node in others for _ in range(2)]
        await wait_until(lambda: link.bytes_sent(f"/blobs/{digest}") > 3 * MiB, timeout=60)
        owner.kill9()
        results = await asyncio.gather(*clients)
        link.rate = None
        for outcome, body in results:
            assert outcome in ("ok", "cut", "503"), outcome
            if outcome == "ok":
                assert body == image.blobs[digest]
        for node in others:  # the retry succeeds
            response = await get(node.url, f"/v2/{image.repo}/blobs/{digest}")
            assert response.status_code == 200 and response.content == image.blobs[digest]
    finally:
        stop_all(nodes)


async def test_keep_copy_with_workers(tmp_path: Path, link: FaultRelay, upstream: Any,
                                      upstream_client: Any) -> None:
    """Case "Z-09": keep_copy on, a node of 2 workers: one upstream GET per blob, copies everywhere."""
    image = await push(upstream_client, upstream, [MiB, 2 * MiB, 300 * 1024])
    nodes = [NodeProcess(tmp_path / f"node{i}", link.url, upstream={"read_timeout": "10s"},
                         workers=2 if i == 0 else 1) for i in range(3)]
    for node in nodes:
        zone_config(node, [n.url for n in nodes], keep_copy=True)
    start_all(nodes)
    try:
        await wait_until(lambda: nodes[0].log_text().count(") serving on") >= 2, timeout=60)
        await pull_everywhere(nodes, image)
        await pull_everywhere(nodes, image)
        for digest in image.blobs:
            assert upstream_gets(link, digest) == 1, digest
            for node in nodes:
                await wait_until(lambda n=node, d=digest: stored(n, d), timeout=30)
    finally:
        stop_all(nodes)


async def test_wrong_bytes_from_a_peer_never_complete_a_body(tmp_path: Path, relay: Any) -> None:
    """Case "Z-10": an owner (a fake, for the fault) sends bytes that do not match the digest:
    the client is cut short of Content-Length, nothing is stored."""
    from tests.conftest import MirrorNode, mirror_config

    port, fake_port = free_port(), free_port()
    me, fake = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{fake_port}"
    body = b""
    for i in range(1000):  # content the fake peer owns
        body = os.urandom(512 * 1024)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ranked([me, fake], digest)[0] == fake:
            break
    asked: list[str] = []

    async def wrong(request: web.Request) -> web.StreamResponse:
        asked.append(request.path)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:-1] + bytes([body[-1] ^ 1]))  # one bit off, at the very end
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/zone/v1/blobs/{digest}", wrong)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fake_port).start()
    config = mirror_config(tmp_path, relay.url, zone={"self": me, "peers": [me, fake], "secret": SECRET})
    node = MirrorNode(config, tmp_path / "config.yml")
    node.port = port
    await node.start()
    try:
        async with node.client() as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await client.get(f"/v2/zone/app/blobs/{digest}")
        assert asked == [f"/zone/v1/blobs/{digest}"]
        assert not list((tmp_path / "store").rglob(digest.split(":")[1]))
    finally:
        await node.stop()
        await runner.cleanup()


@pytest.mark.parametrize("answer", ["connect timeout", "refused signature"])
async def test_a_peer_that_fails_is_marked_down_and_skipped(answer: str) -> None:
    """A peer slow to accept, or refusing our signature: PeerUnavailable, down for `down_for`."""
    from mirror.zone.metrics import ZoneMetrics
    from mirror.zone.peers import REFUSED, Peers, PeerUnavailable

    def handler(request: httpx.Request) -> httpx.Response:
        if answer == "connect timeout":
            raise httpx.ConnectTimeout("slow", request=request)
        return httpx.Response(401, headers={REFUSED: "1"}, json={"errors": []})

    membership = Membership(zone(down_for=30.0))
    await membership.refresh()
    peers = Peers(membership, ZoneMetrics(), transport=httpx.MockTransport(handler))
    digest = Digest.parse("sha256:" + "b" * 64)
    try:
        with pytest.raises(PeerUnavailable):
            async with peers.stream_blob(PEERS[1], blob_path(digest, "app"), digest, 0, Credential.node()):
                pass
        assert membership.is_down(PEERS[1]) and PEERS[1] not in membership.live()
        assert await peers.held(PEERS[2], digest, "app", Credential.node()) is None
        assert membership.is_down(PEERS[2])
    finally:
        await peers.aclose()


async def test_owner_sigterm_drains_first(tmp_path: Path, link: FaultRelay, upstream: Any,
                                          upstream_client: Any) -> None:
    """Case "Z-11": SIGTERM to the owner mid-fill: its peer requests finish (shutdown_grace)."""
    image = await push(upstream_client, upstream, [8 * MiB])
    digest = image.layer_digests[0]
    nodes = start_zone(tmp_path, link, 3)
    try:
        owner = owner_of(nodes, digest)
        others = [n for n in nodes if n is not owner]
        link.rate = 3 * MiB
        clients = [asyncio.create_task(get(n.url, f"/v2/{image.repo}/blobs/{digest}")) for n in others]
        await wait_until(lambda: link.bytes_sent(f"/blobs/{digest}") > MiB, timeout=60)
        os.kill(owner.pid, signal.SIGTERM)
        for response in await asyncio.gather(*clients):
            assert response.status_code == 200 and response.content == image.blobs[digest]
        await asyncio.to_thread(owner.process.wait, 60)
        link.rate = None
        for node in others:  # its keys moved: the next owner serves
            response = await get(node.url, f"/v2/{image.repo}/blobs/{digest}")
            assert response.status_code == 200 and response.content == image.blobs[digest]
        assert upstream_gets(link, digest) <= 2  # the drained owner's fill, then the next owner's
    finally:
        stop_all(nodes)


async def test_client_authorization_stays_at_the_node_reached(tmp_path: Path, link: FaultRelay, upstream: Any,
                                                              upstream_client: Any) -> None:
    """Case "Z-12": a client without rights gets nothing from the zone's cache, at any node."""
    import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"puller:{bcrypt.hashpw(b'right', bcrypt.gensalt(4)).decode()}\n")
    image = await push(upstream_client, upstream, [600 * 1024])
    digest = image.layer_digests[0]
    nodes = [NodeProcess(tmp_path / f"node{i}", link.url) for i in range(3)]
    for node in nodes:
        node.config["auth"] = {"htpasswd": {"realm": "zone", "path": str(htpasswd)}}
        zone_config(node, [n.url for n in nodes])
    start_all(nodes)
    try:
        path = f"/v2/{image.repo}/blobs/{digest}"
        first = await get(nodes[0].url, path, auth=("puller", "right"))
        assert first.status_code == 200 and first.content == image.blobs[digest]
        for node in nodes:
            for auth in (None, ("puller", "wrong"), ("stranger", "right")):
                response = await get(node.url, path, auth=auth)
                assert response.status_code == 401, (node.url, auth, response.status_code)
                assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
                assert image.blobs[digest][:64] not in response.content
            allowed = await get(node.url, path, auth=("puller", "right"))
            assert allowed.status_code == 200 and allowed.content == image.blobs[digest]
        assert upstream_gets(link, digest) == 1
    finally:
        stop_all(nodes)


async def test_the_forwarded_credential_is_what_goes_upstream(tmp_path: Path, relay: Any, upstream: Any,
                                                              upstream_client: Any) -> None:
    """Case "Z-13": the owner fetches with exactly the credential the reaching node chose."""
    from tests.conftest import MirrorNode, mirror_config

    image = await push(upstream_client, upstream, [100 * 1024, 120 * 1024])
    port = free_port()
    me = f"http://127.0.0.1:{port}"
    node = MirrorNode(mirror_config(tmp_path, relay.url, zone={"self": me, "peers": [me], "secret": SECRET}),
                      tmp_path / "config.yml")
    node.port = port
    await node.start()
    try:
        for (digest, _body), credential in zip(image.layers, (Credential.client("Bearer the-clients-own"),
                                                             Credential.node()), strict=True):
            path = blob_path(Digest.parse(digest), image.repo)
            headers = credential_headers(credential)
            headers |= signing.sign(SECRET, "GET", path, headers)
            response = await get(me, path, headers=headers)
            assert response.status_code == 200 and response.content == image.blobs[digest]
            sent = [r.request_headers or {} for r in relay.records if r.method == "GET" and digest in r.path_qs]
            assert len(sent) == 1
            authorization = {k.lower(): v for k, v in sent[0].items()}.get("authorization")
            assert authorization == credential.header  # the client's header, or none for the node's
    finally:
        await node.stop()
