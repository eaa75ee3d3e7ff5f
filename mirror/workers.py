"""Worker processes: `mirror.workers` copies of the node on one socket, over one store.

`mirror.workers` defaults to "auto": the CPUs this process may use
(:func:`available_cpus`: its affinity, capped by a container's cgroup CPU
quota). With more than one, `mirror serve` is a supervisor that serves
nothing itself. It starts each worker as `python -m mirror serve CONFIG`;
the environment variable `MIRROR_WORKER=<index>` tells a worker which it is.
Each worker listens on `http.addr` with its own `SO_REUSEPORT` socket, so the
kernel spreads connections evenly over them (one shared, inherited socket
would not: an asyncio worker accepts up to its backlog per wake-up, so one
busy worker takes a whole burst). The supervisor holds a bound, never
listening `SO_REUSEPORT` socket on the address: a port already taken fails
the start at once, and no other program's socket can join the group while
workers restart. Every worker opens the same store and metadata database (both are
multi-process safe: fills coordinate through :mod:`mirror.storage.fills`).

Worker 0 is the leader: it alone runs the debug/admin listener, prewarm jobs
and notifications' work, keep-fresh, the scrub, and quota housekeeping and
eviction. A leader that dies is restarted as worker 0 and resumes them.

The supervisor restarts a worker that exits unbidden, forwards SIGHUP (reload)
and SIGTERM/SIGINT (graceful stop within `mirror.shutdown_grace`, then each
worker's own flush budget; whatever is left is killed), and gives up, stopping
the others, when workers crash `CRASH_LIMIT` times within `CRASH_WINDOW`
seconds: a node that cannot stay up must say so, not spin. A worker that exits
with status 2 (a configuration, key or store-layout error, the same for every
worker) ends the node at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config import Settings

log = logging.getLogger("mirror.workers")

ENV = "MIRROR_WORKER"
#: Unbidden worker exits tolerated within `CRASH_WINDOW` seconds before the node gives up.
CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
#: A worker's exit status for errors every restart would repeat (config, keys, store layout).
FATAL_STATUS = 2
#: Seconds between the supervisor's looks at its workers.
POLL = 0.1
#: Memory budget of one worker for `auto` under a cgroup memory limit (a worker
#: idles at about 50 MiB and holds up to 32 MiB of hot manifests plus its maps).
WORKER_MEMORY = 256 * 1024 * 1024
#: Where cgroup file systems are mounted, and this process's cgroups (for a CPU quota).
CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Which worker this process is."""

    index: int

    @property
    def leader(self) -> bool:
        """Worker 0 runs the node's single-instance services."""
        return self.index == 0


def current_role() -> WorkerRole | None:
    """This process's role under a supervisor; None when it is the whole node."""
    value = os.environ.get(ENV)
    if not value:
        return None
    return WorkerRole(int(value))


def is_leader() -> bool:
    """Whether this process runs the single-instance services (a lone node does)."""
    role = current_role()
    return role is None or role.leader


def worker_count(settings: Settings) -> int:
    """`mirror.workers`, with 0 ("auto", the default) resolved to :func:`available_cpus`."""
    if settings.mirror.workers:
        return settings.mirror.workers
    return available_cpus()


