"""``python -m bench.profile [--ref tag|digest|cold] [--seconds N] [--py-spy OUT]``: one path of the node.

A development tool, not a figure: starts distribution as upstream and one
node (``mirror serve``, log level warn), pushes a small image, warms its
manifest, then loops GETs of it from 32 connections in 2 spawned processes
and prints req/s and the node's CPU; ``--ref cold`` instead pulls
``--images`` fresh 8 x 8 MiB images one after the other, directly from
upstream and then through the node, and prints both times. With ``--py-spy OUT`` (``pip install
py-spy``) the node is sampled for the whole window and a flame graph
written to OUT (``.svg``; ``.json`` gives speedscope). ``--env K=V`` passes
settings overrides (``REGISTRY_...``) to the node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.load import MANIFEST_ACCEPT, cpu_seconds, job_load, run_jobs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from tests.support.images import push_image
    from tests.support.procs import ManagedProcess, free_port, wait_http
    from tests.support.registry import Registry

    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--ref", choices=("tag", "digest", "cold"), default="digest")
    ap.add_argument("--images", type=int, default=3, help="cold pulls (--ref cold)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--py-spy", metavar="OUT", help="record a py-spy profile of the node to OUT")
    ap.add_argument("--uvloop", action="store_true", help="run the node under uvloop (a trial)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra node environment")
    args = ap.parse_args(argv)
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="mirror-profile-"))
        stack.callback(shutil.rmtree, tmp, True)
        upstream = Registry(tmp, log_level="warn", access_log=False, name="upstream")
        stack.callback(upstream.close)
        upstream.start()
        port = free_port()
        config = {"version": 0.1, "log": {"level": "warn"},
                  "storage": {"filesystem": {"rootdirectory": str(tmp / "storage")}},
                  "http": {"addr": f"127.0.0.1:{port}"}, "proxy": {"remoteurl": upstream.url},
                  "mirror": {"tag_ttl": "300s", "workers": 1}}  # one process to profile
        (tmp / "config.yml").write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env.update(kv.split("=", 1) for kv in args.env)
        command = [sys.executable, "-m", "mirror", "serve", str(tmp / "config.yml")]
        if args.uvloop:
            command[1:3] = ["-c", "import runpy, sys, uvloop; uvloop.install(); sys.argv[0] = 'mirror'; "
                                  "runpy.run_module('mirror', run_name='__main__')"]
        node = ManagedProcess(command,
                              env=env, inherit_env=False, cwd=ROOT, log_dir=tmp, name="mirror")
        stack.callback(node.stop)
        node.start()
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/v2/", timeout=30, process=node)

        async def push() -> str:
            async with httpx.AsyncClient(trust_env=False) as client:
                image = await push_image(client, upstream.url, "bench/profile", "v1", layers=[1024, 2048])
                warm = await client.get(f"{base}/v2/bench/profile/manifests/v1",
                                        headers={"Accept": MANIFEST_ACCEPT})
                assert warm.status_code == 200, warm
                return str(image.digest)

        if args.ref == "cold":
            return cold_pulls(args, upstream.url, base, node.pid)
        digest = asyncio.run(push())
        path = f"/v2/bench/profile/manifests/{'v1' if args.ref == 'tag' else digest}"
        assert node.pid is not None
        start = time.monotonic() + 1.0
        warmup = 1.0
        spy: subprocess.Popen[bytes] | None = None
        measured: dict[str, float] = {}

        def measure() -> None:
            nonlocal spy
            time.sleep(max(0.0, start + warmup - time.monotonic()))
            measured["cpu0"], measured["t0"] = cpu_seconds(node.pid), time.monotonic()  # type: ignore[arg-type]
            if args.py_spy:
                fmt = ["--format", "speedscope"] if args.py_spy.endswith(".json") else []
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(node.pid), "--rate", "500",
                                        "--duration", str(int(args.seconds)), "-o", args.py_spy, *fmt],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(max(0.0, start + warmup + args.seconds - time.monotonic()))
            measured["cpu1"], measured["t1"] = cpu_seconds(node.pid), time.monotonic()  # type: ignore[arg-type]

        per = [args.conns // args.procs] * args.procs
        results = run_jobs([(job_load, (base, path, [("Accept", MANIFEST_ACCEPT)], n, start, warmup,
                                        args.seconds), {}) for n in per],
                           timeout=args.seconds + 60, on_started=measure)
        if spy is not None:
            spy.wait(timeout=60)
        rps = sum(r["requests"] for r in results) / args.seconds
        cpu = (measured["cpu1"] - measured["cpu0"]) / (measured["t1"] - measured["t0"])
        errors = {k: v for r in results for k, v in r["errors"].items()}
        print(f"warm manifest by {args.ref}: {rps:.0f} req/s, node CPU {cpu * 100:.0f}% "
              f"({rps / max(cpu, 1e-9):.0f} req/s per core), load average {os.getloadavg()[0]:.2f}"
              + (f", errors {errors}" if errors else ""))
    return 0


def cold_pulls(args: argparse.Namespace, upstream: str, base: str, pid: int | None) -> int:
    """Pull fresh images directly, then through the node; print the times (and profile the node)."""
    from bench.load import job_pull
    from tests.support.images import push_image

    async def push_all() -> list[str]:
        async with httpx.AsyncClient(trust_env=False, timeout=300) as client:
            repos = []
            for i in range(args.images):
                repo = f"bench/cold-{i}-{time.time_ns()}"
                await push_image(client, upstream, repo, "v1", layers=[8 << 20] * 8, seed=repo)
                repos.append(repo)
            return repos

    repos = asyncio.run(push_all())
    spy = None
    if args.py_spy:
        fmt = ["--format", "speedscope"] if args.py_spy.endswith(".json") else []
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "500", "-o", args.py_spy,
                                *fmt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    for repo in repos:
        [direct] = run_jobs([(job_pull, (upstream, repo, "v1"), {})], timeout=300)
        [mirrored] = run_jobs([(job_pull, (base, repo, "v1"), {})], timeout=300)
        assert direct["ok"] and mirrored["ok"], (direct["errors"], mirrored["errors"])
        print(f"cold pull {repo}: direct {direct['wall']:.3f} s, node {mirrored['wall']:.3f} s "
              f"({mirrored['wall'] / direct['wall']:.2f}x)")
    if spy is not None:
        spy.send_signal(2)
        spy.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
