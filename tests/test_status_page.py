"""The status page (`GET /` on the debug listener), rendered by a real headless Chromium.

The page's figures carry their metric's raw value (`data-metric`, `data-value`);
the browser test reads the DOM Chromium rendered and checks each one against
a `/metrics` scrape taken while the node is quiet, and fails on any script
error (console lines from `--enable-logging=stderr`, and the page's own
`#script-errors`, which its `error`/`unhandledrejection` handlers fill).
"""

from __future__ import annotations

import asyncio
import base64
import html
import logging
import math
import re
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from mirror.admin.status import SAMPLER, Sample, Sampler
from mirror.api.debug import create_debug_app
from tests.support import images
from tests.support.images import DOCKER_SCHEMA2

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test installs it)")
TOKEN = "status-page-secret"


async def serve_debug(node) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_debug_app(node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


RUNNERS: dict[str, web.AppRunner] = {}


@pytest.fixture
async def debug_url(mirror):
    runner, url = await serve_debug(mirror.node)
    RUNNERS[url] = runner
    yield url
    del RUNNERS[url]
    await runner.cleanup()


def mirror_sampler(url: str) -> Sampler:
    return RUNNERS[url].app[SAMPLER]


async def chromium(tmp_path: Path, url: str, *args: str) -> tuple[str, str]:
    """Run headless Chromium on `url`; (stdout, stderr). Virtual time lets the first refresh land."""
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:6]}"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-extensions",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=4000",
        "--window-size=1280,1400", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    shutil.rmtree(profile, ignore_errors=True)
    return out.decode(errors="replace"), err.decode(errors="replace")


def console_errors(stderr: str) -> list[str]:
    """Console lines that report a script error (Chromium logs them as CONSOLE)."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


def scrape(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r'^(\w+)(?:\{(.*)\})? (\S+)$', line)
        assert match, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric_sum(samples, name: str, matchers: str = "") -> float:
    """Sum of `name`'s samples whose labels match `label=~"regex"` matchers."""
    wanted = re.findall(r'(\w+)=~"([^"]*)"', matchers)
    return sum(value for sample, labels, value in samples if sample == name
               and all(re.fullmatch(regex, labels.get(label, "")) for label, regex in wanted))


def figures(dom: str) -> list[tuple[str, str, float]]:
    """(metric, label matchers, value) of every figure the page rendered."""
    found = []
    for tag in re.findall(r"<[^>]*data-metric=[^>]*>", dom):
        name = re.search(r'data-metric="([^"]+)"', tag).group(1)
        labels = re.search(r"data-labels=\"([^\"]*)\"|data-labels='([^']*)'", tag)
        value = re.search(r'data-value="([^"]*)"', tag)
        assert value, f"figure {name} was not rendered: {tag}"
        found.append((name, html.unescape((labels.group(1) or labels.group(2)) if labels else ""),
                      float(value.group(1))))
    return found


async def pull(mirror, repo: str, image) -> None:
    async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
        assert (await client.get(f"/v2/{repo}/manifests/v1")).status_code == 200
        for digest, _ in image.layers:
            assert (await client.get(f"/v2/{repo}/blobs/{digest}")).status_code == 200
        assert (await client.get(f"/v2/{repo}/blobs/{image.layers[0][0]}")).status_code == 200  # a hit


@needs_chromium
async def test_page_renders_in_chromium_and_its_figures_match_metrics(
        make_mirror, relay, upstream, upstream_client, tmp_path) -> None:
    mirror = await make_mirror(relay.url, cache={"max_size": "1GiB"})
    repo = f"status/app-{uuid.uuid4().hex[:6]}"
    image = await images.push_image(upstream_client, upstream.url, repo, "v1", layers=(4096, 8192))
    big = await images.push_image(upstream_client, upstream.url, repo + "-big", "v1", layers=(3_000_000,))
    await pull(mirror, repo, image)
    runner, url = await serve_debug(mirror.node)
    try:
        dom, stderr = await chromium(tmp_path, url + "/", "--dump-dom")
        async with httpx.AsyncClient() as client:
            metrics = scrape((await client.get(f"{url}/metrics")).text)
        assert console_errors(stderr) == []
        assert re.search(r'<body[^>]*data-state="ok"', dom), dom[:2000]
        assert re.search(r'<pre id="script-errors"></pre>', dom), "the page reported script errors"
        rendered = figures(dom)
        assert len(rendered) >= 12
        for name, matchers, value in rendered:
            assert value == metric_sum(metrics, name, matchers), (name, matchers)
        assert f"{repo}:v1" in dom  # top images
        assert "reachable" in dom

        # A slow fetch in flight (progress bar, rate), some history and a logged
        # warning: every part of the page drawn, in the screenshot.
        sampler = runner.app[SAMPLER]
        first = sampler.samples[0]
        earlier = [Sample(first.time - 60 * (5 - i), first.served_locally * i / 5, first.requests * i / 5,
                          first.saved * i / 5, first.fetched * i / 5) for i in range(5)]
        sampler.samples.extendleft(reversed(earlier))
        logging.getLogger("mirror.test").warning("a warning <b>shown</b> as text")
        async with httpx.AsyncClient() as admin:
            job = (await admin.post(f"{url}/admin/prewarm", json={"images": [f"{repo}:v1"]})).json()
        await mirror.node.ops.jobs.get(job["id"]).task  # done: every blob already cached
        relay.rate = 150_000
        async with mirror.client(headers={"Accept": DOCKER_SCHEMA2}) as client:
            await client.get(f"/v2/{big.repo}/manifests/v1")
            slow = asyncio.create_task(client.get(f"/v2/{big.repo}/blobs/{big.layers[0][0]}"))
            for _ in range(200):
                fetches = list(mirror.node.fetcher.inflight.values())
                if fetches and fetches[0].written > 0:
                    break
                await asyncio.sleep(0.05)
            shot = tmp_path / "status.png"
            await chromium(tmp_path, url + "/", f"--screenshot={shot}")
            dom, stderr = await chromium(tmp_path, url + "/", "--dump-dom")
            relay.rate = None
            assert (await slow).status_code == 200
        assert console_errors(stderr) == []
        assert re.search(r'<body[^>]*data-state="ok"', dom) and '<pre id="script-errors"></pre>' in dom
        assert big.layers[0][0][:19] in dom  # the in-flight row
        assert job["id"][:8] in dom and ">done<" in dom  # the prewarm job
        assert "a warning &lt;b&gt;shown&lt;/b&gt; as text" in dom  # text, never markup
        assert dom.count("<polyline") == 3  # saved, fetched, hit ratio
        assert shot.stat().st_size > 10_000
    finally:
        relay.rate = None
        await runner.cleanup()


