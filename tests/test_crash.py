"""Crashes: the node process killed with SIGKILL at chosen moments of a fetch, then restarted.

After every kill, and again after the restart, the store must hold only
complete, verified objects (every object file is re-hashed against its
name), the metadata must never point at missing or partial data (every
`objects` row has a file of that size, read with sqlite3 behind the node's
back), the restart must sweep the dead process's temp files, and a pull of
the image must then succeed. Case IDs as in tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import faults as F
from tests.support import images
from tests.support.faults import FaultRelay, NodeProcess, check_store
from tests.support.images import DOCKER_SCHEMA2
from tests.support.waits import wait_until

MiB = 1 << 20
ACCEPT = {"Accept": DOCKER_SCHEMA2}

CASES = {
    "R-CR-01": "kill -9 while upstream has not answered a blob's headers yet: after restart the temp "
               "file is swept, no object or row exists for it, the pull succeeds",
    "R-CR-02": "kill -9 in the middle of a blob (slow link): no partial object is visible, no row; "
               "after restart the temp file is swept and the pull succeeds",
    "R-CR-03": "kill -9 around the commit (0-50 ms after the last byte arrived): the object is either "
               "absent or complete and verified, a row never points at a missing or partial file; "
               "after restart the pull succeeds",
    "R-CR-04": "kill -9 while a manifest is being fetched: nothing half-stored, the pull succeeds "
               "after restart",
    "R-CR-05": "kill -9 during 40 concurrent pulls of 4 images: every object verified, rows match "
               "files; all pulls succeed after restart",
    "R-CR-06": "an object file deleted behind the node's back: at restart the repair drops its row; "
               "the next pull refetches it and serves it correctly",
    "R-CR-07": "an object file whose size changed while the node was down: quarantined and its row "
               "dropped at restart; refetched on demand",
    "R-CR-08": "an object published but never recorded (a crash between rename and the row): "
               "adopted at restart and served without refetching",
}


def repo_name() -> str:
    return f"crash/app-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def faults(upstream: Any) -> Any:
    with FaultRelay(upstream.url) as link:
        yield link


@pytest.fixture
def node(tmp_path: Path, faults: FaultRelay) -> Any:
    process = NodeProcess(tmp_path / "node", faults.url, upstream={"read_timeout": "5s"})
    process.start()
    yield process
    process.close()


async def pull(node: NodeProcess, image: Any, timeout: float = 30.0) -> None:
    """Pull `image` through the node and verify every byte."""
    async with httpx.AsyncClient(base_url=node.url, timeout=timeout) as client:
        manifest = await client.get(f"/v2/{image.repo}/manifests/{image.tag}", headers=ACCEPT)
        assert manifest.status_code == 200, manifest.text
        assert manifest.content == image.manifest
        for digest, data in image.blobs.items():
            blob = await client.get(f"/v2/{image.repo}/blobs/{digest}")
            assert blob.status_code == 200 and blob.content == data, (blob.status_code, digest)


def start_pull(node: NodeProcess, image: Any) -> asyncio.Task[None]:
    async def pull_ignoring_errors() -> None:
        try:
            await pull(node, image)
        except (httpx.HTTPError, AssertionError):
            pass  # the node dies under it

    return asyncio.create_task(pull_ignoring_errors())


def assert_consistent(node: NodeProcess, *, allow_temp: bool) -> Any:
    check = check_store(node.store, node.metadata_db, allow_temp=allow_temp)
    assert check.problems == [], check.problems
    return check


async def assert_settled(node: NodeProcess) -> Any:
    """Consistent with no temp file, once the live node finished publishing what it served.

    A client may get a verified blob's last bytes before the fsync and rename
    are done, so the temp file can outlive the pull by a moment.
    """
    deadline = time.monotonic() + 30
    while list((node.store / "tmp").glob("*.part")) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return assert_consistent(node, allow_temp=False)


async def kill_and_restart(node: NodeProcess, faults: FaultRelay, task: asyncio.Task[None] | None) -> None:
    node.kill9()
    if task is not None:
        await asyncio.wait_for(task, 30)
    faults.clear()
    faults.rate = None
    assert_consistent(node, allow_temp=True)  # as the crash left it
    node.start()
    check = await repaired(node)  # the restart swept the dead owner's temp files
    assert check.temp_files == []


async def repaired(node: NodeProcess, timeout: float = 30.0) -> Any:
    """Consistent once the restarted node's background repair is done (polled: no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while (check_store(node.store, node.metadata_db, allow_temp=False).problems
           and time.monotonic() < deadline):
        await asyncio.sleep(0.05)
    return assert_consistent(node, allow_temp=False)




@pytest.mark.parametrize("case_id", ["R-CR-01"])
async def test_kill_before_blob_headers(node, faults, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[MiB])
    layer = image.layers[0][0]
    faults.inject(F.hang(), method="GET", path=f"/blobs/{layer}", times=None)
    task = start_pull(node, image)
    await wait_until(lambda: faults.count("GET", f"/blobs/{layer}") >= 1)
    await wait_until(lambda: list((node.store / "tmp").glob("*.part")))  # the fetch started its temp file
    await kill_and_restart(node, faults, task)
    assert layer not in check_store(node.store, node.metadata_db).objects
    await pull(node, image)
    await assert_settled(node)


