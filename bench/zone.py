"""``python -m bench.run --zone [--quick]``: a zone of nodes (README "Zone"), measured.

Topology (everything on 127.0.0.1)::

    upstream   = distribution 2.8, synthetic images pushed into it
    relay      = one counting relay -> upstream: every node's proxy.remoteurl, so what it
                 counts is the zone's link to the central registry
    node 1..3  = `python -m mirror serve CFG` with mirror.zone (peers: all three)
    round-robin = nginx `upstream` with no hash (what an LVS VIP or a Kubernetes Service does)
    front      = the SHIPPED deploy/nginx/mirror.conf (TLS, digest hash, retries), rendered
                 for loopback ports by tests/support/nginx.py
    node 4     = joins later: every node's peer list rewritten, SIGHUP to nodes 1..3

Figures:

Z1. Fan-in: ``clients`` concurrent clients pull every image of a cold set at once through the
    round-robin balancer (set A) and through the shipped front (set B): zone-wide upstream
    blob bytes / unique blob bytes (target 1.00).
Z2. A 4th node joins; then every image of both sets is pulled again through each of the 4
    nodes directly: upstream blob bytes in that phase (target 0: the new owners copy from the
    peers that hold the objects).
Z3. The owner hop: warm GETs of a small blob, a manifest by digest and a layer, one keep-alive
    client, sequential, at the digest's owner and at a non-owner; median per request.

On a 2-core machine 3 or 4 nodes, two nginx and the clients share the cores: these figures
measure the zone's overhead (bytes on the link, the cost of the hop), not scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench.harness import ROOT, git_state, progress
from bench.nginx import ProcessServer, tree_cpu_seconds
from tests.support.faults import RawClient, pull_image
from tests.support.images import MANIFEST_ACCEPT, Image, make_layer, push_image
from tests.support.nginx import Nginx, make_tls, render_front
from tests.support.procs import ManagedProcess, free_port
from tests.support.registry import Registry
from tests.support.relay import Relay

MiB = 1 << 20
SECRET = "bench-zone-secret"
FRONT = ROOT / "deploy" / "nginx" / "mirror.conf"


@dataclass
class Params:
    quick: bool
    images: int = 4  # per set
    layers: int = 3  # per image, plus one base layer every image of a set shares
    layer_size: int = 4 * MiB
    base_size: int = 8 * MiB
    clients: int = 8
    hop_requests: int = 400  # per measurement (Z3)
    hop_layer_requests: int = 20

    @classmethod
    def make(cls, quick: bool) -> Params:
        if quick:
            return cls(quick=True, images=3, layers=2, layer_size=1 * MiB, base_size=2 * MiB,
                       clients=4, hop_requests=150, hop_layer_requests=8)
        return cls(quick=False)


# --------------------------------------------------------------------------- processes


class ZoneNode(ProcessServer):
    """A node process with `mirror.zone`; its peer list can be rewritten and SIGHUPed in."""

    def __init__(self, parent: Path, index: int, port: int, relay: Relay) -> None:
        self.name = f"node {index}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"zone-node{index}-", dir=parent))
        self.port = port
        self.relay = relay
        self.config_path = self.dir / "config.yml"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.process = ManagedProcess(
            [sys.executable, "-m", "mirror", "serve", str(self.config_path)],
            env=env, inherit_env=False, cwd=ROOT, log_dir=self.dir, name=f"node{index}")

    def write_config(self, peers: list[str]) -> None:
        config = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "storage")}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
            "proxy": {"remoteurl": self.relay.url},
            "mirror": {"tag_ttl": "300s", "workers": 1,
                       "zone": {"self": self.url, "peers": peers, "secret": SECRET}},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def reload(self) -> None:
        """SIGHUP: the node re-reads its peer list."""
        os.kill(self.pid, signal.SIGHUP)


class RoundRobin(ProcessServer):
    """nginx with a plain round-robin `upstream` (no hash): an LVS VIP / Kubernetes Service."""

    name = "round-robin nginx"

    def __init__(self, parent: Path, nodes: list[ZoneNode]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rr-", dir=parent))
        self.port = free_port()
        servers = "".join(f"        server 127.0.0.1:{n.port};\n" for n in nodes)
        temp = "".join(f"    {k}_temp_path {self.dir / k};\n"
                       for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"daemon off;\n{user}worker_processes 1;\npid {self.dir / 'nginx.pid'};\n"
            f"error_log {self.dir / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log off;\n{temp}"
            f"    upstream zone {{\n{servers}        keepalive 32;\n    }}\n"
            f"    server {{\n        listen 127.0.0.1:{self.port};\n"
            "        client_max_body_size 0;\n        proxy_buffering off;\n"
            "        proxy_request_buffering off;\n        proxy_http_version 1.1;\n"
            '        proxy_set_header Connection "";\n        proxy_read_timeout 600s;\n'
            "        location / { proxy_pass http://zone; }\n    }\n}\n")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = ManagedProcess(
            [binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
             "-e", str(self.dir / "error.log")], log_dir=self.dir, name="rr-nginx")


# --------------------------------------------------------------------------- content and pulls


@dataclass
class ImageSet:
    images: list[Image] = field(default_factory=list)

    @property
    def blobs(self) -> dict[str, int]:
        """digest -> size of every distinct blob (configs and layers) of the set."""
        return {d: len(b) for im in self.images for d, b in im.blobs.items()}


async def push_set(base: str, name: str, p: Params) -> ImageSet:
    nonce = time.time_ns()
    shared = make_layer(f"{name}-base-{nonce}", p.base_size)
    out = ImageSet()
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        for i in range(p.images):
            out.images.append(await push_image(
                client, base, f"zone/{name}-{i}", "v1",
                layers=[shared] + [p.layer_size] * p.layers, seed=f"{name}-{i}-{nonce}"))
    return out


async def pull_verified(client: httpx.AsyncClient, image: Image) -> int:
    """Manifest by tag, then every blob, each checked against its digest; returns bytes."""
    r = await client.get(f"/v2/{image.repo}/manifests/{image.tag}",
                         headers={"Accept": MANIFEST_ACCEPT})
    if r.status_code != 200 or r.content != image.manifest:
        raise RuntimeError(f"{image.repo}: manifest {r.status_code}")
    got = 0
    for digest in image.blobs:
        r = await client.get(f"/v2/{image.repo}/blobs/{digest}")
        if r.status_code != 200 or "sha256:" + hashlib.sha256(r.content).hexdigest() != digest:
            raise RuntimeError(f"{image.repo}: blob {digest[:19]} {r.status_code}")
        got += len(r.content)
    return got


async def fan_in(base: str, images: ImageSet, clients: int, verify: ssl.SSLContext | bool) -> int:
    """`clients` clients at once, each pulling every image of the set; bytes received."""
    async def one(k: int) -> int:
        order = images.images[k % len(images.images):] + images.images[:k % len(images.images)]
        async with httpx.AsyncClient(base_url=base, verify=verify, timeout=600,
                                     trust_env=False) as client:
            return sum([await pull_verified(client, im) for im in order])

    return sum(await asyncio.gather(*(one(k) for k in range(clients))))


async def timed_gets(port: int, path: str, n: int,
                     headers: dict[str, str] | None = None) -> list[float]:
    """Seconds per GET, `n` sequential GETs on one keep-alive connection (after 5 warm-ups)."""
    client = RawClient(port)
    times = []
    try:
        for i in range(n + 5):
            t = time.perf_counter()
            got = await client.get(path, headers)
            if got.status != 200 or not got.whole:
                raise RuntimeError(f"GET {path} on :{port}: {got.status}")
            if i >= 5:
                times.append(time.perf_counter() - t)
    finally:
        await client.close()
    return times


# --------------------------------------------------------------------------- the scenario


def owner_of(digest: str, nodes: list[ZoneNode]) -> ZoneNode:
    """The node the zone makes the digest's owner (its own rendezvous order, all peers up)."""
    from mirror.zone.rendezvous import ranked  # the zone's hashing, not a copy of it

    first = ranked([n.url for n in nodes], digest)[0]
    return next(n for n in nodes if n.url == first)


