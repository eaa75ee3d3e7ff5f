"""Worker processes: `mirror.workers` processes on one socket over one store.

The node runs as a real subprocess (`python -m mirror serve CFG`, through
:class:`NodeProcess`) in front of the real registry, through a counting,
shaping relay. The supervisor is the process NodeProcess started; its workers
are its children. Case IDs as in tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import images
from tests.support import faults as F
from tests.support.faults import FaultRelay, NodeProcess, check_store, free_port
from tests.support.images import DOCKER_SCHEMA2
from tests.support.waits import wait_until

MiB = 1 << 20
ACCEPT = {"Accept": DOCKER_SCHEMA2}

CASES = {
    "R-WK-01": "32 clients on separate connections ask a 4-worker node for one cold blob: one upstream "
               "GET, every body complete and verified",
    "R-WK-02": "kill -9 of the worker filling a blob while clients of other workers read along: they "
               "complete through another worker's resumed fetch (a Range from the bytes written) or "
               "are cut short, never a complete wrong body; the next pull succeeds",
    "R-WK-03": "a worker killed with SIGKILL is restarted by the supervisor, and the node serves",
    "R-WK-04": "SIGTERM to the supervisor stops every worker within the shutdown grace",
    "R-WK-05": "SIGHUP to the supervisor reloads: no worker dies, the node serves",
    "R-WK-06": "workers that keep crashing: the supervisor gives up with a clear error and exits non-zero",
    "R-WK-07": "a fill that fails its digest check in one worker: the clients of every worker are cut "
               "short (none gets a complete wrong body), nothing is published, the next pull succeeds",
    "R-WK-09": "a tag's TTL runs out while 32 clients of a 4-worker node ask for it: one HEAD upstream "
               "for the node, every client gets the manifest",
    "R-WK-10": "/metrics on the leader's debug listener shows node totals: the requests every worker "
               "served, counted once each",
    "R-WK-11": "pulls by tag served by every worker count once each in the leader's popularity "
               "(`/admin/top`), handed over through the on-disk queue",
    "R-WK-12": "SIGTERM to the one worker filling a blob (shutdown_grace 1s): it leaves the bytes written, "
               "a follower in another worker resumes them with a Range; no client gets a wrong body",
    "R-WK-08": "pull-through smoke with 1 and 8 workers: an image's manifest and layers, every blob "
               "fetched upstream once",
    "R-WK-13": "a manifest every worker serves warm is deleted upstream and purged on the leader: at once, "
               "64 requests by tag and by digest on separate connections all get 404 MANIFEST_UNKNOWN; "
               "no worker answers from its memory",
    "R-WK-14": "delete notifications on the leader (one by tag, one by digest) for manifests every worker "
               "serves warm, deleted upstream: at once, every request on every worker gets 404",
    "R-WK-15": "a stored manifest every worker serves warm rots on disk and `/admin/verify` on the leader "
               "quarantines it (deleted upstream): at once, every request by digest gets 404",
    "R-WK-16": "a push notification on the leader moves a tag every worker serves warm (within its TTL): "
               "once the leader settled it, every worker serves the new manifest",
}


def test_every_case_has_a_test() -> None:
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}') >= 2, case_id


@pytest.fixture
def faults(upstream: Any) -> Any:
    with FaultRelay(upstream.url) as link:
        yield link


def start_node(root: Path, faults: FaultRelay, workers: int, debug_port: int | None = None,
               **mirror: Any) -> NodeProcess:
    mirror.setdefault("upstream", {"read_timeout": "10s"})
    node = NodeProcess(root, faults.url, workers=workers, **mirror)
    if debug_port is not None:
        node.config["http"]["debug"] = {"addr": f"127.0.0.1:{debug_port}"}
        node.config_path.write_text(yaml.safe_dump(node.config))
    node.start()
    wait_workers(node, workers)
    return node


def worker_pids(node: NodeProcess) -> list[int]:
    """The supervisor's live children (its workers)."""
    path = Path(f"/proc/{node.pid}/task/{node.pid}/children")
    try:
        return [int(pid) for pid in path.read_text().split()]
    except FileNotFoundError:
        return []


