"""Orchestration: one upstream, four ways to reach it, seven figures side by side.

Topology (everything on 127.0.0.1)::

    upstream  = distribution 2.8 (plain registry), synthetic content pushed into it
    relay_m   = counting/shaping relay -> upstream      mirror's proxy.remoteurl
    relay_d   = counting/shaping relay -> upstream      distribution proxy's remoteurl
    relay_n   = counting/shaping relay -> upstream      nginx proxy_cache's upstream
    relay_x   = counting/shaping relay -> upstream      "direct" client path
    mirror    = `python -m mirror serve CFG`            (subprocess)
    distproxy = `docker-registry serve CFG` in proxy mode (subprocess)
    nginx     = nginx `proxy_cache` + `proxy_cache_lock` (subprocess, bench.nginx)

Relays run as threads of this process; every client workload runs in spawned child
processes (bench.load), so the load generator never shares a GIL with the relays.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from bench.load import MANIFEST_ACCEPT, job_cold_blob, job_load, job_pull, run_jobs
from bench.nginx import NginxCache, ProcessServer, tree, tree_cpu_seconds, tree_pss
from tests.support.images import push_image
from tests.support.procs import ManagedProcess, free_port
from tests.support.registry import Registry
from tests.support.relay import Relay

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SPAWN_LEAD = 1.0  # seconds between starting job processes and their synchronized start


# --------------------------------------------------------------------------- parameters


@dataclass
class Params:
    quick: bool
    blob_size: int  # figures 1, 2, 5
    clients: int = 16  # figure 1, 2
    layers: int = 8  # figure 3: 8 x 8 MiB = a 64 MiB image
    layer_size: int = 8 * MiB
    pull_parallel: int = 3
    pull_repeats: int = 3  # loopback cold pulls (median); shaped: 1
    load_conns: int = 32  # figure 4
    load_procs: int = 2
    warmup: float = 1.0
    duration: float = 5.0
    blob_conns: int = 8  # figure 5
    blob_rounds: int = 2
    first_serve_rounds: int = 5  # figure 7: node restarts, each a first serve then later serves
    big_size: int = 512 * MiB  # figure 6
    big_clients: int = 4
    rate: float = 25e6  # 200 Mbit/s
    latency: float = 0.020
    tag_ttl: str = "300s"
    workers: int | None = None  # mirror.workers; None: the node's default (auto, the CPUs available)

    @classmethod
    def make(cls, quick: bool) -> Params:
        if quick:
            return cls(quick=True, blob_size=16 * MiB, layer_size=1 * MiB, pull_repeats=1,
                       warmup=0.5, duration=2.0, blob_rounds=1, big_size=128 * MiB,
                       first_serve_rounds=3)
        return cls(quick=False, blob_size=64 * MiB)


# --------------------------------------------------------------------------- helpers

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt_size(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.0f} GiB"


class PssMonitor:
    """Polls the PSS of a process tree every ``interval`` seconds in a thread; keeps the max."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            pss = tree_pss(self.pid)
            if pss:
                self.peak = max(self.peak, pss)
                self.samples += 1
                self.processes = max(self.processes, len(tree(self.pid)))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def window_records(relay: Relay, t0: float, t1: float) -> list[Any]:
    return [r for r in relay.records if t0 <= r.started_at < t1]


def by_method(relay: Relay, path_contains: str | None = None) -> Counter[str]:
    return Counter(r.method for r in relay.records
                   if path_contains is None or path_contains in r.path_qs)


def methods_str(c: Counter[str]) -> str:
    return ", ".join(f"{m} {n}" for m, n in sorted(c.items())) or "none"


# --------------------------------------------------------------------------- servers


class MirrorServer(ProcessServer):
    """`python -m mirror serve CFG` with a config written into its own directory."""

    name = "mirror"

    def __init__(self, parent: Path, relay: Relay, tag_ttl: str, workers: int | None = None) -> None:
        self.relay = relay
        self.workers = workers if workers is not None else default_workers()
        self.dir = Path(tempfile.mkdtemp(prefix="mirror-", dir=parent))
        self.port = free_port()
        self.config = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "storage")}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
            "proxy": {"remoteurl": relay.url},
            "mirror": {"tag_ttl": tag_ttl, **({} if workers is None else {"workers": workers})},
        }
        self.config_path = self.dir / "config.yml"
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.process = ManagedProcess(
            [sys.executable, "-m", "mirror", "serve", str(self.config_path)],
            env=env, inherit_env=False, cwd=ROOT, log_dir=self.dir, name="mirror")

    def start(self) -> Self:
        """Started when every worker listens (the first one answering is not enough to measure)."""
        super().start()
        deadline = time.monotonic() + 120
        while self.workers > 1 and listening_children(self.pid, self.port) < self.workers:
            assert time.monotonic() < deadline, f"mirror workers not all listening: {self.log_text()[-2000:]}"
            assert self.process.poll() is None, self.log_text()[-2000:]
            time.sleep(0.1)
        return self