def available_cpus(cgroup_root: Path = CGROUP_ROOT, own_cgroup: Path = OWN_CGROUP) -> int:
    """The workers `auto` runs: the CPUs this process may use, within its cgroup's limits.

    The CPUs are its affinity, capped by a cgroup CPU quota: in a container
    the affinity is usually the host's every CPU while `cpu.max` (cgroup v2;
    `cpu.cfs_quota_us` in v1) allows a few CPUs' worth of time, and a worker
    per host CPU would only contend. The quota is rounded down (1.5 CPUs: one
    worker), as Go's automaxprocs does. A cgroup memory limit caps the count
    too, at one worker per `WORKER_MEMORY`: a pod limited to 1 GiB on a
    64-CPU host must not start 64 workers and be OOM-killed. Never below one.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, own_cgroup)
    if quota is not None:
        cpus = min(cpus, int(quota))
    memory = cgroup_limit(cgroup_root, own_cgroup, "memory.max", "memory", _v1_memory)
    if memory is not None:
        cpus = min(cpus, int(memory // WORKER_MEMORY))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, own_cgroup: Path = OWN_CGROUP) -> float | None:
    """CPUs' worth of time this process's cgroup and its ancestors allow; None when unlimited."""
    return cgroup_limit(cgroup_root, own_cgroup, "cpu.max", "cpu", _v1_quota)


def cgroup_limit(cgroup_root: Path, own_cgroup: Path, v2_file: str, v1_controller: str,
                 v1_read: Any) -> float | None:
    """The tightest limit of this process's cgroup and its ancestors; None when unlimited.

    cgroup v2 files hold "LIMIT [PERIOD]" or "max"; a v1 controller's
    hierarchy is read with `v1_read(directory)`.
    """
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: one hierarchy
            found += [_v2_limit(d / v2_file) for d in _ancestors(cgroup_root, path)]
        elif v1_controller in controllers.split(","):  # cgroup v1 (where mounted by name)
            found += [v1_read(d) for d in _ancestors(cgroup_root / controllers, path)]
    limits = [limit for limit in found if limit is not None]
    return min(limits) if limits else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """`base/path` and each of its parents up to `base` (a container sees its own as `/`)."""
    parts = [part for part in path.split("/") if part and part != ".."]
    return [base.joinpath(*parts[:end]) for end in range(len(parts), -1, -1)]


def _v2_limit(path: Path) -> float | None:
    """`cpu.max` ("QUOTA PERIOD": CPUs) or `memory.max` (bytes); "max" is no limit."""
    try:
        fields = path.read_text().split()
        if fields[0] == "max":
            return None
        return int(fields[0]) / int(fields[1]) if len(fields) > 1 else float(fields[0])
    except (OSError, ValueError, IndexError):
        return None


def _v1_memory(directory: Path) -> float | None:
    try:
        limit = int((directory / "memory.limit_in_bytes").read_text())
        return None if limit >= 1 << 60 else float(limit)  # v1 writes "no limit" as a huge number
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def link_share(upstream: Any, count: int) -> Any:
    """One worker's part of the node's link budget (`mirror.upstream` settings).

    `max_concurrency` and `max_bandwidth` are per node: each of `count`
    workers gets an equal static share (at least one request, one byte/s).
    """
    from dataclasses import replace

    if count <= 1:
        return upstream
    concurrency = max(1, upstream.max_concurrency // count) if upstream.max_concurrency else 0
    bandwidth = max(1, upstream.max_bandwidth // count) if upstream.max_bandwidth else 0
    return replace(upstream, max_concurrency=concurrency, max_bandwidth=bandwidth)


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this worker when its supervisor dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Starts, watches and stops the workers.

    Args:
        settings: the loaded configuration (bind address, grace).
        config: the config file the workers load (None: the built-in default).
        count: how many workers.
        stop_budget: seconds a worker gets after SIGTERM beyond the grace.
    """

    def __init__(self, settings: Settings, config: str | None, count: int, stop_budget: float) -> None:
        self.settings = settings
        self.config = config
        self.count = count
        self.stop_budget = stop_budget
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.crashes: deque[float] = deque()
        self._stop = False
        self._hangup = False
        self._sock: socket.socket | None = None

    def run(self) -> int:
        """Serve until signalled (0) or until workers keep crashing (1)."""
        self._sock = self._bind()
        from mirror.observe.nodetotals import clear

        clear(self.settings.metadata_dir)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hangup)
        host, port = self.settings.http.bind
        log.info("supervisor %d: %d workers on %s:%d", os.getpid(), self.count, host, port)
        status = 0
        try:
            for index in range(self.count):
                self._start(index)
            status = self._watch()
        finally:
            self._stop_all()
            self._sock.close()
        log.info("stopped")
        return status

    def _bind(self) -> socket.socket:
        """Reserve `http.addr` for the workers' group (bound, not listening: it takes no connection)."""
        host, port = self.settings.http.bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or "0.0.0.0", port))
        return sock

    def _start(self, index: int) -> None:
        assert self._sock is not None
        argv = [sys.executable, "-m", "mirror", "serve"] + ([self.config] if self.config else [])
        env = {**os.environ, ENV: str(index)}
        # SIGHUP is ignored until the worker's loop handles it (reload): an
        # early reload must not kill a starting worker. SIG_IGN survives exec.
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            process = subprocess.Popen(argv, env=env)
        finally:
            signal.signal(signal.SIGHUP, previous)
        self.workers[index] = process
        log.info("worker %d started (pid %d)%s", index, process.pid, " as leader" if index == 0 else "")

    def _watch(self) -> int:
        while not self._stop:
            if self._hangup:
                self._hangup = False
                self._signal_all(signal.SIGHUP)
            for index, process in list(self.workers.items()):
                status = process.poll()
                if status is None or self._stop:
                    continue
                if status == FATAL_STATUS:
                    log.error("worker %d exited with a configuration or store error: stopping the node",
                              index)
                    return FATAL_STATUS
                if self._crashed_too_often():
                    log.error("workers keep crashing (%d exits within %.0fs; the last: worker %d, "
                              "status %s): giving up", CRASH_LIMIT, CRASH_WINDOW, index, status)
                    return 1
                log.error("worker %d (pid %d) exited with status %s: restarting it",
                          index, process.pid, status)
                self._start(index)
            time.sleep(POLL)
        return 0

    def _crashed_too_often(self) -> bool:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW:
            self.crashes.popleft()
        return len(self.crashes) >= CRASH_LIMIT

    def _stop_all(self) -> None:
        """SIGTERM every worker; kill those still running after the grace and their budget."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.mirror.shutdown_grace + self.stop_budget + 1.0
        for index, process in self.workers.items():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time: killed", index, process.pid)
                process.kill()
                process.wait()

    def _signal_all(self, sig: int) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    def _on_stop(self, _sig: int, _frame: Any) -> None:
        self._stop = True

    def _on_hangup(self, _sig: int, _frame: Any) -> None:
        self._hangup = True
