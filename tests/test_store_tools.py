"""Store tools through the admin API and the CLI: verify, repair, purge, gc, du, stats, the guard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from aiohttp import web

from mirror.api.debug import create_debug_app
from mirror.commands.store import EXIT_CORRUPT
from mirror.registry.digest import Digest
from tests.support import images
from tests.support.images import DOCKER_SCHEMA2

TOKEN = "admin-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ACCEPT = {"Accept": DOCKER_SCHEMA2}
MiB = 1024 * 1024


def repo_name(prefix: str = "tools/app") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def admin_url(mirror) -> AsyncIterator[str]:
    """The node's debug listener (where the admin API lives) on a loopback port."""
    runner = web.AppRunner(create_debug_app(mirror.node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def cli(*args: str) -> tuple[int, str, str]:
    """Run `mirror ARGS` in a subprocess (the node keeps serving on this loop meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_ADMIN")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def object_path(mirror, digest: str) -> Path:
    return mirror.node.store.path(Digest.parse(digest))


def flip_a_byte(path: Path, offset: int = 1000) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


async def test_admin_api_requires_the_token(make_mirror, relay) -> None:
    node = await make_mirror(relay.url, admin={"token": TOKEN})
    async with admin_url(node) as url, httpx.AsyncClient(base_url=url) as client:
        missing = await client.get("/admin/du")
        wrong = await client.get("/admin/du", headers={"Authorization": "Bearer nope"})
        right = await client.get("/admin/du", headers=AUTH)
        code, _, err = await cli("du", "--server", url)
        code_ok, out, _ = await cli("du", "--server", url, "--token", TOKEN)
    assert missing.status_code == 401 and "Bearer" in missing.headers["WWW-Authenticate"]
    assert wrong.status_code == 401
    assert right.status_code == 200 and right.json()["objects"] == 0
    assert code == 1 and "401" in err
    assert code_ok == 0 and "objects" in out


async def test_verify_quarantines_a_flipped_byte_and_the_blob_is_refetched(make_mirror, relay, upstream,
                                                                         upstream_client) -> None:
    node = await make_mirror(relay.url, admin={"token": TOKEN})
    repo = repo_name()
    data = os.urandom(MiB)
    digest = await images.push_blob(upstream_client, upstream.url, repo, data)
    async with node.client() as client:
        assert (await client.get(f"/v2/{repo}/blobs/{digest}")).content == data
        flip_a_byte(object_path(node, digest))
        async with admin_url(node) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as admin:
            report = (await admin.post("/admin/verify")).json()
        again = await client.get(f"/v2/{repo}/blobs/{digest}")
    assert report["checked"] == 1 and report["corrupt"] == 1 and report["quarantined"] == [digest]
    assert len(list((node.node.store.root / "quarantine").iterdir())) == 1
    assert again.status_code == 200 and again.content == data  # refetched, never the corrupt bytes
    assert relay.count("GET", digest) == 2
    assert Digest.of(object_path(node, digest).read_bytes()) == Digest.parse(digest)


async def test_offline_verify_and_startup_repair(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    (corrupt, corrupt_data), (gone, _), (orphan, _) = [
        (await images.push_blob(upstream_client, upstream.url, repo, d), d) for d in
        (os.urandom(300_000), os.urandom(200_000), os.urandom(100_000))]
    async with node.client() as client:
        for digest in (corrupt, gone, orphan):
            assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
    await node.stop()
    store_root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
    flip_a_byte(store_root / "objects" / "sha256" / corrupt[7:9] / corrupt[7:], 5)
    (store_root / "objects" / "sha256" / gone[7:9] / gone[7:]).unlink()
    with sqlite3.connect(store_root / "metadata" / "metadata.sqlite") as db:
        db.execute("DELETE FROM objects WHERE digest=?", (orphan,))  # a file nobody recorded
    code, out, err = await cli("verify", "--store", str(store_root))
    assert code == EXIT_CORRUPT, err  # cron and monitoring see corruption
    assert "checked 2 objects" in out and "1 corrupt" in out and f"quarantined {corrupt}" in out
    code, _, err = await cli("verify", "--store", str(store_root / "nope"))
    assert code == 2 and "not a mirror store" in err

    await node.start()
    await asyncio.wait_for(node.node.quota.repaired.wait(), 30)
    metadata = node.node.metadata
    assert await metadata.get_object(Digest.parse(corrupt)) is None  # quarantined offline: forgotten
    assert await metadata.get_object(Digest.parse(gone)) is None  # missing file: forgotten
    assert (await metadata.get_object(Digest.parse(orphan))).size == 100_000  # adopted
    assert node.node.quota.used == 100_000
    async with node.client() as client:
        assert (await client.get(f"/v2/{repo}/blobs/{corrupt}")).content == corrupt_data


async def test_purge_tag_digest_and_repository(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, admin={"token": TOKEN})
    repo, other = repo_name("tools/purge"), repo_name("tools/other")
    shared = images.make_layer("shared-layer", 200_000)
    image = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[shared, 50_000])
    shared_digest = image.layers[0][0]
    own_digest = image.layers[1][0]
    await images.push_blob(upstream_client, upstream.url, other, shared)
    extra = await images.push_blob(upstream_client, upstream.url, other, os.urandom(10_000))
    async with node.client(headers=ACCEPT) as client:
        assert (await client.get(f"/v2/{repo}/manifests/v1")).status_code == 200
        for digest in image.blobs:
            assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
        for digest in (shared_digest, extra):
            assert (await client.get(f"/v2/{other}/blobs/{digest}")).status_code == 200
        await node.node.ops.pin(repo, "own", Digest.parse(own_digest), [])  # purge takes pinned content down too
        async with admin_url(node) as url, httpx.AsyncClient(base_url=url, headers=AUTH) as admin:
            by_tag = (await admin.post("/admin/purge", json={"reference": f"{repo}:v1"})).json()
            assert await node.node.metadata.get_tag(repo, "v1") is None
            assert not object_path(node, image.digest).exists()
            assert not object_path(node, own_digest).exists()  # pinned, purged anyway
            assert object_path(node, shared_digest).exists()  # the other repository still links it
            assert not await node.node.metadata.is_linked(repo, shared_digest)
            unknown = await admin.post("/admin/purge", json={"reference": f"{repo}:v1"})
            bad = await admin.post("/admin/purge", json={"reference": "UPPER/case"})

            # Pulled again: the tag comes back from upstream.
            assert (await client.get(f"/v2/{repo}/manifests/v1")).content == image.manifest
            by_digest = (await admin.post("/admin/purge", json={"reference": f"{repo}@{image.digest}"})).json()
            code, out, err = await cli("purge", f"{other}", "--server", url, "--token", TOKEN)
            gone = await admin.post("/admin/purge", json={"reference": other})
    assert by_tag == {"tags": 1, "links": 4, "objects": 3, "bytes": by_tag["bytes"]} and by_tag["bytes"] > 50_000
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "NAME_INVALID"
    assert by_digest["tags"] == 1 and by_digest["objects"] == 1  # the manifest; its blobs were not re-pulled
    assert code == 0, err
    assert f"purged {other}" in out and "2 objects" in out
    assert not object_path(node, shared_digest).exists() and not object_path(node, extra).exists()
    assert gone.status_code == 404
    assert other not in await node.node.metadata.repositories()
    assert relay.count("GET", "/manifests/") == 2


async def test_gc_du_and_stats(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url, cache={"max_size": "100MiB"})
    repo = repo_name()
    image = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[MiB, 2 * MiB])
    async with node.client(headers=ACCEPT) as client:
        await client.get(f"/v2/{repo}/manifests/v1")
        for digest in image.blobs:
            await client.get(f"/v2/{repo}/blobs/{digest}")
        await client.get(f"/v2/{repo}/blobs/{image.layers[0][0]}")  # one hit
    await node.node.ops.pin(repo, "layer", Digest.parse(image.layers[1][0]), [])
    async with admin_url(node) as url:  # no token configured: loopback is enough
        du_code, du_out, du_err = await cli("du", "--server", url)
        stats_code, stats_out, _ = await cli("stats", "--server", url)
        _, stats_json, _ = await cli("stats", "--server", url, "--json")
        gc_code, gc_out, gc_err = await cli("gc", "--target", "0", "--server", url)
        _, du_after, _ = await cli("du", "--server", url, "--json")
    assert du_code == 0, du_err
    assert "objects      4" in du_out and "pinned       1 objects, 2.0 MiB" in du_out
    assert repo in du_out and "REPOSITORY" in du_out
    assert stats_code == 0 and "max 100.0 MiB" in stats_out
    assert re.search(r"^CACHE +REQUESTS +HIT RATIO +HIT +MISS$", stats_out, re.MULTILINE)
    assert re.search(r"^blob +4 +25\.0% +1 +3$", stats_out, re.MULTILINE)  # aligned columns
    assert "\x1b[" not in stats_out + du_out  # no colour into a pipe
    stats = json.loads(stats_json)
    assert stats["cache"]["by_kind"]["blob"]["hit_ratio"] == 0.25  # 1 hit of 4 blob requests
    assert stats["cache"]["outcomes"] == {"hit": 1, "miss": 4}
    assert stats["store"]["objects"] == 4 and stats["quota"]["max_size"] == 100 * MiB
    assert stats["disk"]["total"] > 0 and stats["inflight"] == 0
    assert gc_code == 0, gc_err
    assert "evicted 3 objects" in gc_out
    after = json.loads(du_after)
    assert after["objects"] == 1 and after["pinned_objects"] == 1  # only the pinned layer is left
    async with node.client(headers=ACCEPT) as client:  # evicted content is refetched on demand
        assert (await client.get(f"/v2/{repo}/manifests/v1")).content == image.manifest


async def test_verify_exit_code_and_the_quarantine_command(make_mirror, relay, upstream, upstream_client) -> None:
    """Corruption makes `verify` fail; `quarantine` lists what it set aside and `--empty` deletes it."""
    node = await make_mirror(relay.url)
    repo = repo_name()
    data = os.urandom(200_000)
    digest = await images.push_blob(upstream_client, upstream.url, repo, data)
    async with node.client() as client:
        assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
    async with admin_url(node) as url:
        clean, _, _ = await cli("verify", "--server", url)
        flip_a_byte(object_path(node, digest))
        corrupt, out, _ = await cli("verify", "--server", url)
        corrupt_json, _, _ = await cli("verify", "--server", url, "--json")  # nothing left to find
        listed, listing, _ = await cli("quarantine", "--server", url)
        _, listing_json, _ = await cli("quarantine", "--server", url, "--json")
        emptied, empty_out, _ = await cli("quarantine", "--server", url, "--empty")
        _, after, _ = await cli("quarantine", "--server", url)
        _, du, _ = await cli("du", "--server", url, "--json")
    assert clean == 0
    assert corrupt == EXIT_CORRUPT and "1 corrupt (quarantined)" in out
    assert corrupt_json == 0
    assert listed == 0 and digest in listing and "195.3 KiB" in listing
    report = json.loads(listing_json)
    assert report["count"] == 1 and report["bytes"] == 200_000 and report["objects"][0]["digest"] == digest
    assert emptied == 0 and "removed 1 quarantined objects (195.3 KiB)" in empty_out
    assert "quarantine is empty" in after and json.loads(du)["quarantined_objects"] == 0


async def test_offline_quarantine_command(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    digest = await images.push_blob(upstream_client, upstream.url, repo, os.urandom(50_000))
    async with node.client() as client:
        assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
    await node.stop()
    store_root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
    flip_a_byte(store_root / "objects" / "sha256" / digest[7:9] / digest[7:], 5)
    code, _, _ = await cli("verify", "--store", str(store_root))
    listed, listing, _ = await cli("quarantine", "--store", str(store_root), "--json")
    emptied, _, _ = await cli("quarantine", "--store", str(store_root), "--empty")
    left = list((store_root / "quarantine").iterdir())
    not_a_store, _, err = await cli("quarantine", "--store", str(store_root / "nope"))
    assert code == EXIT_CORRUPT and listed == 0 and json.loads(listing)["objects"][0]["digest"] == digest
    assert emptied == 0 and left == []
    assert not_a_store == 2 and "not a mirror store" in err


async def test_stats_counters_survive_a_restart(make_mirror, relay, upstream, upstream_client) -> None:
    node = await make_mirror(relay.url)
    repo = repo_name()
    data = os.urandom(100_000)
    digest = await images.push_blob(upstream_client, upstream.url, repo, data)
    async with admin_url(node) as url:
        async with node.client() as client:
            for _ in range(3):  # a miss, then two hits
                assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
        async with httpx.AsyncClient(base_url=url) as admin:
            before = (await admin.get("/admin/stats")).json()
    await node.restart()  # the debug listener stopped first, as `mirror serve` stops them
    async with admin_url(node) as url:
        async with httpx.AsyncClient(base_url=url) as admin:
            restarted = (await admin.get("/admin/stats")).json()
        async with node.client() as client:
            assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
        async with httpx.AsyncClient(base_url=url) as admin:
            after = (await admin.get("/admin/stats")).json()
        code, out, _ = await cli("stats", "--server", url)
    assert before["cache"]["outcomes"] == {"miss": 1, "hit": 2}
    assert restarted["cache"] == before["cache"] and restarted["link"] == {"saved": 200_000, "fetched": 100_000}
    assert after["cache"]["outcomes"] == {"miss": 1, "hit": 3}  # this process's counts added once
    assert code == 0 and "75.0%" in out and "no requests yet" not in out


def test_tables_align_and_colour_only_on_a_terminal(monkeypatch) -> None:
    """`top`, `du` and `stats` print aligned tables; colour needs a terminal and no NO_COLOR."""
    import io
    import pty

    from mirror.commands.store import format_du, format_stats
    from mirror.commands.table import colour_wanted
    from mirror.commands.top import format_top

    top = format_top([{"repository": "team/app", "tag": "v1", "pulls": 120, "last_pull": 0},
                      {"repository": "x", "tag": "latest", "pulls": 3, "last_pull": 0}])
    assert [line.index("IMAGE") if i == 0 else line.index(("team", "x")[i - 1])
            for i, line in enumerate(top.splitlines())] == [7, 7, 7]
    du = format_du({"objects": 2, "bytes": 10, "pinned_objects": 0, "pinned_bytes": 0, "quarantined_objects": 0,
                    "repositories": [{"repository": "a", "objects": 1, "bytes": 4, "tags": 1},
                                     {"repository": "long/name", "objects": 12, "bytes": 6, "tags": 10}]})
    assert du.splitlines()[-3:] == ["REPOSITORY  OBJECTS  SIZE  TAGS",
                                   "a                 1   4 B     1",
                                   "long/name        12   6 B    10"]
    stats = {"store": {"objects": 0, "bytes": 0, "pinned_objects": 0, "pinned_bytes": 0, "quarantined_objects": 0},
             "quota": {"max_size": None, "used": 0, "reserved": 0}, "disk": {"total": 1, "free": 1},
             "cache": {"outcomes": {"hit": 9, "miss": 1}, "hit_ratio": 0.9,
                       "by_kind": {"blob": {"outcomes": {"hit": 9, "miss": 1}, "hit_ratio": 0.9}}},
             "evictions": {"objects": 0, "bytes": 0}, "inflight": 0}
    assert "\x1b[32m90.0%\x1b[0m" in format_stats(stats, colour=True)  # a good ratio in green
    assert "\x1b[" not in format_stats(stats)

    main, secondary = pty.openpty()
    try:
        terminal = os.fdopen(secondary, "w")
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert colour_wanted(terminal) and not colour_wanted(io.StringIO())
        monkeypatch.setenv("NO_COLOR", "1")
        assert not colour_wanted(terminal)
        terminal.close()
    finally:
        os.close(main)


async def test_lifetime_counters_add_up_across_processes(tmp_path: Path) -> None:
    """Two processes on one store each add their own counts; a flush never counts twice."""
    from mirror.observe.lifetime import LifetimeCounters
    from mirror.observe.metrics import Metrics
    from mirror.storage.metadata import Metadata

    path = tmp_path / "metadata.sqlite"
    first, second = Metadata(path), Metadata(path)
    await first.open()
    await second.open()
    try:
        a, b = Metrics(), Metrics()
        one, two = LifetimeCounters(a, first), LifetimeCounters(b, second)
        a.cache.labels("blob", "hit").inc(3)
        b.cache.labels("blob", "hit").inc(2)
        b.bytes_saved.inc(100)
        await one.flush()
        await one.flush()  # nothing new: adds nothing
        await two.flush()
        a.cache.labels("blob", "hit").inc()  # counted, not flushed yet
        totals = await one.totals()
    finally:
        await first.close()
        await second.close()
    assert totals["cache:blob:hit"] == 6 and totals["bytes_saved"] == 100


async def test_every_operator_command_takes_the_nodes_config(make_mirror, relay, upstream, upstream_client,
                                                             tmp_path) -> None:
    """`mirror verify|gc|purge|du|stats|prewarm|top|unpin CONFIG`: address, token, store from the file."""
    node = await make_mirror(relay.url, admin={"token": TOKEN})
    repo = repo_name()
    await images.push_image(upstream_client, upstream.url, repo, "v1", layers=[300_000])
    async with node.client(headers=ACCEPT) as client:
        assert (await client.get(f"/v2/{repo}/manifests/v1")).status_code == 200
    async with admin_url(node) as url:
        config = tmp_path / "node-config.yml"
        config.write_text(json.dumps({**node.config, "http": {"addr": "127.0.0.1:0",
                                                              "debug": {"addr": url.split("//")[1]}}}))
        ran = {name: await cli(*argv) for name, argv in {
            "prewarm": ("prewarm", str(config), f"{repo}:v1", "--pin"),
            "unpin": ("unpin", str(config), f"{repo}:v1"),
            "top": ("top", str(config), "--json"),
            "du": ("du", str(config), "--json"),
            "stats": ("stats", str(config)),
            "verify": ("verify", str(config)),
            "gc": ("gc", str(config), "--target", "0"),
            "purge": ("purge", str(config), f"{repo}:v1"),
        }.items()}
        wrong_token = await cli("du", str(config), "--token", "not-it")  # flags override the file
        elsewhere = await cli("du", str(config), "--server", "http://127.0.0.1:9", "--token", TOKEN)
    for name, (code, _, err) in ran.items():
        assert code == 0, (name, err)
    assert "1/1 images" in ran["prewarm"][1] and "unpinned" in ran["unpin"][1]
    assert json.loads(ran["top"][1])[0]["repository"] == repo
    assert json.loads(ran["du"][1])["objects"] == 3
    assert "checked 3 objects" in ran["verify"][1] and "evicted" in ran["gc"][1]
    assert f"purged {repo}:v1" in ran["purge"][1]
    assert wrong_token[0] == 1 and "401" in wrong_token[2]
    assert elsewhere[0] == 1 and "127.0.0.1:9" in elsewhere[2]

    # The store, from the same file, when no node serves it.
    await node.stop()
    code, out, err = await cli("verify", "--offline", str(config))
    assert code == 0 and "checked" in out, err
    # A config without the admin API is one line naming the key.
    del node.config["http"]
    config.write_text(json.dumps(node.config))
    code, _, err = await cli("stats", str(config))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "http.debug.addr" in err
    # A mistyped path is a config that cannot be read, never an image name sent to the node.
    code, _, err = await cli("purge", str(tmp_path / "missing.yml"), f"{repo}:v1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing.yml" in err