def wait_workers(node: NodeProcess, count: int, timeout: float = 90.0, exclude: set[int] = frozenset()) -> None:
    """Until `count` workers run and each logged that it serves (none of `exclude`)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = set(worker_pids(node))
        text = node.log_text()
        serving = {pid for pid in pids if f"(pid {pid}) serving" in text}
        if len(serving) == count and not pids & exclude:
            return
        assert time.monotonic() < deadline, f"workers not up: {pids}, serving {serving}\n{text[-3000:]}"
        assert node.process.running, node.log_text()[-3000:]
        time.sleep(0.1)




async def get_blob(url: str, repo: str, digest: str) -> tuple[str, bytes | None]:
    """One client on its own connection: ("ok", body), or ("cut", None) for a short body."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        try:
            response = await client.get(f"/v2/{repo}/blobs/{digest}")
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return "cut", None
        if response.status_code != 200:
            return f"status {response.status_code}", None
        return "ok", response.content


def filler_pid(node: NodeProcess, digest: str) -> int | None:
    algorithm, hex_ = digest.split(":")
    try:
        return json.loads((node.store / "tmp" / f"fill-{algorithm}-{hex_}.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


async def push_layer(upstream: Any, upstream_client: Any, size: int) -> tuple[str, str, bytes]:
    data = images.make_layer(uuid.uuid4().hex, size, compresslevel=0)
    repo = f"workers/app-{uuid.uuid4().hex[:8]}"
    image = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[data])
    return repo, image.layers[0][0], data


@pytest.mark.parametrize("case_id", ["R-WK-01"])
async def test_one_upstream_get_for_32_clients_over_4_workers(tmp_path, faults, upstream, upstream_client,
                                                              case_id) -> None:
    node = start_node(tmp_path / "node", faults, 4)
    try:
        repo, digest, data = await push_layer(upstream, upstream_client, 8 * MiB)
        faults.rate = 8 * MiB  # a second or so: every client joins while the fill runs
        results = await asyncio.gather(*(get_blob(node.url, repo, digest) for _ in range(32)))
        assert [outcome for outcome, _ in results] == ["ok"] * 32
        assert all(body == data for _, body in results)
        assert faults.count("GET", f"/blobs/{digest}") == 1
        assert check_store(node.store, node.metadata_db).objects[digest] == len(data)
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-02"])
async def test_kill_filling_worker_mid_blob(tmp_path, faults, upstream, upstream_client, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 4)
    try:
        repo, digest, data = await push_layer(upstream, upstream_client, 8 * MiB)
        faults.rate = 2 * MiB
        clients = [asyncio.create_task(get_blob(node.url, repo, digest)) for _ in range(16)]
        await wait_until(lambda: faults.bytes_sent(f"/blobs/{digest}") >= 2 * MiB)
        pid = filler_pid(node, digest)
        assert pid is not None and pid in worker_pids(node), pid
        os.kill(pid, signal.SIGKILL)
        faults.rate = 8 * MiB
        results = await asyncio.wait_for(asyncio.gather(*clients), 120)
        outcomes = [outcome for outcome, _ in results]
        assert set(outcomes) <= {"ok", "cut"}, outcomes
        assert all(body == data for outcome, body in results if outcome == "ok")
        assert "ok" in outcomes, outcomes  # clients of the other workers got it through the resume
        gets = [r for r in faults.records if r.method == "GET" and f"/blobs/{digest}" in r.path_qs]
        assert any((r.request_headers or {}).get("Range", "").startswith("bytes=") and
                   not (r.request_headers or {}).get("Range", "").startswith("bytes=0-")
                   for r in gets[1:]), [r.request_headers for r in gets]  # resumed, not refetched
        assert await get_blob(node.url, repo, digest) == ("ok", data)
        wait_workers(node, 4, exclude={pid})  # the supervisor restarted the dead worker
        check = check_store(node.store, node.metadata_db, allow_temp=True)
        assert check.problems == [], check.problems
        assert check.objects[digest] == len(data)
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-07"])
async def test_corrupt_fill_reaches_no_worker_whole(tmp_path, faults, upstream, upstream_client,
                                                    case_id) -> None:
    node = start_node(tmp_path / "node", faults, 4)
    try:
        repo, digest, data = await push_layer(upstream, upstream_client, 4 * MiB)
        faults.rate = 4 * MiB
        faults.inject(F.corrupt(len(data) - 10), method="GET", path=f"/blobs/{digest}", times=1)
        results = await asyncio.gather(*(get_blob(node.url, repo, digest) for _ in range(16)))
        assert all(outcome != "ok" or body == data for outcome, body in results), \
            "a complete wrong body was served"
        check = check_store(node.store, node.metadata_db, allow_temp=True)  # every object re-hashed
        assert check.problems == [], check.problems  # a late client's own fetch may have stored it, verified
        faults.rate = None
        assert await get_blob(node.url, repo, digest) == ("ok", data)
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-03"])
async def test_supervisor_restarts_a_killed_worker(tmp_path, faults, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 2)
    try:
        victim = worker_pids(node)[-1]
        os.kill(victim, signal.SIGKILL)
        wait_workers(node, 2, exclude={victim})
        assert "restarting it" in node.log_text()
        async with httpx.AsyncClient(base_url=node.url) as client:
            for _ in range(8):
                assert (await client.get("/v2/")).status_code == 200
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-04"])
def test_sigterm_stops_all_workers_within_the_grace(tmp_path, faults, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 3, shutdown_grace="2s")
    try:
        pids = worker_pids(node)
        started = time.monotonic()
        node.process.signal(signal.SIGTERM)
        assert node.process.wait(timeout=2 + 5 + 10) == 0  # grace + flush budget, generous on a loaded box
        took = time.monotonic() - started
        assert took < 2 + 5 + 10, took
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-05"])
async def test_sighup_kills_no_worker(tmp_path, faults, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 2)
    try:
        pids = sorted(worker_pids(node))
        node.process.signal(signal.SIGHUP)
        await wait_until(lambda: node.log_text().count("SIGHUP") >= 2, timeout=30)  # each worker reloaded
        await asyncio.sleep(0.5)
        assert sorted(worker_pids(node)) == pids
        assert node.process.running
        async with httpx.AsyncClient(base_url=node.url) as client:
            assert (await client.get("/v2/")).status_code == 200
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-06"])
def test_supervisor_gives_up_on_a_crash_loop(tmp_path, faults, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 2)
    try:
        killed: set[int] = set()
        deadline = time.monotonic() + 60
        while node.process.running:
            assert time.monotonic() < deadline, node.log_text()[-3000:]
            for pid in worker_pids(node):
                if pid not in killed:
                    killed.add(pid)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        assert node.process.wait(timeout=30) == 1
        assert "workers keep crashing" in node.log_text()
    finally:
        node.close()


@pytest.mark.parametrize("workers", [1, 8], ids=lambda w: f"R-WK-08-{w}workers")
async def test_pull_through_smoke(tmp_path, faults, upstream, upstream_client, workers) -> None:
    node = start_node(tmp_path / "node", faults, workers) if workers > 1 else \
        NodeProcess(tmp_path / "node", faults.url, workers=1).start()
    try:
        repo = f"workers/smoke-{uuid.uuid4().hex[:8]}"
        image = await images.push_image(upstream_client, upstream.url, repo, "v1",
                                        layers=[MiB, 2 * MiB, 3 * MiB])
        async with httpx.AsyncClient(base_url=node.url, timeout=60) as client:
            manifest = await client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT)
            assert manifest.status_code == 200 and manifest.content == image.manifest
        for digest, data in image.blobs.items():
            results = await asyncio.gather(*(get_blob(node.url, repo, digest) for _ in range(4)))
            assert results == [("ok", data)] * 4
            assert faults.count("GET", f"/blobs/{digest}") == 1, digest
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-09"])
async def test_one_tag_revalidation_per_node(tmp_path, faults, upstream, upstream_client, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 4, tag_ttl="5s")
    try:
        repo = f"workers/tag-{uuid.uuid4().hex[:8]}"
        image = await images.push_image(upstream_client, upstream.url, repo, "v1")

        async def manifest() -> bytes:
            async with httpx.AsyncClient(base_url=node.url, timeout=60) as client:
                response = await client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT)
                assert response.status_code == 200, response.text
                return response.content

        assert await manifest() == image.manifest
        assert await asyncio.gather(*(manifest() for _ in range(32))) == [image.manifest] * 32  # warm
        heads = faults.count("HEAD", f"/{repo}/manifests/v1")
        await asyncio.sleep(5.5)  # the TTL ran out in every worker
        assert await asyncio.gather(*(manifest() for _ in range(32))) == [image.manifest] * 32
        assert faults.count("HEAD", f"/{repo}/manifests/v1") - heads == 1  # (a 5 s TTL outlasts the burst)
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-10"])
async def test_metrics_show_node_totals(tmp_path, faults, upstream, upstream_client, case_id) -> None:
    debug_port = free_port()
    node = start_node(tmp_path / "node", faults, 4, debug_port=debug_port)
    try:
        repo, digest, data = await push_layer(upstream, upstream_client, 64 * 1024)
        assert await get_blob(node.url, repo, digest) == ("ok", data)
        results = await asyncio.gather(*(get_blob(node.url, repo, digest) for _ in range(40)))
        assert results == [("ok", data)] * 40

        async def served() -> float:
            async with httpx.AsyncClient(timeout=30) as client:
                text = (await client.get(f"http://127.0.0.1:{debug_port}/metrics")).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("mirror_http_requests_total{") and 'route="blob"' in line
                       and 'method="GET"' in line)

        deadline = time.monotonic() + 30
        while (total := await served()) < 41:
            assert time.monotonic() < deadline, total
            await asyncio.sleep(0.5)
        assert total == 41  # each request once: the workers' figures added, none twice
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-11"])
async def test_pull_counts_reach_the_leader(tmp_path, faults, upstream, upstream_client, case_id) -> None:
    debug_port = free_port()
    node = start_node(tmp_path / "node", faults, 4, debug_port=debug_port)
    try:
        repo = f"workers/popular-{uuid.uuid4().hex[:8]}"
        image = await images.push_image(upstream_client, upstream.url, repo, "v1")

        async def pull_manifest() -> None:
            async with httpx.AsyncClient(base_url=node.url, timeout=60) as client:
                response = await client.get(f"/v2/{repo}/manifests/v1", headers=ACCEPT)
                assert response.status_code == 200 and response.content == image.manifest

        await pull_manifest()
        await asyncio.gather(*(pull_manifest() for _ in range(24)))

        async def pulls() -> int:
            async with httpx.AsyncClient(timeout=30) as client:
                top = (await client.get(f"http://127.0.0.1:{debug_port}/admin/top?n=10")).json()["top"]
            return sum(entry["pulls"] for entry in top if entry["repository"] == repo and entry["tag"] == "v1")

        deadline = time.monotonic() + 30  # the hand-off runs every 5 s
        while (count := await pulls()) < 25:
            assert time.monotonic() < deadline, count
            await asyncio.sleep(0.5)
        assert count == 25
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-12"])
async def test_filler_shut_down_leaves_its_bytes(tmp_path, faults, upstream, upstream_client, case_id) -> None:
    node = start_node(tmp_path / "node", faults, 4, shutdown_grace="1s")
    try:
        repo, digest, data = await push_layer(upstream, upstream_client, 8 * MiB)
        faults.rate = 2 * MiB
        clients = [asyncio.create_task(get_blob(node.url, repo, digest)) for _ in range(16)]
        await wait_until(lambda: faults.bytes_sent(f"/blobs/{digest}") >= 2 * MiB)
        pid = filler_pid(node, digest)
        assert pid is not None and pid in worker_pids(node), pid
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: pid not in worker_pids(node))  # gone with the fill unfinished
        faults.rate = 8 * MiB
        results = await asyncio.wait_for(asyncio.gather(*clients), 120)
        outcomes = [outcome for outcome, _ in results]
        assert set(outcomes) <= {"ok", "cut"}, outcomes
        assert all(body == data for outcome, body in results if outcome == "ok")
        gets = [r for r in faults.records if r.method == "GET" and f"/blobs/{digest}" in r.path_qs]
        ranges = [(r.request_headers or {}).get("Range", "") for r in gets[1:]]
        assert any(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges), ranges
        assert await get_blob(node.url, repo, digest) == ("ok", data)
    finally:
        node.close()


