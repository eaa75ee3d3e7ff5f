"""A private containerd (Debian ``containerd``) and its ``ctr`` CLI, for end-to-end tests.

    with run_containerd(tmp_path) as containerd:
        hosts = containerd.write_hosts_toml(upstream.host, server=upstream.url,
                                            mirrors=[node.url])
        await containerd.ctr_async("images", "pull", "--hosts-dir", str(hosts),
                                   "--plain-http", f"{upstream.host}/team/app:v1")

Root, state, socket and config live under a short ``/tmp/ct-XXXX`` directory (unix
socket paths must stay under ~100 characters), removed on exit. The config is minimal:
no CRI plugin (no CNI, no sandbox image), no ``/opt/containerd``, no debug or metrics
listener. containerd is stopped by its PID. ``ctr`` runs with ``--address SOCK`` in the
``mirror-tests`` namespace; pulls unpack with the ``native`` snapshotter (a plain copy,
works wherever overlayfs does not).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from .procs import ManagedProcess, ProcessStartError

__all__ = ["CONTAINERD_BIN", "CTR_BIN", "Containerd", "CtrError", "containerd_unavailable",
           "run_containerd"]

CONTAINERD_BIN = os.environ.get("MIRROR_TEST_CONTAINERD_BIN", "containerd")
CTR_BIN = os.environ.get("MIRROR_TEST_CTR_BIN", "ctr")
NAMESPACE = "mirror-tests"

_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
_DISABLED = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.lower() not in _PROXY_VARS and not k.startswith("CONTAINERD_")}


def containerd_unavailable() -> str | None:
    """Why containerd cannot run here (for a skip reason), or None when it can."""
    missing = [b for b in (CONTAINERD_BIN, CTR_BIN) if shutil.which(b) is None]
    if missing:
        return (f"containerd not installed ({', '.join(missing)} missing; Debian package "
                "containerd, installed by scripts/test)")
    if os.geteuid() != 0:
        return "containerd needs root"
    return None


class CtrError(AssertionError):
    pass


class Containerd:
    """One containerd process. Use :func:`run_containerd`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="ct-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = str(self.dir / "sock")
        self.config_path = self.dir / "config.toml"
        self.hosts_dir = self.dir / "certs.d"
        self.hosts_dir.mkdir()
        self.config_path.write_text(self._config())
        self.process = ManagedProcess(
            [CONTAINERD_BIN, "--config", str(self.config_path), "--root", str(self.root),
             "--state", str(self.state), "--address", self.address],
            env=_clean_env(), inherit_env=False, log_dir=self.log_dir, name="containerd",
        )

    def _config(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in _DISABLED)
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
        )

    # -- lifecycle
    def start(self, timeout: float = 90.0) -> Containerd:
        self.process.start()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ProcessStartError(f"containerd exited rc={self.process.poll()}:\n"
                                        f"{self.process.log_tail()}")
            if os.path.exists(self.address):
                cp = self.ctr("version", timeout=10, check=False)
                if cp.returncode == 0 and "Server:" in cp.stdout:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessStartError(f"containerd did not answer in {timeout}s:\n"
                                        f"{self.process.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.stop(timeout=15.0)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hosts.toml
    def write_hosts_toml(self, registry: str, *, server: str | None,
                         mirrors: Sequence[str] = (),
                         capabilities: Sequence[str] = ("pull", "resolve")) -> Path:
        """``<hosts_dir>/<registry>/hosts.toml``: ``mirrors`` tried in order, then ``server``.

        Returns the hosts directory (what ``--hosts-dir`` takes).
        """
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        caps = ", ".join(f'"{c}"' for c in capabilities)
        lines = [f'server = "{server}"', ""] if server else []
        for url in mirrors:
            lines += [f'[host."{url}"]', f"  capabilities = [{caps}]", ""]
        (directory / "hosts.toml").write_text("\n".join(lines))
        return self.hosts_dir

    # -- the CLI
    def _argv(self, args: Sequence[str]) -> list[str]:
        return [CTR_BIN, "--address", self.address, "--namespace", NAMESPACE, *map(str, args)]

    def ctr(self, *args: str, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr --address SOCK --namespace mirror-tests ARGS`` (blocking)."""
        argv = self._argv(args)
        try:
            cp = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                                env=_clean_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise CtrError(f"ctr timed out after {timeout}s: {argv}\n{e.stderr!r}") from e
        self._check(cp, check)
        return cp

    async def ctr_async(self, *args: str, timeout: float = 60.0,
                        check: bool = True) -> subprocess.CompletedProcess[str]:
        """Like :meth:`ctr` without blocking the running event loop."""
        argv = self._argv(args)
        proc = await asyncio.create_subprocess_exec(
            *argv, env=_clean_env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        cp = subprocess.CompletedProcess(argv, rc, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
        self._check(cp, check)
        return cp

    def _check(self, cp: subprocess.CompletedProcess[str], check: bool) -> None:
        if check and cp.returncode != 0:
            raise CtrError(
                f"ctr failed rc={cp.returncode}: {' '.join(cp.args)}\n"
                f"--- stdout ---\n{cp.stdout}\n--- stderr ---\n{cp.stderr}\n"
                f"--- containerd log tail ---\n{self.process.log_tail()}"
            )

    async def pull(self, reference: str, *, hosts_dir: Path, timeout: float = 60.0,
                   extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir D --plain-http --snapshotter native REF``."""
        return await self.ctr_async("images", "pull", "--hosts-dir", str(hosts_dir),
                                    "--plain-http", "--snapshotter", "native", *extra,
                                    reference, timeout=timeout)

    async def image_target(self, reference: str) -> str:
        """The digest ``reference`` points at in containerd's image store."""
        cp = await self.ctr_async("images", "ls")
        for line in cp.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return next(f for f in fields if f.startswith("sha256:"))
        raise CtrError(f"{reference} not in `ctr images ls`:\n{cp.stdout}")


@contextmanager
def run_containerd(tmp: Path, *, timeout: float = 90.0) -> Iterator[Containerd]:
    """Start a private containerd (log under ``tmp``); stop it by PID and clean up on exit."""
    daemon = Containerd(tmp)
    try:
        daemon.start(timeout=timeout)
        yield daemon
    finally:
        daemon.close()