def default_workers() -> int:
    """What `mirror.workers: auto` comes to on this machine."""
    from mirror.workers import available_cpus

    return available_cpus()


def listening_children(pid: int, port: int) -> int:
    """How many of `pid`'s children hold a socket listening on `port` (the node's workers)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    count = 0
    for child in tree(pid)[1:]:
        try:
            links = {os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
        except OSError:
            continue
        count += any(f"socket:[{inode}]" in links for inode in inodes)
    return count


class DistProxy:
    """distribution 2.8 in proxy mode (tests.support.registry.Registry)."""

    name = "distribution proxy"

    def __init__(self, parent: Path, relay: Relay) -> None:
        self.relay = relay
        self.reg = Registry(parent, proxy_remoteurl=relay.url, log_level="warn",
                            access_log=False, name="distproxy")

    @property
    def url(self) -> str:
        return self.reg.url

    @property
    def pid(self) -> int:
        assert self.reg.process.pid is not None
        return self.reg.process.pid

    def start(self) -> DistProxy:
        self.reg.start()
        return self

    def restart(self) -> None:
        self.reg.restart()

    def log_text(self) -> str:
        return self.reg.process.log_text()

    def close(self) -> None:
        self.reg.close()


Server = MirrorServer | DistProxy | NginxCache


def _rps(r: dict[str, Any]) -> str:
    """A load figure's cell: req/s, req/s per core of the server's own CPU, upstream calls."""
    per_core = r["rps"] / r["server_cpu"] if r["server_cpu"] else 0.0
    return f"{r['rps']:.0f}/s ({per_core:.0f}/s per core; {r['upstream']} upstream)"


# --------------------------------------------------------------------------- content


def chunk_for(seed_block: bytes, i: int) -> bytes:
    return struct.pack(">Q", i) + seed_block[8:]


async def push_streamed_blob(client: httpx.AsyncClient, base: str, repo: str, size: int,
                             seed: str) -> str:
    """Push ``size`` pseudo-random bytes without holding them: one streamed (chunked
    transfer-encoding) PATCH, hashing on the fly, then ``PUT ?digest=``."""
    block = random.Random(seed).randbytes(MiB)
    hasher = hashlib.sha256()

    async def body():  # type: ignore[no-untyped-def]
        sent, i = 0, 0
        while sent < size:
            chunk = chunk_for(block, i)[: size - sent]
            hasher.update(chunk)
            sent += len(chunk)
            i += 1
            yield chunk

    r = await client.post(f"{base}/v2/{repo}/blobs/uploads/")
    if r.status_code != 202:
        raise RuntimeError(f"start upload: {r.status_code} {r.text[:200]}")
    loc = r.url.join(r.headers["Location"])
    r = await client.patch(loc, content=body(), headers={"Content-Type": "application/octet-stream"})
    if r.status_code != 202:
        raise RuntimeError(f"streamed PATCH: {r.status_code} {r.text[:200]}")
    loc = r.url.join(r.headers["Location"])
    digest = "sha256:" + hasher.hexdigest()
    r = await client.put(loc.copy_merge_params({"digest": digest}))
    if r.status_code != 201:
        raise RuntimeError(f"PUT ?digest=: {r.status_code} {r.text[:200]}")
    return digest


@dataclass
class Content:
    blob1: str = ""  # figure 1 (+5)
    blob2: str = ""  # figure 2
    big: str = ""  # figure 6
    loop_images: list[tuple[str, str, str]] = field(default_factory=list)  # (repo, tag, digest)
    shaped_image: tuple[str, str, str] = ("", "", "")


BLOB_REPO = "bench/blobs"


async def push_content(base: str, p: Params) -> Content:
    c = Content()
    nonce = f"{time.time_ns()}"  # fresh digests every run (nothing is cached anywhere anyway)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), trust_env=False) as client:
        c.blob1 = await push_streamed_blob(client, base, BLOB_REPO, p.blob_size, f"b1-{nonce}")
        c.blob2 = await push_streamed_blob(client, base, BLOB_REPO, p.blob_size, f"b2-{nonce}")
        for i in range(p.pull_repeats):
            repo = f"bench/img-loop-{i}"
            im = await push_image(client, base, repo, "v1", layers=[p.layer_size] * p.layers,
                                  seed=f"loop-{i}-{nonce}")
            c.loop_images.append((repo, "v1", im.digest))
        im = await push_image(client, base, "bench/img-shaped", "v1",
                              layers=[p.layer_size] * p.layers, seed=f"shaped-{nonce}")
        c.shaped_image = ("bench/img-shaped", "v1", im.digest)
        progress(f"pushing the {fmt_size(p.big_size)} blob (streamed)")
        c.big = await push_streamed_blob(client, base, BLOB_REPO, p.big_size, f"big-{nonce}")
    return c


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    figure: str
    dist: str = "-"
    mirror: str = "-"
    nginx: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None


class Bench:
    def __init__(self, p: Params, stack: ExitStack) -> None:
        self.p = p
        self.stack = stack
        self.rows: list[Row] = []
        self.notes: list[str] = []
        la = os.getloadavg()
        self.load_at_start = f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}"
        self.tmp = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
        stack.callback(shutil.rmtree, self.tmp, True)

    # -- setup
    def setup(self) -> None:
        p = self.p
        progress(f"starting upstream (distribution) in {self.tmp}")
        self.upstream = Registry(self.tmp, log_level="warn", access_log=False, name="upstream")
        self.stack.callback(self.upstream.close)
        self.upstream.start()
        self.relay_m = self._relay()
        self.relay_d = self._relay()
        self.relay_n = self._relay()
        self.relay_x = self._relay()
        progress("starting mirror, distribution proxy and nginx")
        self.mirror = MirrorServer(self.tmp, self.relay_m, p.tag_ttl, p.workers)
        self.stack.callback(self.mirror.close)
        self.mirror.start()
        self.dist = DistProxy(self.tmp, self.relay_d)
        self.stack.callback(self.dist.close)
        self.dist.start()
        self.nginx = NginxCache(self.tmp, self.relay_n, p.tag_ttl)
        self.stack.callback(self.nginx.close)
        self.nginx.start()
        self.servers: list[Server] = [self.mirror, self.dist, self.nginx]
        progress(f"pushing synthetic content to upstream {self.upstream.url}")
        self.c = asyncio.run(push_content(self.upstream.url, p))
        for r in (self.relay_m, self.relay_d, self.relay_n, self.relay_x):
            r.reset()
        progress("setup done")

    def _relay(self) -> Relay:
        relay = Relay(self.upstream.url)
        relay.start()
        self.stack.callback(relay.stop)
        return relay

    def shape(self, on: bool) -> None:
        for r in (self.relay_m, self.relay_d, self.relay_n, self.relay_x):
            r.rate = self.p.rate if on else None
            r.latency = self.p.latency if on else 0.0

    def reset_relays(self) -> None:
        for r in (self.relay_m, self.relay_d, self.relay_n, self.relay_x):
            r.wait_idle(timeout=120)
            r.reset()

    def run_figure(self, name: str, fn: Callable[[], None], n_rows: int = 1) -> None:
        t = time.monotonic()
        progress(f"== {name}")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the others
            import traceback

            traceback.print_exc()
            self.rows.append(Row(f"{name}", ratio=f"ERROR: {exc!r}"[:300]))
        finally:
            self.shape(False)
        progress(f"   {name} took {time.monotonic() - t:.1f}s")

    # -- figure 1 & 2
    def _cold_blob(self, base: str, digest: str, clients: int, verify: int,
                   timeout: float) -> dict[str, Any]:
        path = f"/v2/{BLOB_REPO}/blobs/{digest}"
        start = time.monotonic() + SPAWN_LEAD
        [res] = run_jobs([(job_cold_blob, (base, path, clients, digest, self.p.blob_size),
                           {"verify": verify, "start_at": start})], timeout=timeout)
        if not res["ok"]:
            raise RuntimeError(f"cold blob via {base}: {res['errors'][:3]}")
        return res

    def fig1(self) -> None:
        p = self.p
        self.reset_relays()
        out: dict[str, tuple[float, Counter[str], int]] = {}
        for srv in self.servers:
            progress(f"   {srv.name}: {p.clients} cold clients, {fmt_size(p.blob_size)} blob")
            res = self._cold_blob(srv.url, self.c.blob1, p.clients, verify=2, timeout=300)
            srv.relay.wait_idle(timeout=120)
            sent = srv.relay.bytes_sent("/blobs/")
            out[srv.name] = (sent / p.blob_size, by_method(srv.relay, "/blobs/"),
                             len(srv.relay.records))
            progress(f"   {srv.name}: {res['wall']:.2f}s, upstream {sent / MiB:.0f} MiB")
        d, m, n = out[self.dist.name], out[self.mirror.name], out[self.nginx.name]
        self.rows.append(Row(
            f"1. upstream bytes / blob size, {p.clients} concurrent cold clients, "
            f"{fmt_size(p.blob_size)} blob (loopback)",
            dist=f"{d[0]:.2f} (blob reqs: {methods_str(d[1])})",
            mirror=f"{m[0]:.2f} (blob reqs: {methods_str(m[1])})",
            nginx=f"{n[0]:.2f} (blob reqs: {methods_str(n[1])})",
            ratio=f"mirror/dist {m[0] / d[0]:.2f}" if d[0] else "-",
            target="1.00", met=abs(m[0] - 1.0) < 0.005))

    def fig2(self) -> None:
        p = self.p
        self.reset_relays()
        self.shape(True)
        one_s = p.blob_size / p.rate
        progress(f"   reference: one direct GET over the shaped link (~{one_s:.1f}s)")
        ref = self._cold_blob(self.relay_x.url, self.c.blob2, 1, verify=1, timeout=one_s * 5 + 60)
        t_ref = ref["wall"]
        walls: dict[str, float] = {}
        ups: dict[str, float] = {}
        for srv in self.servers:
            progress(f"   {srv.name}: {p.clients} cold clients over the shaped link")
            # distribution fetches once per client (+1): allow for it
            res = self._cold_blob(srv.url, self.c.blob2, p.clients, verify=2,
                                  timeout=one_s * (p.clients + 2) * 2 + 120)
            walls[srv.name] = res["wall"]
            srv.relay.wait_idle(timeout=one_s * 4 + 60)
            ups[srv.name] = srv.relay.bytes_sent("/blobs/") / p.blob_size
            progress(f"   {srv.name}: {res['wall']:.2f}s ({ups[srv.name]:.2f}x blob upstream)")
        d, m, n = walls[self.dist.name], walls[self.mirror.name], walls[self.nginx.name]
        link = f"{p.rate * 8 / 1e6:.0f} Mbit/s + {p.latency * 1000:.0f} ms"
        self.rows.append(Row(
            f"2. same, over {link}: wall time until all {p.clients} have the whole blob",
            dist=f"{d:.2f} s ({d / t_ref:.2f}x one blob; {ups[self.dist.name]:.1f}x bytes)",
            mirror=f"{m:.2f} s ({m / t_ref:.2f}x one blob; {ups[self.mirror.name]:.1f}x bytes)",
            nginx=f"{n:.2f} s ({n / t_ref:.2f}x one blob; {ups[self.nginx.name]:.1f}x bytes)",
            ratio=f"mirror/dist {m / d:.3f}",
            target=f"<= 1.3x one blob ({1.3 * t_ref:.2f} s)", met=m <= 1.3 * t_ref))
        self.rows.append(Row(f"2'. one {fmt_size(p.blob_size)} blob over that link (direct GET, reference)",
                             ratio=f"reference: {t_ref:.2f} s (ideal {one_s:.2f} s)"))

    # -- figure 3
    def _pull(self, base: str, image: tuple[str, str, str], timeout: float) -> dict[str, Any]:
        repo, tag, _ = image
        start = time.monotonic() + SPAWN_LEAD
        [res] = run_jobs([(job_pull, (base, repo, tag), {"parallel": self.p.pull_parallel,
                                                         "verify": True, "start_at": start})],
                         timeout=timeout)
        if not res["ok"]:
            raise RuntimeError(f"pull via {base}: {res['errors'][:3]}")
        return res

    def fig3(self) -> None:
        p = self.p
        size = p.layers * p.layer_size
        img_desc = (f"{p.layers}x{fmt_size(p.layer_size)} ({fmt_size(size)}) image, "
                    f"{p.pull_parallel} blobs at a time")
        for shaped in (False, True):
            self.reset_relays()
            self.shape(shaped)
            images = [self.c.shaped_image] if shaped else self.c.loop_images
            times: dict[str, list[float]] = {"direct": [], **{s.name: [] for s in self.servers}}
            tmo = size / p.rate * 6 + 120
            for image in images:
                for label, base in (("direct", self.relay_x.url), *((s.name, s.url) for s in self.servers)):
                    res = self._pull(base, image, tmo)
                    times[label].append(res["wall"])
                    progress(f"   {'shaped' if shaped else 'loopback'} cold pull {image[0]} "
                             f"{label}: {res['wall']:.3f}s")
            for srv in self.servers:
                srv.relay.wait_idle(timeout=tmo)
            up = {s.name: s.relay.bytes_sent("/blobs/") / (size * len(images)) for s in self.servers}
            med = {k: statistics.median(v) for k, v in times.items()}
            t_dir = med["direct"]

            def cell(name: str) -> str:
                return f"{med[name]:.3f} s ({med[name] / t_dir:.2f}x direct; {up[name]:.1f}x bytes)"

            t_m = med[self.mirror.name]
            where = (f"{p.rate * 8 / 1e6:.0f} Mbit/s + {p.latency * 1000:.0f} ms" if shaped
                     else "loopback")
            n = f", median of {len(images)}" if len(images) > 1 else ""
            self.rows.append(Row(
                f"3{'b' if shaped else 'a'}. cold pull, {img_desc}, {where}{n} "
                f"(direct: {t_dir:.3f} s)",
                dist=cell(self.dist.name), mirror=cell(self.mirror.name), nginx=cell(self.nginx.name),
                ratio=f"mirror/direct {t_m / t_dir:.2f}",
                target="<= 1.3x direct", met=t_m <= 1.3 * t_dir))

    # -- figures 4 & 5
    def _load(self, srv: Server, path: str, headers: list[tuple[str, str]],
              conns: int, procs: int, expect_size: int | None) -> dict[str, Any]:
        p = self.p
        procs = max(1, min(procs, conns))
        per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        start = time.monotonic() + SPAWN_LEAD
        t0, t1 = start + p.warmup, start + p.warmup + p.duration
        meas: dict[str, float] = {}

        def measure() -> None:
            time.sleep(max(0.0, t0 - time.monotonic()))
            meas["cpu0"] = tree_cpu_seconds(srv.pid)
            meas["m0"] = time.monotonic()
            time.sleep(max(0.0, t1 - time.monotonic()))
            meas["cpu1"] = tree_cpu_seconds(srv.pid)
            meas["m1"] = time.monotonic()

        results = run_jobs(
            [(job_load, (srv.url, path, headers, n, start, p.warmup, p.duration),
              {"expect_size": expect_size}) for n in per],
            timeout=SPAWN_LEAD + p.warmup + p.duration + 60, on_started=measure)
        srv.relay.wait_idle(timeout=60)
        upstream = window_records(srv.relay, t0, t1)
        span = p.duration
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        return {
            "rps": sum(r["requests"] for r in results) / span,
            "bps": sum(r["bytes"] for r in results) / span,
            "upstream": len(upstream),
            "upstream_methods": Counter(r.method for r in upstream),
            "client_cpu": sum(r["cpu"] for r in results) / span,
            "server_cpu": (meas["cpu1"] - meas["cpu0"]) / (meas["m1"] - meas["m0"]),
            "errors": dict(errors),
            "procs": procs,
        }

    def fig4(self) -> None:
        p = self.p
        repo, tag, digest = self.c.loop_images[0]
        self.reset_relays()
        res: dict[tuple[str, str], dict[str, Any]] = {}
        for mode, ref in (("tag", tag), ("digest", digest)):
            for srv in self.servers:
                path = f"/v2/{repo}/manifests/{ref}"
                r = self._load(srv, path, [("Accept", MANIFEST_ACCEPT)], p.load_conns,
                               p.load_procs, None)
                res[(mode, srv.name)] = r
                progress(f"   by {mode} {srv.name}: {r['rps']:.0f} req/s, upstream {r['upstream']} "
                         f"({methods_str(r['upstream_methods'])}), server CPU "
                         f"{r['server_cpu'] * 100:.0f}%, client CPU {r['client_cpu'] * 100:.0f}% "
                         f"errors {r['errors'] or 0}")
                self.notes.append(
                    f"fig 4 by {mode}, {srv.name}: server CPU {r['server_cpu'] * 100:.0f}% "
                    f"(100% = one core), load generator CPU {r['client_cpu'] * 100:.0f}% over "
                    f"{r['procs']} process(es), upstream calls in window: "
                    f"{methods_str(r['upstream_methods'])}"
                    + (f", errors {r['errors']}" if r["errors"] else ""))
        for mode in ("tag", "digest"):
            d, m, n = (res[(mode, s.name)] for s in (self.dist, self.mirror, self.nginx))
            self.rows.append(Row(
                f"4{'a' if mode == 'tag' else 'b'}. warm manifest GET by {mode}, req/s, "
                f"{p.load_conns} connections, {p.duration:.0f} s (req/s per core of server CPU; "
                f"upstream calls in window)",
                dist=_rps(d), mirror=_rps(m), nginx=_rps(n),
                ratio=f"mirror/nginx {m['rps'] / n['rps']:.2f}" if n["rps"] else "-",
                target=">= 10,000/s with 0 upstream calls",
                met=m["rps"] >= 10_000 and m["upstream"] == 0))

    def fig5(self) -> None:
        p = self.p
        self.reset_relays()
        path = f"/v2/{BLOB_REPO}/blobs/{self.c.blob1}"
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.servers}
        for rnd in range(p.blob_rounds):  # alternate servers: near the box's limit, noise matters
            for srv in self.servers:
                r = self._load(srv, path, [], p.blob_conns, min(2, p.load_procs), p.blob_size)
                runs[srv.name].append(r)
                progress(f"   round {rnd + 1} {srv.name}: {r['bps'] / 1e6:.0f} MB/s, upstream "
                         f"{r['upstream']}, server CPU {r['server_cpu'] * 100:.0f}%, client CPU "
                         f"{r['client_cpu'] * 100:.0f}%")
        res = {}
        for srv in self.servers:
            rs = runs[srv.name]
            res[srv.name] = statistics.mean(r["bps"] for r in rs)
            errs: Counter[str] = Counter()
            for r in rs:
                errs.update(r["errors"])
            self.notes.append(
                f"fig 5, {srv.name}: rounds "
                + ", ".join(f"{r['bps'] / 1e6:.0f}" for r in rs)
                + f" MB/s; server CPU {statistics.mean(r['server_cpu'] for r in rs) * 100:.0f}%, "
                f"load generator CPU {statistics.mean(r['client_cpu'] for r in rs) * 100:.0f}% over "
                f"{rs[0]['procs']} process(es); upstream calls in windows: "
                f"{sum(r['upstream'] for r in rs)}" + (f", errors {dict(errs)}" if errs else ""))
        d, m, x = res[self.dist.name], res[self.mirror.name], res[self.nginx.name]
        n = f", mean of {p.blob_rounds} alternating runs" if p.blob_rounds > 1 else ""
        self.rows.append(Row(
            f"5. warm blob throughput, {p.blob_conns} clients looping on a {fmt_size(p.blob_size)} "
            f"blob, {p.duration:.0f} s{n}, MB/s (10^6 B/s)",
            dist=f"{d / 1e6:.0f} MB/s", mirror=f"{m / 1e6:.0f} MB/s", nginx=f"{x / 1e6:.0f} MB/s",
            ratio=f"mirror/nginx {m / x:.2f}" if x else "-",
            target=">= nginx", met=m >= x))

    # -- figure 7
    def fig7(self) -> None:
        """The cost of hashing a stored blob on its first serve in a process (bit rot check).

        Each round restarts the node (an empty set of verified digests), then
        times one client's GET of a stored blob (hashed while sent, the tail
        held back until it matched) and then later GETs (plain sendfile). The
        blob is in the page cache for both, so the difference is the hash.
        """
        p = self.p
        path = f"/v2/{BLOB_REPO}/blobs/{self.c.blob1}"
        timed_get(self.mirror.url, path, p.blob_size)  # stored (if figure 1 did not run)
        self.relay_m.wait_idle(timeout=120)
        firsts, laters = [], []
        for rnd in range(p.first_serve_rounds):
            self.mirror.restart()
            firsts.append(timed_get(self.mirror.url, path, p.blob_size))
            laters.append(max(timed_get(self.mirror.url, path, p.blob_size) for _ in range(3)))
            progress(f"   round {rnd + 1}: first serve {firsts[-1] / 1e6:.0f} MB/s, "
                     f"later {laters[-1] / 1e6:.0f} MB/s")
        first, later = statistics.median(firsts), statistics.median(laters)
        self.notes.append(
            "fig 7: first serve rounds " + ", ".join(f"{b / 1e6:.0f}" for b in firsts)
            + " MB/s; later (best of 3 per round) " + ", ".join(f"{b / 1e6:.0f}" for b in laters)
            + " MB/s; one client in the bench process reading into a 1 MiB buffer")
        self.rows.append(Row(
            f"7. warm blob, one client, {fmt_size(p.blob_size)}: first serve after a start (hashed while "
            f"sent) vs later serves (verified), MB/s, median of {p.first_serve_rounds} restarts",
            mirror=f"first {first / 1e6:.0f} MB/s, later {later / 1e6:.0f} MB/s",
            ratio=f"first/later {first / later:.2f}", target="stated (cost of the bit-rot check)"))

    # -- figure 6
    def fig6(self) -> None:
        p = self.p
        self.reset_relays()
        out: dict[str, tuple[int, int, float]] = {}
        for srv in self.servers:
            srv.restart()  # fresh processes: the peak covers start-up + this stream only
            time.sleep(0.5)
            base = tree_pss(srv.pid)
            progress(f"   {srv.name}: {p.big_clients} clients on a cold {fmt_size(p.big_size)} blob "
                     f"(PSS at start {base / MiB:.0f} MiB)")
            path = f"/v2/{BLOB_REPO}/blobs/{self.c.big}"
            start = time.monotonic() + SPAWN_LEAD
            with PssMonitor(srv.pid) as mon:
                [res] = run_jobs([(job_cold_blob, (srv.url, path, p.big_clients, self.c.big,
                                                   p.big_size), {"verify": 1, "start_at": start})],
                                 timeout=600)
                srv.relay.wait_idle(timeout=300)
            if not res["ok"]:
                raise RuntimeError(f"{srv.name}: {res['errors'][:3]}")
            out[srv.name] = (mon.peak, base, res["wall"])
            progress(f"   {srv.name}: {res['wall']:.1f}s, peak PSS {mon.peak / MiB:.0f} MiB "
                     f"over {mon.samples} samples, {mon.processes} process(es)")
            self.notes.append(
                f"fig 6, {srv.name}: peak PSS {mon.peak / MiB:.0f} MiB of {mon.processes} process(es) "
                f"({mon.samples} samples at 100 ms), PSS after start {base / MiB:.0f} MiB, all "
                f"clients done in {res['wall']:.1f} s, upstream "
                f"{srv.relay.bytes_sent('/blobs/') / p.big_size:.1f}x blob")

        def cell(name: str) -> str:
            return f"{out[name][0] / MiB:.0f} MiB ({out[name][1] / MiB:.0f} at start)"

        m = out[self.mirror.name][0]
        self.rows.append(Row(
            f"6. peak whole-server PSS (all processes) streaming a cold {fmt_size(p.big_size)} blob to "
            f"{p.big_clients} clients",
            dist=cell(self.dist.name), mirror=cell(self.mirror.name), nginx=cell(self.nginx.name),
            ratio=f"mirror/nginx {m / out[self.nginx.name][0]:.2f}" if out[self.nginx.name][0] else "-",
            target="<= 150 MiB", met=m <= 150 * MiB))

    # -- report
    def mirror_log_findings(self) -> list[str]:
        """Unique warning/error records of the mirror's log, each with the exception its
        traceback ends with, counted."""
        records: list[list[str]] = []
        for ln in self.mirror.log_text().splitlines():
            if ln.startswith("=== ") or re.match(r"\d{4}-\d\d-\d\d[ T]", ln):
                records.append([ln])
            elif records and ln.strip():
                records[-1].append(ln)
        uniq: Counter[str] = Counter()
        for rec in records:
            head = rec[0].split(" ", 2)[-1]  # drop the timestamp
            if not head.startswith(("WARNING", "ERROR", "CRITICAL")):
                continue
            tail = rec[-1].strip() if len(rec) > 1 else ""
            uniq[(head[:200] + (f" -> {tail[:200]}" if tail else ""))] += 1
        return [f"{n}x {k}" for k, n in uniq.most_common(20)]


def timed_get(base: str, path: str, size: int) -> float:
    """Bytes per second of one GET of a `size`-byte body over a fresh connection."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    buf = bytearray(MiB)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        started = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"GET {path}: closed before headers")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {path}: {head[:40]!r}")
        got = len(head) - head.index(b"\r\n\r\n") - 4
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                raise RuntimeError(f"GET {path}: {got} of {size} bytes, then closed")
            got += n
        return size / (time.monotonic() - started)