async def test_status_json_counts_and_history(mirror, debug_url, upstream, upstream_client) -> None:
    repo = f"status/json-{uuid.uuid4().hex[:6]}"
    image = await images.push_image(upstream_client, upstream.url, repo, "v1")
    await pull(mirror, repo, image)
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"{debug_url}/admin/status")).json()
    # manifest miss, two blob misses, one blob hit
    assert body["cache"]["requests"] == 4 and body["cache"]["served_locally"] == 1
    assert body["cache"]["hit_ratio"] == 0.25
    assert body["link"]["saved"] == len(image.layers[0][1])
    assert body["history"] and body["history"][-1]["requests"] == 4
    assert body["top"][0]["repository"] == repo
    assert body["inflight"] == [] and body["inflight_count"] == 0
    assert body["upstream"]["up"] is True and body["upstream"]["checked_by"] == "traffic"


async def test_upstream_health_from_traffic_else_one_probe(mirror, debug_url, relay) -> None:
    """No traffic: a scrape probes `/v2/` (once a minute at most); a dead link reads 0."""
    async with httpx.AsyncClient() as client:
        first = (await client.get(f"{debug_url}/admin/status")).json()["upstream"]
        await client.get(f"{debug_url}/metrics")
        probes = relay.count("GET", "/v2/")
        relay.down = True
        try:
            mirror_sampler(debug_url)._checked = -math.inf  # as if a minute had passed
            text = (await client.get(f"{debug_url}/metrics")).text
            down = (await client.get(f"{debug_url}/admin/status")).json()["upstream"]
        finally:
            relay.down = False
    assert first["up"] is True and first["checked_by"] == "probe" and first["probe_seconds"] >= 0
    assert probes == 1  # the second scrape, within the minute, did not probe again
    assert "mirror_upstream_up 0.0" in text
    assert down["up"] is False


def test_history_is_per_interval_differences(tmp_path) -> None:
    class Quiet(Sampler):
        def current(self) -> Sample:
            return Sample(300.0, 30, 40, 500, 100)

    sampler = Quiet.__new__(Quiet)
    sampler.samples = __import__("collections").deque(
        [Sample(0.0, 0, 0, 0, 0), Sample(60.0, 0, 0, 0, 0), Sample(120.0, 9, 10, 100, 50)], maxlen=3)
    points = sampler.history()
    assert [p["requests"] for p in points] == [0, 10, 30]
    assert [p["hit_ratio"] for p in points] == [None, 0.9, 0.7]
    assert [p["saved"] for p in points] == [0, 100, 400]


async def test_page_is_guarded_like_the_admin_api(make_mirror, relay) -> None:
    mirror = await make_mirror(relay.url, admin={"token": TOKEN})
    runner, url = await serve_debug(mirror.node)
    basic = "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    try:
        async with httpx.AsyncClient() as client:
            bare = await client.get(f"{url}/")
            bad = "Basic " + base64.b64encode(b"ops:x").decode()
            wrong = await client.get(f"{url}/", headers={"Authorization": bad})
            page = await client.get(f"{url}/", headers={"Authorization": basic})
            by_basic = await client.get(f"{url}/admin/status", headers={"Authorization": basic})
            by_bearer = await client.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"})
            json_bare = await client.get(f"{url}/admin/status")
    finally:
        await runner.cleanup()
    assert bare.status_code == 401 and bare.headers["WWW-Authenticate"].startswith("Basic ")
    assert wrong.status_code == 401
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"admin/status" in page.content
    assert b"http://" not in page.content.replace(b"http://www.w3.org/2000/svg", b"")  # nothing from elsewhere
    assert by_basic.status_code == 200 and by_bearer.status_code == 200
    assert json_bare.status_code == 401 and json_bare.headers["WWW-Authenticate"].startswith("Bearer ")


async def test_a_stalled_upstream_reads_down_within_the_probe_bound(mirror, debug_url, relay, monkeypatch) -> None:
    monkeypatch.setattr("mirror.admin.status.PROBE_TIMEOUT", 0.5)
    relay.paused = True  # accepts, never answers
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            text = (await client.get(f"{debug_url}/metrics")).text
    finally:
        relay.paused = False
    assert "mirror_upstream_up 0.0" in text