@dataclass
class Results:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # figure, rr, front, target
    notes: list[str] = field(default_factory=list)


class ZoneBench:
    def __init__(self, p: Params, stack: ExitStack) -> None:
        self.p = p
        self.stack = stack
        self.out = Results()
        self.tmp = Path(tempfile.mkdtemp(prefix="mirror-zone-bench-"))
        stack.callback(shutil.rmtree, self.tmp, True)

    def setup(self) -> None:
        progress(f"zone: upstream, relay, 3 nodes, round-robin nginx, shipped front in {self.tmp}")
        self.upstream = Registry(self.tmp, log_level="warn", access_log=False, name="upstream")
        self.stack.callback(self.upstream.close)
        self.upstream.start()
        self.relay = Relay(self.upstream.url)
        self.relay.start()
        self.stack.callback(self.relay.stop)
        self.nodes = [self._node(i) for i in (1, 2, 3)]
        peers = [n.url for n in self.nodes]
        for node in self.nodes:
            node.write_config(peers)
            node.start()
        self.rr = RoundRobin(self.tmp, self.nodes)
        self.stack.callback(self.rr.close)
        self.rr.start()
        tls = make_tls(self.tmp / "tls")
        self.front_port, http_port = free_port(), free_port()
        site = render_front(FRONT.read_text(), https_port=self.front_port, http_port=http_port,
                            servers=[f"127.0.0.1:{n.port}" for n in self.nodes],
                            cert=tls.cert, key=tls.key)
        self.front = Nginx(self.tmp / "front", site)
        self.front.check()
        self.stack.callback(self.front.stop)
        self.front.start(self.front_port, http_port)
        self.tls = ssl.create_default_context(cafile=tls.ca)
        progress("pushing two image sets")
        self.set_a = asyncio.run(push_set(self.upstream.url, "a", self.p))
        self.set_b = asyncio.run(push_set(self.upstream.url, "b", self.p))
        self.relay.reset()

    def _node(self, index: int) -> ZoneNode:
        node = ZoneNode(self.tmp, index, free_port(), self.relay)
        self.stack.callback(node.close)
        return node

    def upstream_blob_bytes(self) -> int:
        self.relay.wait_idle(timeout=120)
        return self.relay.bytes_sent("/blobs/", method="GET")

    def cpu(self) -> float:
        return sum(tree_cpu_seconds(n.pid) for n in self.nodes)

    def fan_in(self, base: str, images: ImageSet,
               verify: ssl.SSLContext | bool) -> tuple[str, float]:
        self.relay.reset()
        cpu, t = self.cpu(), time.monotonic()
        received = asyncio.run(fan_in(base, images, self.p.clients, verify))
        wall, cpu = time.monotonic() - t, self.cpu() - cpu
        unique = sum(images.blobs.values())
        sent = self.upstream_blob_bytes()
        gets = self.relay.count("GET", "/blobs/")
        ratio = sent / unique
        self.out.notes.append(
            f"fan-in via {base}: {self.p.clients} clients x {len(images.images)} images, "
            f"{received / MiB:.0f} MiB served in {wall:.1f} s, zone CPU {cpu:.1f} s; "
            f"{gets} upstream blob GETs for {len(images.blobs)} blobs")
        return f"{ratio:.2f} ({sent / MiB:.1f} of {unique / MiB:.1f} MiB; {gets} GETs / "\
               f"{len(images.blobs)} blobs)", ratio

    def z1(self) -> None:
        progress("Z1: fan-in through round-robin (set A) and the shipped front (set B)")
        rr, ratio_rr = self.fan_in(self.rr.url, self.set_a, False)
        front_url = f"https://localhost:{self.front_port}"
        front, ratio_front = self.fan_in(front_url, self.set_b, self.tls)
        met = "✅" if max(ratio_rr, ratio_front) <= 1.0 + 1e-9 else "❌"
        self.out.rows.append((f"Z1. zone-wide upstream blob bytes / unique blob bytes, "
                              f"{self.p.clients} clients pulling every image at once, cold",
                              rr, front, f"1.00 {met}"))

    def z2(self) -> None:
        progress("Z2: a 4th node joins (peer lists rewritten, SIGHUP); all pulled via every node")
        node4 = self._node(4)
        self.nodes.append(node4)
        peers = [n.url for n in self.nodes]
        for node in self.nodes:
            node.write_config(peers)
        node4.start()
        for node in self.nodes[:3]:
            node.reload()
        time.sleep(2.0)  # SIGHUP is handled asynchronously; the reload itself takes ms
        self.relay.reset()
        t = time.monotonic()
        images = self.set_a.images + self.set_b.images

        async def every_node() -> list[str]:
            failures = []
            for node in self.nodes:
                for im in images:
                    pulled = await pull_image(node.port, im.repo, "v1", timeout=300)
                    if not pulled.ok:
                        failures.append(f"{node.name} {im.repo}: {pulled.error}")
            return failures

        failures = asyncio.run(every_node())
        wall = time.monotonic() - t
        extra = self.upstream_blob_bytes()
        total = sum(self.set_a.blobs.values()) + sum(self.set_b.blobs.values())
        self.out.notes.append(
            f"after the join: {len(images)} images pulled through each of 4 nodes in {wall:.1f} s"
            f" ({len(failures)} failed pulls{': ' + '; '.join(failures[:3]) if failures else ''});"
            f" {self.relay.count('GET', '/blobs/')} upstream blob GETs,"
            f" {self.relay.count(None, '/manifests/')} manifest requests (tags revalidated"
            f" by a node that never saw them)")
        met = "✅" if extra == 0 and not failures else "❌"
        self.out.rows.append((
            f"Z2. a 4th node joins (peers + SIGHUP), then both sets ({total / MiB:.0f} MiB) pulled"
            " again through each of the 4 nodes: extra upstream blob bytes",
            f"{extra} B", "(same zone)", f"0 {met}"))

    def z3(self) -> None:
        progress("Z3: the owner hop, warm GETs at the owner vs at a non-owner")
        image = self.set_a.images[0]
        small = image.config_digest
        layer = image.layers[-1][0]
        cases = [
            ("warm small blob GET (config, "
             f"{len(image.config)} B)", small, f"/v2/{image.repo}/blobs/{small}", None,
             self.p.hop_requests),
            ("warm manifest GET by digest", image.digest,
             f"/v2/{image.repo}/manifests/{image.digest}", {"Accept": MANIFEST_ACCEPT},
             self.p.hop_requests),
            (f"warm layer GET ({len(image.layers[-1][1]) / MiB:.0f} MiB)", layer,
             f"/v2/{image.repo}/blobs/{layer}", None, self.p.hop_layer_requests),
        ]
        for label, digest, path, headers, n in cases:
            owner = owner_of(digest, self.nodes)
            other = next(node for node in self.nodes if node is not owner)
            rounds_owner: list[float] = []
            rounds_other: list[float] = []
            for _ in range(2):  # alternate, so drift in the machine's load hits both
                rounds_owner += asyncio.run(timed_gets(owner.port, path, n // 2, headers))
                rounds_other += asyncio.run(timed_gets(other.port, path, n // 2, headers))
            at_owner = statistics.median(rounds_owner) * 1000
            at_other = statistics.median(rounds_other) * 1000
            self.out.rows.append((
                f"Z3. {label}, one client, sequential, median of {n}",
                f"owner {at_owner:.2f} ms, non-owner {at_other:.2f} ms",
                f"hop {at_other - at_owner:+.2f} ms/request ({at_other / at_owner:.1f}x)",
                "stated"))
        self.relay.reset()


def render(b: ZoneBench, elapsed: float) -> str:
    out = [f"## mirror zone benchmark{' (--quick)' if b.p.quick else ''}", "",
           "| figure | round-robin (LVS / Service) | shipped nginx front | target |",
           "|---|---|---|---|"]
    out += [f"| {a} | {r} | {f} | {t} |" for a, r, f, t in b.out.rows]
    la = os.getloadavg()
    out += ["", "Notes:", "",
            f"- host: {os.cpu_count()} CPUs (load average at the end {la[0]:.2f} / {la[1]:.2f} / "
            f"{la[2]:.2f}); total run {elapsed:.0f} s; mirror code: {git_state()}",
            "- every node, both nginx and the clients share these cores: the figures are the "
            "zone's overhead (link bytes, the hop's cost), not its scaling",
            f"- sets: {b.p.images} images each, {b.p.layers} x {b.p.layer_size // MiB} MiB "
            f"layers + a {b.p.base_size // MiB} MiB base layer shared by the set's images"]
    out += [f"- {n}" for n in b.out.notes]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run --zone",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke version (< 2 min)")
    ap.add_argument("--out", metavar="FILE.md", help="also write the table to this file")
    args = ap.parse_args(argv)
    p = Params.make(args.quick)
    t0 = time.monotonic()
    with ExitStack() as stack:
        b = ZoneBench(p, stack)
        b.setup()
        for figure in (b.z1, b.z2, b.z3):
            figure()
        report = render(b, time.monotonic() - t0)
        for node in b.nodes:
            if node.log_text().strip():
                print(f"--- {node.name} log tail ---\n{node.log_text()[-2000:]}", file=sys.stderr)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    progress(f"done in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
