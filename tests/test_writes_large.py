"""A 1 GiB layer pushed through the node: streamed both ways, the node's memory stays bounded."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import httpx
import yaml

from tests.conftest import mirror_config
from tests.support.procs import ManagedProcess, free_port, wait_http

GiB = 1 << 30
CHUNK = 1 << 20
RSS_LIMIT_MIB = 150


def chunks(total: int):
    """Deterministic, incompressible, distinct 1 MiB chunks, generated on the fly."""
    block = hashlib.sha256(b"seed").digest() * (CHUNK // 32)
    for index in range(total // CHUNK):
        yield index.to_bytes(8, "big") + block[8:]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_push_of_a_1gib_layer_keeps_the_node_small(upstream, tmp_path: Path) -> None:
    digest = hashlib.sha256()
    for chunk in chunks(GiB):
        digest.update(chunk)
    expected = f"sha256:{digest.hexdigest()}"
    port = free_port()
    config = mirror_config(tmp_path, upstream.url, passthrough_writes=True, workers=1)  # one process's RSS
    config["http"]["addr"] = f"127.0.0.1:{port}"
    config["log"]["level"] = "warn"
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    node_url = f"http://127.0.0.1:{port}"
    with ManagedProcess([sys.executable, "-m", "mirror", "serve", str(tmp_path / "config.yml")]) as node:
        wait_http(f"{node_url}/v2/", process=node)
        repo = "big/layer"
        with httpx.Client(timeout=120) as client:
            started = client.post(f"{node_url}/v2/{repo}/blobs/uploads/")
            assert started.status_code == 202
            patched = client.patch(started.headers["Location"], content=chunks(GiB),
                                   headers={"Content-Type": "application/octet-stream"})
            assert patched.status_code == 202, patched.text
            done = client.put(httpx.URL(patched.headers["Location"]).copy_merge_params({"digest": expected}))
            assert done.status_code == 201, done.text
            assert patched.headers["Location"].startswith(node_url)
            head = client.head(f"{upstream.url}/v2/{repo}/blobs/{expected}")
        peak = peak_rss_mib(node.pid)
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == GiB
        kept = tmp_path / "store" / "objects" / "sha256" / expected[7:9] / expected[7:]
        assert kept.stat().st_size == GiB  # written through, verified
    assert peak < RSS_LIMIT_MIB, f"node peak RSS {peak:.0f} MiB"
    os.unlink(kept)
