"""A private docker daemon (Debian ``docker.io``) for end-to-end tests, run as root.

    with run_dockerd(tmp_path, {"registry-mirrors": [node.url]}) as dockerd:
        await dockerd.docker_async("pull", "alpine")          # from an async test
        dockerd.docker("image", "inspect", "alpine")          # from sync code
        dockerd.image_id("alpine")                            # -> "sha256:..."

The daemon gets its own data root, exec root, pid file, socket and ``daemon.json``,
all under a short temporary directory (``/tmp/dk-XXXX``: unix socket paths must stay
under ~100 characters, and dockerd's managed containerd puts its socket inside the
exec root). No iptables, no bridge, the ``vfs`` storage driver: it runs in a plain
root container. dockerd starts and supervises its own containerd; :meth:`Dockerd.stop`
stops dockerd by PID and then makes sure that containerd (its PID read from the exec
root) is gone too, and removes the directory.

The ``docker`` CLI runs with ``-H unix://SOCK`` and a private ``DOCKER_CONFIG``
(credentials from ``docker login`` land there, never in ``~/.docker``). Proxy variables
are removed from both environments: every registry in these tests is on loopback.

From an async test whose event loop also serves the node under test, use
:meth:`Dockerd.docker_async`: the blocking :meth:`Dockerd.docker` would stall the loop
the daemon is pulling from.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from .procs import ManagedProcess, ProcessStartError

__all__ = [
    "DOCKERD_BIN",
    "DOCKER_BIN",
    "DockerError",
    "Dockerd",
    "dockerd_unavailable",
    "run_dockerd",
    "write_image_archive",
]

DOCKERD_BIN = os.environ.get("MIRROR_TEST_DOCKERD_BIN", "dockerd")


def _docker_cli() -> str:
    """The CLI shipped with the daemon (Debian: /usr/bin/docker), not another on PATH."""
    explicit = os.environ.get("MIRROR_TEST_DOCKER_BIN")
    if explicit:
        return explicit
    dockerd = shutil.which(DOCKERD_BIN)
    if dockerd is not None:
        for directory in ("/usr/bin", str(Path(dockerd).resolve().parent)):
            candidate = Path(directory) / "docker"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("docker") or "docker"


DOCKER_BIN = _docker_cli()

_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
_TRUST_KEY = Path("/etc/docker/key.json")  # dockerd 20.10 creates it on first start


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in _PROXY_VARS and not k.startswith("DOCKER_")}
    env.update(extra or {})
    return env


def dockerd_unavailable() -> str | None:
    """Why dockerd cannot run here (for a skip reason), or None when it can."""
    missing = [b for b in (DOCKERD_BIN, "containerd", "runc") if shutil.which(b) is None]
    if missing or not Path(DOCKER_BIN).exists() and shutil.which(DOCKER_BIN) is None:
        return (f"docker daemon not installed ({', '.join(missing) or DOCKER_BIN} missing; "
                "Debian packages docker.io containerd, installed by scripts/test)")
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


class DockerError(AssertionError):
    pass


def _check(cp: subprocess.CompletedProcess[str], check: bool, daemon: Dockerd) -> None:
    if check and cp.returncode != 0:
        raise DockerError(
            f"docker failed rc={cp.returncode}: {' '.join(map(str, cp.args))}\n"
            f"--- stdout ---\n{cp.stdout}\n--- stderr ---\n{cp.stderr}\n"
            f"--- dockerd log tail ---\n{daemon.log_tail()}"
        )


class Dockerd:
    """One dockerd (and the containerd it manages). Use :func:`run_dockerd`."""

    def __init__(self, log_dir: Path, daemon_json: Mapping[str, Any]) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        self.sock = str(self.dir / "sock")
        self.data_root = self.dir / "data"
        self.exec_root = self.dir / "exec"
        self.pidfile = self.dir / "pid"
        self.config_file = self.dir / "daemon.json"
        #: DOCKER_CONFIG of the CLI: config.json with credentials from ``docker login``.
        self.client_config = self.dir / "client"
        self.client_config.mkdir()
        self.daemon_json = dict(daemon_json)
        self.config_file.write_text(json.dumps(self.daemon_json, indent=2) + "\n")
        self._created_trust_key = not _TRUST_KEY.exists()
        self.process = ManagedProcess(
            [DOCKERD_BIN, "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=vfs", "--data-root", str(self.data_root),
             "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
             "-H", f"unix://{self.sock}", "--config-file", str(self.config_file)],
            env=_clean_env(), inherit_env=False, log_dir=self.log_dir, name="dockerd",
        )

    # -- lifecycle
    def start(self, timeout: float = 120.0) -> Dockerd:
        self.process.start()
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.process.poll() is not None:
                raise ProcessStartError(f"dockerd exited rc={self.process.poll()}:\n"
                                        f"{self.log_tail()}")
            if os.path.exists(self.sock):
                cp = self.docker("info", "--format", "{{.ServerVersion}}", timeout=10, check=False)
                if cp.returncode == 0 and cp.stdout.strip():
                    return self
                last = cp.stderr
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessStartError(f"dockerd did not answer `docker info` in {timeout}s "
                                        f"({last.strip()}):\n{self.log_tail()}")
            time.sleep(0.1)

    def containerd_pid(self) -> int | None:
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop dockerd by PID, then its containerd by PID if it outlived dockerd."""
        containerd = self.containerd_pid()
        self.process.stop(timeout=20.0)
        if containerd is not None:
            _stop_pid(containerd, expect_name="containerd")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._created_trust_key:
                _TRUST_KEY.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the CLI
    def _argv(self, args: tuple[str, ...]) -> list[str]:
        return [DOCKER_BIN, "-H", f"unix://{self.sock}", *map(str, args)]

    def _env(self) -> dict[str, str]:
        return _clean_env({"DOCKER_CONFIG": str(self.client_config), "HOME": str(self.dir)})

    def docker(self, *args: str, timeout: float = 60.0, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``docker -H unix://SOCK ARGS`` (blocking). Raises DockerError on failure if check."""
        argv = self._argv(args)
        try:
            cp = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                                env=self._env(), input=input,
                                stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise DockerError(f"docker timed out after {timeout}s: {argv}\n"
                              f"{e.stderr!r}\n--- dockerd log tail ---\n{self.log_tail()}") from e
        _check(cp, check, self)
        return cp

    async def docker_async(self, *args: str, timeout: float = 60.0, check: bool = True,
                           input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Like :meth:`docker` without blocking the running event loop."""
        argv = self._argv(args)
        proc = await asyncio.create_subprocess_exec(
            *argv, env=self._env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL)
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input.encode() if input is not None else None), timeout)
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise DockerError(f"docker timed out after {timeout}s: {argv}\n"
                              f"--- dockerd log tail ---\n{self.log_tail()}") from e
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        cp = subprocess.CompletedProcess(argv, rc, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
        _check(cp, check, self)
        return cp

    async def image_id(self, reference: str) -> str:
        cp = await self.docker_async("image", "inspect", "--format", "{{.Id}}", reference)
        return cp.stdout.strip()

    # -- logs
    def log_tail(self, max_bytes: int = 6000) -> str:
        return self.process.log_tail(max_bytes)

    def log_text(self) -> str:
        return self.process.log_text()


def _stop_pid(pid: int, *, expect_name: str, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` (only if it still is ``expect_name``), SIGKILL after ``timeout``."""

    def alive() -> bool:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        return comm == expect_name and state != "Z"

    if not alive():
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive():
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def write_image_archive(path: Path, config: bytes, gz_layers: Sequence[bytes],
                        repo_tags: Sequence[str]) -> Path:
    """A ``docker save`` archive (for ``docker load -i``) of an image given by its config
    and gzip'ed layers: ``manifest.json``, ``<config hex>.json``, ``<diff hex>/layer.tar``.

    The layers are stored uncompressed, as ``docker save`` writes them: a push of the loaded
    image makes dockerd compress them itself, so the registry sees blobs nobody had before.
    """

    def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 1704067200
        archive.addfile(info, io.BytesIO(data))

    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    layer_names = []
    with tarfile.open(path, "w") as archive:
        add(archive, config_name, config)
        for gz in gz_layers:
            tar = gzip.decompress(gz)
            name = f"{hashlib.sha256(tar).hexdigest()}/layer.tar"
            add(archive, name, tar)
            layer_names.append(name)
        manifest = [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]
        add(archive, "manifest.json", json.dumps(manifest).encode())
    return path


@contextmanager
def run_dockerd(tmp: Path, daemon_json: Mapping[str, Any], *,
                timeout: float = 120.0) -> Iterator[Dockerd]:
    """Start a private dockerd with ``daemon_json``; stop it (and its containerd) on exit.

    ``tmp`` keeps the daemon's log (``dockerd.log``); everything else lives under a short
    ``/tmp/dk-XXXX`` directory that is removed on exit.
    """
    daemon = Dockerd(tmp, daemon_json)
    try:
        daemon.start(timeout=timeout)
        yield daemon
    finally:
        daemon.close()
