"""The link budget: max_concurrency, max_bandwidth, and on-demand pulls ahead of background work."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from aiohttp import web

from mirror.api.debug import create_debug_app
from mirror.registry.digest import Digest
from mirror.upstream.budget import (
    Budget,
    Work,
    background,
    context_for_task,
    is_background,
    promote,
)
from mirror.upstream.credential import Credential
from tests.support import images
from tests.support.images import DOCKER_SCHEMA2


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def max_overlap(records: list[Any]) -> int:
    """Most requests open at once at the relay (each start counted against open ones)."""
    peak = 0
    for record in records:
        start = record.started_at
        open_now = sum(1 for other in records
                       if other.started_at <= start and (other.finished_at is None or other.finished_at > start))
        peak = max(peak, open_now)
    return peak


# -- the primitives -----------------------------------------------------------------------------


async def test_slots_serve_on_demand_first_and_keep_one_for_it() -> None:
    budget = Budget(max_concurrency=2)
    background_work, foreground = Work(True), Work(False)
    first = await budget.acquire(background_work, heavy=True)
    # a second background download must leave the last slot to on-demand work
    second = asyncio.create_task(budget.acquire(background_work, heavy=True))
    await asyncio.sleep(0.01)
    assert not second.done()
    on_demand = await asyncio.wait_for(budget.acquire(foreground, heavy=True), 10)
    # both slots busy: an on-demand waiter queued after the background one is served first
    later = asyncio.create_task(budget.acquire(foreground, heavy=False))
    await asyncio.sleep(0.01)
    budget.release(on_demand)
    await asyncio.wait_for(later, 10)
    assert not second.done()
    budget.release(first)
    await asyncio.wait_for(second, 10)
    budget.release(later.result())
    budget.release(second.result())
    assert budget.slots is not None and budget.slots.in_use == 0 and budget.slots.background_heavy == 0


async def test_slots_cancelled_waiter_leaves_no_trace() -> None:
    budget = Budget(max_concurrency=1)
    held = await budget.acquire(Work(False), heavy=False)
    waiter = asyncio.create_task(budget.acquire(Work(False), heavy=False))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    budget.release(held)
    assert budget.slots is not None and budget.slots.in_use == 0
    await asyncio.wait_for(budget.acquire(Work(False), heavy=False), 10)


async def test_bandwidth_goes_to_on_demand_first() -> None:
    budget = Budget(max_bandwidth=1_000_000)
    chunk = 50_000
    done_at: dict[str, float] = {}
    taken = {"background": 0, "foreground": 0}

    async def read(name: str, work: Work, chunks: int) -> None:
        for _ in range(chunks):
            await budget.consume(chunk, work)
            taken[name] += 1
        done_at[name] = time.monotonic()

    started = time.monotonic()
    slow = asyncio.create_task(read("background", Work(True), 20))  # 1 MB: ~1 s alone
    while taken["background"] < 2:
        await asyncio.sleep(0.01)
    before = taken["background"]
    await read("foreground", Work(False), 4)  # 200 KB
    # counted, not timed: the on-demand 200 KB went first; a fair share would let
    # background take 4 chunks meanwhile, priority at most the one it was waiting on
    assert taken["background"] - before <= 1
    await slow
    assert done_at["background"] - started >= 1.0


async def test_background_context_is_inherited_and_promotable() -> None:
    assert not is_background()
    with background():
        assert is_background()
        work, context = context_for_task()
        assert work.background and context.run(is_background)
    promote(work)  # an on-demand caller joins the task
    assert not work.background and context.run(is_background) is False


# -- against the real upstream ---------------------------------------------------------------------


async def test_max_concurrency_caps_simultaneous_upstream_requests(make_mirror, relay, upstream,
                                                                   upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, unique("budget/many"), "v1",
                                    layers=[2048 + i for i in range(8)])
    node = await make_mirror(relay.url, upstream={"max_concurrency": 2})
    relay.reset()
    relay.latency = 0.2
    async with node.client() as client:
        responses = await asyncio.gather(*(client.get(f"/v2/{image.repo}/blobs/{d}")
                                           for d in image.layer_digests))
    assert [r.content for r in responses] == [data for _, data in image.layers]
    records = [r for r in relay.records if "/blobs/" in r.path_qs]
    assert len(records) == 8
    assert max_overlap(records) == 2
    assert node.node.upstream.budget.slots.peak == 2


async def test_max_bandwidth_caps_the_rate(make_mirror, relay, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, unique("budget/rate"), "v1",
                                    layers=[1_000_000])
    digest, data = image.layers[0]
    node = await make_mirror(relay.url, upstream={"max_bandwidth": "500KB"})
    started = time.monotonic()
    async with node.client() as client:
        assert (await client.get(f"/v2/{image.repo}/blobs/{digest}")).content == data
    assert time.monotonic() - started >= 1.5  # ~1 MB at 500 KB/s (less the first burst)


async def test_on_demand_pull_is_not_delayed_by_a_running_prewarm(make_mirror, relay, upstream,
                                                                  upstream_client) -> None:
    big = await images.push_image(upstream_client, upstream.url, unique("budget/big"), "v1",
                                  layers=[2_000_000 + i for i in range(4)])
    small = await images.push_image(upstream_client, upstream.url, unique("budget/small"), "v1",
                                    layers=[4096])
    # 2 MB blobs at 250 KB/s: an on-demand pull queued behind one would wait seconds
    node = await make_mirror(relay.url, upstream={"max_concurrency": 2, "max_bandwidth": "250KB"})
    relay.rate = 2_000_000
    runner = web.AppRunner(create_debug_app(node.node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    admin_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with httpx.AsyncClient(base_url=admin_url) as admin:
            job = (await admin.post("/admin/prewarm", json={"images": [f"{big.repo}:v1"]})).json()
            await relay.wait_for_async(1, "GET", "/blobs/", timeout=10)
            await asyncio.sleep(0.3)  # the prewarm is streaming

            started = time.monotonic()
            async with node.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
                manifest = await client.get(f"/v2/{small.repo}/manifests/v1")
                assert manifest.content == small.manifest
                for digest, data in small.blobs.items():
                    assert (await client.get(f"/v2/{small.repo}/blobs/{digest}")).content == data
            on_demand = time.monotonic() - started

            state = (await admin.get(f"/admin/jobs/{job['id']}")).json()
            assert state["state"] == "running", state
            assert on_demand < 4.0, on_demand  # typically 0.3 s; behind the prewarm, up to 8 s
            # background downloads kept one slot free for on-demand work
            assert node.node.upstream.budget.slots.background_heavy <= 1
            await admin.delete(f"/admin/jobs/{job['id']}")
    finally:
        relay.rate = None
        await runner.cleanup()


async def test_a_client_joining_a_background_fetch_promotes_it(make_mirror, relay, upstream,
                                                               upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, unique("budget/join"), "v1",
                                    layers=[600_000])
    digest, data = image.layers[0]
    node = await make_mirror(relay.url, upstream={"max_concurrency": 1, "max_bandwidth": "2MB"})
    with background():
        fetch = node.node.fetcher.start(image.repo, Digest.parse(digest), Credential.node())
    assert fetch.work is not None and fetch.work.background
    async with node.client() as client:
        response = await client.get(f"/v2/{image.repo}/blobs/{digest}")
    assert response.content == data
    assert fetch.work is not None and not fetch.work.background
    assert relay.count("GET", f"/blobs/{digest}") == 1
