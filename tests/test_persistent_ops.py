"""What operators start and what the central registry expects survive a kill -9 (issue 15 item 3).

A node process (``python -m mirror serve``) in front of the real registry is
killed with SIGKILL while a prewarm job is halfway through, or while pull
events are queued for an endpoint that is down, then started again on the
same store: the job resumes under its id and finishes without fetching again
what it had stored, and every queued event is delivered.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from tests.support import images
from tests.support.faults import FaultRelay, NodeProcess
from tests.support.images import DOCKER_SCHEMA2
from tests.support.procs import free_port
from tests.test_notifications import wait_until

MiB = 1 << 20

CASES = {
    "R-CR-09": "kill -9 with pull events queued for an endpoint that is down: after the restart "
               "every queued event is delivered (at least once), none lost",
    "R-CR-10": "kill -9 halfway through a prewarm job: after the restart the job resumes under its "
               "id, finishes, and fetches none of the blobs it had already stored",
}


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def link(upstream: Any) -> Any:
    with FaultRelay(upstream.url) as relay:
        yield relay


def node_process(root: Path, remote: str, **extra: Any) -> NodeProcess:
    """A node with an admin listener; `extra` top-level config sections merged in."""
    process = NodeProcess(root, remote)
    process.debug_port = free_port()  # type: ignore[attr-defined]
    process.config["http"]["debug"] = {"addr": f"127.0.0.1:{process.debug_port}"}  # type: ignore[attr-defined]
    process.config.update(extra)
    process.config_path.write_text(yaml.safe_dump(process.config))
    return process


class Endpoint:
    """A notification endpoint that records the events it receives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.events.extend(json.loads(await request.read())["events"])
        return web.Response(status=200)


@pytest.mark.parametrize("case_id", ["R-CR-09"])
async def test_queued_pull_events_survive_kill9(tmp_path, link, upstream, upstream_client, case_id) -> None:
    image = await images.push_image(upstream_client, upstream.url, unique("events/app"), "v1")
    endpoint_port = free_port()  # nothing listens yet: the endpoint is down
    notifications = {"endpoints": [{"name": "central", "url": f"http://127.0.0.1:{endpoint_port}/events",
                                    "timeout": "1s", "threshold": 1, "backoff": "200ms"}]}
    node = node_process(tmp_path / "node", link.url, notifications=notifications)
    endpoint = Endpoint()
    runner = None
    try:
        node.start()
        async with httpx.AsyncClient(base_url=node.url, timeout=30, headers={"Accept": DOCKER_SCHEMA2}) as client:
            for _ in range(6):  # one miss (upstream saw it), then five hits: five events
                assert (await client.get(f"/v2/{image.repo}/manifests/v1")).status_code == 200
        node.kill9()

        app = web.Application()
        app.router.add_post("/events", endpoint.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", endpoint_port).start()
        node.start()
        await wait_until(lambda: len({e["id"] for e in endpoint.events}) >= 5, 60, "the queued events")
        assert {e["target"]["repository"] for e in endpoint.events} == {image.repo}
        assert all(e["action"] == "pull" and e["target"]["digest"] == image.digest for e in endpoint.events)
        await asyncio.sleep(0.5)
        assert len({e["id"] for e in endpoint.events}) == 5  # exactly the five pulls, none invented
    finally:
        node.close()
        if runner is not None:
            await runner.cleanup()


@pytest.mark.parametrize("case_id", ["R-CR-10"])
async def test_prewarm_job_resumes_after_kill9(tmp_path, link, upstream, upstream_client, case_id) -> None:
    layers = [images.make_layer(unique("warm"), 2 * MiB) for _ in range(4)]
    image = await images.push_image(upstream_client, upstream.url, unique("resume/app"), "v1", layers=layers)
    node = node_process(tmp_path / "node", link.url)
    try:
        node.start()
        admin = f"http://127.0.0.1:{node.debug_port}"  # type: ignore[attr-defined]
        link.rate = 2 * MiB  # bytes/s: the job takes seconds, long enough to kill it halfway
        async with httpx.AsyncClient(base_url=admin, timeout=30) as client:
            submitted = await client.post("/admin/prewarm", json={"images": [f"{image.repo}:v1"]})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]

            async def some_blobs_done() -> bool:
                job = (await client.get(f"/admin/jobs/{job_id}")).json()
                return 1 <= job["blobs_done"] < job["blobs_total"]

            await wait_until(some_blobs_done, 60, "a job halfway through")
            await asyncio.sleep(1.2)  # past one progress save
        node.kill9()
        stored_before = {d for d in image.blobs if (node.store / "objects" / "sha256" / d[7:9] / d[7:]).exists()}
        assert stored_before and len(stored_before) < len(image.blobs)
        link.rate = None
        gets_before = {d: link.count("GET", d) for d in image.blobs}

        node.start()
        async with httpx.AsyncClient(base_url=admin, timeout=30) as client:
            async def finished() -> dict[str, Any] | None:
                response = await client.get(f"/admin/jobs/{job_id}")
                job = response.json() if response.status_code == 200 else None
                return job if job and job["state"] not in ("queued", "running") else None

            job = await wait_until(finished, 60, "the resumed job")
        assert job["state"] == "done" and job["resumed"] == 1, job
        assert job["blobs_done"] == len(image.blobs) and job["blobs_cached"] >= len(stored_before)
        for digest in stored_before:  # nothing stored before the kill crossed the link again
            assert link.count("GET", digest) == gets_before[digest], digest
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as client:
            link.down = True  # everything is in the store now
            for digest, data in image.blobs.items():
                blob = await client.get(f"/v2/{image.repo}/blobs/{digest}")
                assert blob.status_code == 200 and blob.content == data
    finally:
        node.close()


def test_case_table_is_complete() -> None:
    source = Path(__file__).read_text()
    for case_id in CASES:
        assert source.count(f'"{case_id}"') >= 2, case_id