@pytest.mark.parametrize("case_id", ["R-CR-02"])
async def test_kill_mid_body(node, faults, upstream, upstream_client, case_id) -> None:
    layer_bytes = images.make_layer(uuid.uuid4().hex, 8 * MiB, compresslevel=0)
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[layer_bytes])
    layer = image.layers[0][0]
    faults.rate = 2 * MiB
    task = start_pull(node, image)
    await wait_until(lambda: faults.bytes_sent(f"/blobs/{layer}") >= 3 * MiB)
    node.kill9()
    await asyncio.wait_for(task, 30)
    crashed = assert_consistent(node, allow_temp=True)
    assert layer not in crashed.objects and layer not in crashed.rows
    assert crashed.temp_files, "the partial blob was in a temp file"
    faults.rate = None
    node.start()
    assert (await repaired(node)).temp_files == []
    await pull(node, image)
    after = await assert_settled(node)
    assert after.objects[layer] == len(layer_bytes)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.02, 0.025, 0.05], ids=lambda d: "R-CR-03-" + f"{int(d * 1000)}ms")
async def test_kill_around_commit(node, faults, upstream, upstream_client, delay) -> None:
    layer_bytes = images.make_layer(uuid.uuid4().hex, 16 * MiB, compresslevel=0)
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[layer_bytes])
    layer = image.layers[0][0]
    task = start_pull(node, image)
    await wait_until(lambda: faults.count("GET", f"/blobs/{layer}", done=True) >= 1)
    await asyncio.sleep(delay)
    node.kill9()
    await asyncio.wait_for(task, 30)
    crashed = assert_consistent(node, allow_temp=True)
    if layer in crashed.objects:  # published before the kill: then it is whole
        assert crashed.objects[layer] == len(layer_bytes)
    node.start()
    await repaired(node)
    await pull(node, image)
    await assert_settled(node)


@pytest.mark.parametrize("case_id", ["R-CR-04"])
async def test_kill_during_manifest_fetch(node, faults, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    faults.inject(F.stall(after=100), method="GET", path="/manifests/", times=None)
    task = start_pull(node, image)
    await wait_until(lambda: faults.count("GET", "/manifests/") >= 1)
    await asyncio.sleep(0.2)
    await kill_and_restart(node, faults, task)
    await pull(node, image)
    await assert_settled(node)


@pytest.mark.parametrize("case_id", ["R-CR-05"])
async def test_kill_during_concurrent_pulls(node, faults, upstream, upstream_client, case_id) -> None:
    pushed = [await images.push_image(upstream_client, upstream.url, repo_name(), "v1",
                                      layers=[images.make_layer(uuid.uuid4().hex, 2 * MiB, compresslevel=0),
                                              images.make_layer(uuid.uuid4().hex, MiB, compresslevel=0)])
              for _ in range(4)]
    faults.rate = 8 * MiB
    tasks = [start_pull(node, pushed[i % 4]) for i in range(40)]
    await wait_until(lambda: faults.bytes_sent("/blobs/") >= 6 * MiB)
    node.kill9()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    crashed = assert_consistent(node, allow_temp=True)
    faults.rate = None
    node.start()
    await repaired(node)
    await asyncio.gather(*(pull(node, image) for image in pushed for _ in range(3)))
    after = await assert_settled(node)
    assert set(crashed.objects) <= set(after.objects)
    for image in pushed:
        assert set(image.blobs) | {image.digest} <= set(after.objects)


def _rows(node: NodeProcess) -> dict[str, int]:
    db = sqlite3.connect(f"file:{node.metadata_db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT digest, size FROM objects").fetchall())
    finally:
        db.close()


async def _pulled(node: NodeProcess, upstream: Any, upstream_client: Any) -> Any:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[300_000, 1000])
    await pull(node, image)
    await assert_settled(node)
    node.stop()  # a clean stop: the change below happens while it is down
    return image


@pytest.mark.parametrize("case_id", ["R-CR-06"])
async def test_object_deleted_behind_the_nodes_back(node, faults, upstream, upstream_client, case_id) -> None:
    image = await _pulled(node, upstream, upstream_client)
    layer = image.layers[0][0]
    assert layer in _rows(node)
    (node.store / "objects" / "sha256" / layer[7:9] / layer[7:]).unlink()
    node.start()
    await wait_until(lambda: layer not in _rows(node))  # the start-up repair
    assert_consistent(node, allow_temp=False)
    before = faults.count("GET", f"/blobs/{layer}")
    await pull(node, image)
    assert faults.count("GET", f"/blobs/{layer}") == before + 1
    await assert_settled(node)


@pytest.mark.parametrize("case_id", ["R-CR-07"])
async def test_object_resized_while_down(node, faults, upstream, upstream_client, case_id) -> None:
    image = await _pulled(node, upstream, upstream_client)
    layer, data = image.layers[0]
    path = node.store / "objects" / "sha256" / layer[7:9] / layer[7:]
    path.write_bytes(data[:-100])
    node.start()
    await wait_until(lambda: layer not in _rows(node))
    assert any(p.name.startswith(f"sha256-{layer[7:]}") for p in (node.store / "quarantine").iterdir())
    assert_consistent(node, allow_temp=False)
    await pull(node, image)
    await assert_settled(node)


@pytest.mark.parametrize("case_id", ["R-CR-08"])
async def test_object_without_row_is_adopted(node, faults, upstream, upstream_client, case_id) -> None:
    image = await _pulled(node, upstream, upstream_client)
    layer = image.layers[0][0]
    db = sqlite3.connect(node.metadata_db)
    db.execute("DELETE FROM objects WHERE digest=?", (layer,))
    db.commit()
    db.close()
    node.start()
    await wait_until(lambda: layer in _rows(node))
    before = faults.count("GET", "/blobs/")
    await pull(node, image)
    assert faults.count("GET", "/blobs/") == before  # served from the store
    await assert_settled(node)


def test_case_table_is_complete() -> None:
    """Every case ID of the table is the id (or id prefix) of a test in this module."""
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2 or f'"{case_id}-' in source, case_id