# --------------------------------------------------------------------------- coherence (R-WK-13..16)

SPREAD = 64  # separate connections: SO_REUSEPORT spreads them over every worker (4 workers miss none)


async def spread(url: str, path: str, count: int = SPREAD) -> list[tuple[int, bytes]]:
    """`count` GETs, each on its own connection (so on a kernel-chosen worker): (status, body)."""
    async def one() -> tuple[int, bytes]:
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=ACCEPT,
                                     transport=httpx.AsyncHTTPTransport(retries=2)) as client:
            response = await client.get(path)  # (retries: connection attempts only, never a request)
            return response.status_code, response.content

    return list(await asyncio.gather(*(one() for _ in range(count))))


def all_unknown(results: list[tuple[int, bytes]]) -> bool:
    """Every answer is the spec's 404 with MANIFEST_UNKNOWN in its JSON body."""
    return all(status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
               for status, body in results)


async def warm_everywhere(node: NodeProcess, image: Any) -> None:
    """Every worker serves the image's manifest by tag and by digest from memory afterwards."""
    for reference in ("v1", image.digest):
        results = await spread(node.url, f"/v2/{image.repo}/manifests/{reference}")
        assert results == [(200, image.manifest)] * SPREAD, reference


async def admin(debug_port: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{debug_port}", timeout=60) as client:
        return await client.request(method, path, **kwargs)


async def coherence_node(tmp_path: Path, faults: FaultRelay) -> tuple[NodeProcess, int]:
    debug_port = free_port()
    return start_node(tmp_path / "node", faults, 4, debug_port=debug_port, tag_ttl="1h"), debug_port


@pytest.mark.parametrize("case_id", ["R-WK-13"])
async def test_purge_on_the_leader_reaches_every_worker_at_once(tmp_path, faults, upstream, upstream_client,
                                                                case_id) -> None:
    node, debug_port = await coherence_node(tmp_path, faults)
    try:
        image = await images.push_image(upstream_client, upstream.url, f"workers/purge-{uuid.uuid4().hex[:8]}",
                                        "v1")
        await warm_everywhere(node, image)
        await images.delete_manifest(upstream_client, upstream.url, image.repo, image.digest)
        purged = await admin(debug_port, "POST", "/admin/purge", json={"reference": f"{image.repo}:v1"})
        assert purged.status_code == 200 and purged.json()["objects"] >= 1, purged.text
        for reference in ("v1", image.digest):
            assert all_unknown(await spread(node.url, f"/v2/{image.repo}/manifests/{reference}")), reference
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-14"])
async def test_delete_notifications_reach_every_worker_at_once(tmp_path, faults, upstream, upstream_client,
                                                               case_id) -> None:
    node, debug_port = await coherence_node(tmp_path, faults)
    try:
        by_tag = await images.push_image(upstream_client, upstream.url, f"workers/del-{uuid.uuid4().hex[:8]}",
                                         "v1")
        by_digest = await images.push_image(upstream_client, upstream.url,
                                            f"workers/del-{uuid.uuid4().hex[:8]}", "v1")
        for image in (by_tag, by_digest):
            await warm_everywhere(node, image)
            await images.delete_manifest(upstream_client, upstream.url, image.repo, image.digest)
        events = [{"action": "delete", "target": {"repository": by_tag.repo, "tag": "v1"}},
                  {"action": "delete", "target": {"repository": by_digest.repo, "digest": by_digest.digest}}]
        sent = await admin(debug_port, "POST", "/admin/notify", json={"events": events})
        assert sent.status_code == 200 and sent.json()["acted"] == 2, sent.text
        await wait_until(lambda: f"forgot tag {by_tag.repo}:v1" in node.log_text()
                         and f"forgot {by_digest.repo}@{by_digest.digest}" in node.log_text())
        assert all_unknown(await spread(node.url, f"/v2/{by_tag.repo}/manifests/v1"))
        for reference in ("v1", by_digest.digest):
            assert all_unknown(await spread(node.url, f"/v2/{by_digest.repo}/manifests/{reference}")), reference
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-15"])
async def test_quarantine_on_the_leader_reaches_every_worker_at_once(tmp_path, faults, upstream,
                                                                     upstream_client, case_id) -> None:
    from mirror.registry.digest import Digest
    from mirror.storage.blobstore import BlobStore

    node, debug_port = await coherence_node(tmp_path, faults)
    try:
        image = await images.push_image(upstream_client, upstream.url, f"workers/rot-{uuid.uuid4().hex[:8]}",
                                        "v1")
        await warm_everywhere(node, image)
        await images.delete_manifest(upstream_client, upstream.url, image.repo, image.digest)
        stored = BlobStore(node.store).path(Digest.parse(image.digest))
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only a hash finds it
        stored.write_bytes(bytes(data))
        verified = await admin(debug_port, "POST", "/admin/verify")
        assert verified.status_code == 200 and image.digest in verified.json()["quarantined"], verified.text
        assert all_unknown(await spread(node.url, f"/v2/{image.repo}/manifests/{image.digest}"))
    finally:
        node.close()


@pytest.mark.parametrize("case_id", ["R-WK-16"])
async def test_a_pushed_tag_reaches_every_worker(tmp_path, faults, upstream, upstream_client, case_id) -> None:
    node, debug_port = await coherence_node(tmp_path, faults)
    try:
        repo = f"workers/push-{uuid.uuid4().hex[:8]}"
        first = await images.push_image(upstream_client, upstream.url, repo, "v1")
        await warm_everywhere(node, first)
        second = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[2048])
        assert second.digest != first.digest
        event = {"action": "push", "target": {"repository": repo, "tag": "v1", "digest": second.digest,
                                              "mediaType": second.media_type}}
        sent = await admin(debug_port, "POST", "/admin/notify", json={"events": [event]})
        assert sent.status_code == 200 and sent.json()["acted"] == 1, sent.text
        await wait_until(lambda: f"push notification {repo}:v1" in node.log_text(), timeout=60)
        assert await spread(node.url, f"/v2/{repo}/manifests/v1") == [(200, second.manifest)] * SPREAD
    finally:
        node.close()