def git_state() -> str:
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                           check=False)
        return r.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = [ln for ln in git("status", "--porcelain", "--", "mirror").splitlines() if ln]
    except Exception:  # noqa: BLE001
        return "unknown (no git)"
    return f"git {head}" + (f" + {len(dirty)} uncommitted change(s) under mirror/" if dirty else "")


def render(b: Bench, elapsed: float) -> str:
    p = b.p
    out = [f"## mirror benchmark{' (--quick)' if p.quick else ''}", ""]
    out.append("| figure | distribution proxy | nginx proxy_cache | mirror | ratio | target |")
    out.append("|---|---|---|---|---|---|")
    for r in b.rows:
        mark = "" if r.met is None else (" ✅" if r.met else " ❌")
        out.append(f"| {r.figure} | {r.dist} | {r.nginx} | {r.mirror} | {r.ratio} | {r.target}{mark} |")
    out += ["", "Notes:", ""]
    try:
        dist_version = subprocess.run(["docker-registry", "--version"], capture_output=True,
                                      text=True, timeout=10, check=False).stdout.strip()
    except Exception:  # noqa: BLE001
        dist_version = "?"
    la = os.getloadavg()
    out.append(f"- host: {os.cpu_count()} CPUs (load average at the end {la[0]:.2f} / {la[1]:.2f} / "
               f"{la[2]:.2f}; at the start {b.load_at_start}), {platform.python_implementation()} "
               f"{platform.python_version()}, {dist_version}; total run {elapsed:.0f} s")
    out.append(f"- mirror code: {git_state()}")
    out.append("- upstream = distribution 2.8 on loopback; each of mirror / distribution proxy / "
               "nginx proxy_cache (bench/nginx.py: proxy_cache_lock, worker_processes auto) / "
               "direct reaches it through its own counting relay (a Python aiohttp relay in the "
               "bench process), shaped by a shared token bucket when a link is given; 'direct' "
               "goes through the same kind of relay, so the relay hop is in every path")
    out.append(f"- load generator: raw HTTP/1.1 keep-alive client on asyncio BufferedProtocol, "
               f"in {p.load_procs} spawned process(es) for fig 4; mirror tag_ttl {p.tag_ttl}, "
               f"log level warn")
    chosen = f"mirror.workers {p.workers}" if p.workers else "the default, auto: the CPUs available"
    out.append(f"- mirror workers: {b.mirror.workers} ({chosen}); per core = req/s divided by the CPU "
               "the server's whole process tree used in the window")
    out += [f"- {n}" for n in b.notes]
    findings = b.mirror_log_findings()
    if findings:
        out.append("- mirror log (warn level), unique lines:")
        out += [f"    - `{f}`" for f in findings]
    else:
        out.append("- mirror log (warn level): no warnings or errors")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke version (< 1.5 min)")
    ap.add_argument("--out", metavar="FILE.md", help="also write the table to this file")
    ap.add_argument("--load-procs", type=int, default=None,
                    help="load generator processes for fig 4 (default 2)")
    ap.add_argument("--only", default="1234567", help="figures to run, e.g. 14 (default all)")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="mirror.workers for the node (default: the node's own default, auto)")
    args = ap.parse_args(argv)
    p = Params.make(args.quick)
    if args.workers is not None and args.workers < 1:
        ap.error("--workers: 1 or more")
    p.workers = args.workers
    if args.load_procs:
        p.load_procs = args.load_procs
    t0 = time.monotonic()
    with ExitStack() as stack:
        b = Bench(p, stack)
        b.setup()
        figures = {"1": ("figure 1: cold fan-in bytes", b.fig1),
                   "2": ("figure 2: cold fan-in over a shaped link", b.fig2),
                   "3": ("figure 3: cold pull vs direct", b.fig3),
                   "4": ("figure 4: warm manifests req/s", b.fig4),
                   "5": ("figure 5: warm blob MB/s", b.fig5),
                   "6": ("figure 6: peak RSS on a cold big blob", b.fig6),
                   "7": ("figure 7: warm blob MB/s, first serve (hashed) vs later", b.fig7)}
        for k, (name, fn) in figures.items():
            if k in args.only:
                b.run_figure(name, fn)
        report = render(b, time.monotonic() - t0)
        mlog = b.mirror.log_text()
        if mlog.strip():
            print("--- mirror log tail ---\n" + mlog[-3000:], file=sys.stderr)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    progress(f"done in {time.monotonic() - t0:.0f}s")
    return 0
