"""``python -m bench.soak [--seconds 60]``: pull under chaos, then re-verify the store.

Everything runs on 127.0.0.1: a real distribution 2.8 upstream, the fault relay
(``tests/support/faults.py``) in front of it, and the node as a subprocess
(``python -m mirror serve CFG``). For ``--seconds``, ``--clients`` concurrent
clients pull a mix of images (by tag and by digest; new "releases" are pushed
all along, so fresh content keeps crossing the faulty link) while a chaos loop
cuts the upstream and restores it, injects faults (resets mid-blob, corrupted
or padded bytes, stalls, 429/503, HTML pages) and kills the node with SIGKILL
and restarts it. Clients verify every digest.

At the end the chaos stops, the node is stopped, every stored object is
re-hashed against its name and the metadata checked against the files
(:func:`tests.support.faults.check_store`), the node is started again and
every image is pulled once more. The one line printed last is the result;
the exit status is non-zero if any client received complete-looking wrong
bytes, the store check found a problem, or the final pulls failed.

Bounded: ``--seconds`` of chaos (plus setup and the final check) and at
most ``--max-pulls`` pulls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import faults as F
from tests.support import images
from tests.support.faults import FaultRelay, NodeProcess, check_store, pull_image, raise_nofile
from tests.support.registry import Registry

MiB = 1 << 20


@dataclass
class Stats:
    pulls: int = 0
    pulls_ok: int = 0
    requests: int = 0
    bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    chaos: Counter[str] = field(default_factory=Counter)
    images: int = 0


@dataclass
class Pushed:
    repo: str
    tag: str
    digest: str


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def push_release(client: httpx.AsyncClient, upstream: Registry, rng: random.Random, n: int) -> Pushed:
    """A new image with fresh layers (256 KiB - 3 MiB), as a team releasing."""
    repo = f"soak/team{n % 4}/app{n % 3}"
    tag = f"r{n}"
    sizes = [rng.choice([256 * 1024, 512 * 1024, MiB, 3 * MiB]) for _ in range(rng.randint(1, 3))]
    layers = [images.make_layer(f"soak-{uuid.uuid4()}", size, compresslevel=0) for size in sizes]
    image = await images.push_image(client, upstream.url, repo, tag, layers=layers)
    return Pushed(repo, tag, image.digest)


def error_kind(error: str | None) -> str:
    if error is None:
        return "unknown"
    if error.startswith(("ConnectionRefused", "ConnectionResetError", "OSError")) or "Connect" in error:
        return "connection refused/reset (node down)"
    if "TimeoutError" in error:
        return "client timeout"
    if error.startswith(("manifest: ", "blob ")):
        status = error.split(": ", 1)[1].split(",")[0]
        return f"{error.split()[0].rstrip(':')} {status}" + (" (aborted short)" if status == "200" else "")
    return error.split("(")[0]


async def client_loop(port_of: Any, catalog: list[Pushed], stats: Stats, rng: random.Random,
                      stop: asyncio.Event, max_pulls: int) -> None:
    while not stop.is_set() and stats.pulls < max_pulls:
        recent = catalog[-6:]
        image = rng.choice(recent if rng.random() < 0.8 else catalog)
        reference = image.digest if rng.random() < 0.3 else image.tag
        result = await pull_image(port_of(), image.repo, reference, timeout=20.0)
        stats.pulls += 1
        stats.requests += result.requests
        stats.bytes += result.bytes
        stats.wrong.extend(result.wrong)
        if result.ok:
            stats.pulls_ok += 1
        else:
            stats.errors[error_kind(result.error)] += 1
            await asyncio.sleep(rng.uniform(0.05, 0.3))


FAULTS = [
    ("reset mid-blob", lambda rng: F.reset(rng.randint(1, 2 * MiB)), "/blobs/"),
    ("reset near the end", lambda rng: F.reset(-rng.randint(1, 70_000)), "/blobs/"),
    ("corrupt byte", lambda rng: F.corrupt(rng.randint(0, 200_000)), "/blobs/"),
    ("padded blob", lambda rng: F.pad(rng.randint(1, 100_000)), "/blobs/"),
    ("short blob", lambda rng: F.short(rng.randint(1, 1000)), "/blobs/"),
    ("truncated blob", lambda rng: F.truncate(rng.randint(1, 100_000)), "/blobs/"),
    ("stall", lambda rng: F.stall(rng.randint(0, 300_000)), "/blobs/"),
    ("html page", lambda rng: F.html(), ""),
    ("429", lambda rng: F.status(429, retry_after=1), ""),
    ("503", lambda rng: F.status(503), ""),
    ("huge manifest", lambda rng: F.huge_manifest(5 * MiB, announce=rng.random() < 0.5), "/manifests/"),
    ("dropped", lambda rng: F.drop(), ""),
]


async def chaos_loop(node: NodeProcess, relay: FaultRelay, stats: Stats, rng: random.Random,
                     stop: asyncio.Event, restarting: list[bool]) -> None:
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        if stop.is_set():
            break
        roll = rng.random()
        if roll < 0.2:
            stats.chaos["node kill -9 + restart"] += 1
            restarting[0] = True
            node.kill9()
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await asyncio.to_thread(node.start)
            restarting[0] = False
        elif roll < 0.4:
            stats.chaos["upstream cut + restore"] += 1
            relay.down = True
            await asyncio.sleep(rng.uniform(0.3, 3.0))
            relay.down = False
        elif roll < 0.5:
            stats.chaos["slow link"] += 1
            relay.rate = rng.choice([2 * MiB, 8 * MiB])
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            relay.rate = None
        else:
            name, make, path = rng.choice(FAULTS)
            stats.chaos[f"fault: {name}"] += 1
            relay.inject(make(rng), method="GET", path=path or None, times=rng.randint(1, 3))


async def release_loop(client: httpx.AsyncClient, upstream: Registry, catalog: list[Pushed], stats: Stats,
                       rng: random.Random, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        catalog.append(await push_release(client, upstream, rng, len(catalog)))
        stats.images += 1


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    raise_nofile(4096)
    work = Path(tempfile.mkdtemp(prefix="mirror-soak-"))
    stats = Stats()
    try:
        with Registry(work / "upstream", log_level="warn", access_log=False) as upstream, \
                FaultRelay(upstream.url) as relay:
            node = NodeProcess(work / "node", relay.url, tag_ttl="2s",
                               upstream={"read_timeout": "2s", "retries": 2}, client_idle_timeout="10s")
            node.config["log"] = {"level": "warn"}
            node.config_path.write_text(json.dumps(node.config))  # YAML reads JSON
            node.start()
            async with httpx.AsyncClient(timeout=60) as client:
                catalog = [await push_release(client, upstream, rng, n) for n in range(8)]
                stats.images = len(catalog)
                log(f"upstream {upstream.url}, relay {relay.url}, node {node.url} (pid {node.pid}); "
                    f"{args.clients} clients for {args.seconds:.0f}s")
                stop = asyncio.Event()
                restarting = [False]
                started = time.monotonic()
                tasks = [asyncio.create_task(client_loop(lambda: node.port, catalog, stats, random.Random(rng.random()),
                                                         stop, args.max_pulls)) for _ in range(args.clients)]
                tasks.append(asyncio.create_task(chaos_loop(node, relay, stats, rng, stop, restarting)))
                tasks.append(asyncio.create_task(release_loop(client, upstream, catalog, stats, rng, stop)))
                while time.monotonic() - started < args.seconds and stats.pulls < args.max_pulls:
                    await asyncio.sleep(min(5.0, args.seconds))
                    log(f"{time.monotonic() - started:5.0f}s: {stats.pulls} pulls ({stats.pulls_ok} ok), "
                        f"{stats.requests} requests, {sum(stats.errors.values())} failed pulls, "
                        f"{len(stats.wrong)} wrong, chaos {sum(stats.chaos.values())}")
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
                elapsed = time.monotonic() - started
                relay.clear()
                relay.down = False
                relay.rate = None
                if not node.process.running:
                    node.start()
                node.stop()  # a clean stop, then look at the store behind its back
                check = check_store(node.store, node.metadata_db)
                node.start()
                finals = await asyncio.gather(*(pull_image(node.port, image.repo, image.tag, timeout=60)
                                                for image in catalog))
                node.stop()
        final_ok = sum(result.ok for result in finals)
        errors = ", ".join(f"{kind} {count}" for kind, count in stats.errors.most_common())
        chaos = ", ".join(f"{kind} {count}" for kind, count in sorted(stats.chaos.items()))
        print(f"chaos: {chaos}", file=sys.stderr)
        print(f"failed pulls by cause: {errors or 'none'}", file=sys.stderr)
        if stats.wrong:
            print(f"WRONG BYTES: {stats.wrong[:10]}", file=sys.stderr)
        if check.problems:
            print(f"STORE PROBLEMS: {check.problems[:10]}", file=sys.stderr)
        kills = stats.chaos["node kill -9 + restart"]
        cuts = stats.chaos["upstream cut + restore"]
        injected = sum(v for k, v in stats.chaos.items() if k.startswith("fault:"))
        print(f"soak {elapsed:.0f}s, {args.clients} clients, {len(catalog)} images: {stats.pulls} pulls "
              f"({stats.pulls_ok} verified, {stats.pulls - stats.pulls_ok} failed cleanly), {stats.requests} "
              f"requests, {stats.bytes / MiB:.0f} MiB served; {kills} node kill -9s, {cuts} upstream cuts, "
              f"{injected} injected faults; wrong bytes received: {len(stats.wrong)}; store re-verified: "
              f"{len(check.objects)} objects, {len(check.problems)} problems; final pulls "
              f"{final_ok}/{len(catalog)} ok")
        return 0 if not stats.wrong and not check.problems and final_ok == len(catalog) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the chaos lasts (default 60)")
    parser.add_argument("--clients", type=int, default=24, help="concurrent pulling clients (default 24)")
    parser.add_argument("--max-pulls", type=int, default=100_000, help="stop after this many pulls")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    log(f"seed {args.seed}")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