# --------------------------------------------------------------------------- the default count


def fake_cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount under tmp_path and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(own)
    return root, proc


def test_workers_default_to_the_cpus_available(monkeypatch) -> None:
    from mirror.config import load_settings
    from mirror.workers import available_cpus, worker_count

    settings = load_settings(None, {})
    assert settings.mirror.workers == 0  # auto
    assert worker_count(settings) == available_cpus() >= 1
    assert worker_count(load_settings(None, {"REGISTRY_MIRROR_WORKERS": "auto"})) == available_cpus()
    assert worker_count(load_settings(None, {"REGISTRY_MIRROR_WORKERS": "3"})) == 3


@pytest.mark.parametrize("value", ["0", "-2", "lots", "1.5", "true"])
def test_a_bad_worker_count_is_one_line_naming_the_key(value) -> None:
    from mirror.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"REGISTRY_MIRROR_WORKERS": value})
    assert str(refused.value).startswith("config: mirror.workers: ") and "\n" not in str(refused.value)


def test_a_cgroup_v2_cpu_quota_caps_the_count(tmp_path, monkeypatch) -> None:
    from mirror import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: set(range(16)))
    root, proc = fake_cgroup(tmp_path, "0::/kubepods/pod1/app\n", {
        "cpu.max": "max 100000\n",
        "kubepods/cpu.max": "800000 100000\n",
        "kubepods/pod1/app/cpu.max": "250000 100000\n"})  # 2.5 CPUs: 2 workers
    assert workers.available_cpus(root, proc) == 2
    (root / "kubepods/pod1/app/cpu.max").write_text("50000 100000\n")  # half a CPU: still one
    assert workers.available_cpus(root, proc) == 1
    (root / "kubepods/pod1/app/cpu.max").write_text("max 100000\n")  # unlimited: the ancestor's 8
    assert workers.available_cpus(root, proc) == 8
    root, proc = fake_cgroup(tmp_path / "ns", "0::/\n", {"cpu.max": "max 100000\n"})  # a namespaced view
    assert workers.available_cpus(root, proc) == 16


def test_a_cgroup_v1_cpu_quota_caps_the_count(tmp_path, monkeypatch) -> None:
    from mirror import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    root, proc = fake_cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert workers.available_cpus(root, proc) == 3
    assert workers.available_cpus(root, tmp_path / "no-such-file") == 4  # no cgroup: the affinity


def test_a_cgroup_memory_limit_caps_the_count(tmp_path, monkeypatch) -> None:
    from mirror import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: set(range(64)))
    root, proc = fake_cgroup(tmp_path, "0::/pod\n", {
        "cpu.max": "max 100000\n", "pod/cpu.max": "max 100000\n",
        "pod/memory.max": f"{1 << 30}\n"})  # 1 GiB, no CPU limit: 4 workers, not 64
    assert workers.available_cpus(root, proc) == 4
    (root / "pod/memory.max").write_text("max\n")
    assert workers.available_cpus(root, proc) == 64
    (root / "pod/memory.max").write_text(f"{100 << 20}\n")  # under one budget: still one
    assert workers.available_cpus(root, proc) == 1
    root, proc = fake_cgroup(tmp_path / "v1", "5:memory:/docker/x\n", {
        "memory/memory.limit_in_bytes": f"{(1 << 63) - 4096}\n",
        "memory/docker/x/memory.limit_in_bytes": f"{2 << 30}\n"})
    assert workers.available_cpus(root, proc) == 8
