"""Process and port helpers for the test harness.

Everything here is synchronous and keeps its blocking calls short, so it can be
called from sync tests, async tests and fixtures alike.

Rules honoured:
* every process started is stopped by PID (SIGTERM, wait, SIGKILL on timeout);
* every temporary directory created here is removed by ``close()``/``__exit__``;
* readiness is established by polling, never by a fixed sleep.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Container, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = [
    "ManagedProcess",
    "ProcessStartError",
    "free_port",
    "run_skopeo",
    "run_skopeo_async",
    "wait_http",
    "wait_http_async",
    "wait_port_closed",
]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port_closed(port: int, host: str = LOOPBACK, timeout: float = 30.0) -> None:
    """Poll until nothing accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} still accepting connections after {timeout}s")
        time.sleep(0.02)


class ProcessStartError(RuntimeError):
    pass


def _status_ok(status: int, expect_status: int | Container[int] | None) -> bool:
    if expect_status is None:
        return True
    if isinstance(expect_status, int):
        return status == expect_status
    return status in expect_status


def _fail_message(url: str, last: object, process: ManagedProcess | None) -> str:
    msg = f"{url} not ready: last result {last!r}"
    if process is not None:
        msg += f"\n--- {process.name} (pid {process.pid}, rc {process.poll()}) log tail ---\n"
        msg += process.log_tail()
    return msg


def wait_http(
    url: str,
    timeout: float = 60.0,
    expect_status: int | Container[int] | None = None,
    process: ManagedProcess | None = None,
    interval: float = 0.02,
) -> int:
    """Poll ``GET url`` until it answers (any status, or one of ``expect_status``).

    Returns the status code. Raises ``ProcessStartError`` (with the process's log
    tail, when ``process`` is given) on timeout or if the process exits first.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    with httpx.Client(timeout=httpx.Timeout(2.0), trust_env=False) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ProcessStartError(_fail_message(url, f"process exited ({last!r})", process))
            try:
                r = client.get(url)
                last = r.status_code
                if _status_ok(r.status_code, expect_status):
                    return r.status_code
            except httpx.HTTPError as e:
                last = e
            if time.monotonic() > deadline:
                raise ProcessStartError(_fail_message(url, last, process))
            time.sleep(interval)


async def wait_http_async(
    url: str,
    timeout: float = 60.0,
    expect_status: int | Container[int] | None = None,
    process: ManagedProcess | None = None,
    interval: float = 0.02,
) -> int:
    """Async twin of :func:`wait_http` (does not block the event loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ProcessStartError(_fail_message(url, f"process exited ({last!r})", process))
            try:
                r = await client.get(url)
                last = r.status_code
                if _status_ok(r.status_code, expect_status):
                    return r.status_code
            except httpx.HTTPError as e:
                last = e
            if loop.time() > deadline:
                raise ProcessStartError(_fail_message(url, last, process))
            await asyncio.sleep(interval)


# --------------------------------------------------------------------------- processes

_SETPRIV = shutil.which("setpriv")
_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:  # safety net only; tests must stop their processes
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        try:
            p.stop(timeout=2.0)
        except Exception:
            pass


class ManagedProcess:
    """A child process whose stdout+stderr go to a log file.

    ``log_dir``: where the log goes. If omitted a temp dir is created and removed by
    :meth:`close` (called by ``__exit__``). ``start()`` may be called again after
    ``stop()`` (e.g. to restart a server); the log file is appended to.
    ``die_with_parent``: when started from the main thread, the child gets SIGTERM
    if the test process dies without cleaning up (``setpriv --pdeathsig``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        inherit_env: bool = True,
        die_with_parent: bool = True,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.die_with_parent = die_with_parent
        self.name = name or Path(self.argv[0]).name
        base = (
            dict(os.environ) if inherit_env else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        )
        if env:
            base.update(env)
        self.env = base
        self.cwd = str(cwd) if cwd is not None else None
        self._own_dir: str | None = None
        if log_dir is None:
            self._own_dir = tempfile.mkdtemp(prefix=f"proc-{self.name}-")
            log_dir = self._own_dir
        self.log_path = Path(log_dir) / f"{self.name}.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self) -> ManagedProcess:
        with self._lock:
            if self._popen is not None and self._popen.poll() is None:
                raise RuntimeError(f"{self.name} already running (pid {self._popen.pid})")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                log.write(f"=== start {self.argv!r}\n".encode())
                log.flush()
                self._popen = subprocess.Popen(
                    self._exec_argv(),
                    env=self.env,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # so a Ctrl-C to pytest does not hit it first
                )
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def _exec_argv(self) -> list[str]:
        # If the test process dies hard (SIGKILL, timeout), take the child with it.
        # PDEATHSIG fires when the *forking thread* exits, so only from the main thread.
        if (
            self.die_with_parent
            and _SETPRIV is not None
            and threading.current_thread() is threading.main_thread()
        ):
            return [_SETPRIV, "--pdeathsig", "TERM", "--", *self.argv]
        return list(self.argv)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None else None

    def poll(self) -> int | None:
        """None while running (or never started: check ``pid``), else the exit code."""
        if self._popen is None:
            return None
        return self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        with self._lock:
            p = self._popen
            if p is None:
                return None
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return p.returncode

    def kill9(self) -> int | None:
        """SIGKILL immediately (simulate a crash) and reap."""
        with self._lock:
            p = self._popen
            if p is None:
                return None
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
                p.wait(timeout=5.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return p.returncode

    def signal(self, sig: int) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is None:
            raise RuntimeError("not started")
        return self._popen.wait(timeout=timeout)

    def close(self) -> None:
        """Stop the process and remove the temp dir this object created (if any)."""
        self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    # -- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # -- context manager
    def __enter__(self) -> ManagedProcess:
        if self._popen is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.poll()}>"


# --------------------------------------------------------------------------- skopeo


def _skopeo_setup(d: str, args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    policy = Path(d) / "policy.json"
    policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    authfile = Path(d) / "auth.json"
    authfile.write_text('{"auths":{}}')
    env = dict(os.environ)
    env["REGISTRY_AUTH_FILE"] = str(authfile)
    env.setdefault("HOME", d)
    return ["skopeo", "--policy", str(policy), *args], env


def _skopeo_check(cp: subprocess.CompletedProcess[bytes], check: bool) -> None:
    if check and cp.returncode != 0:
        raise AssertionError(
            f"skopeo failed rc={cp.returncode}: {' '.join(cp.args)}\n"
            f"{cp.stderr.decode(errors='replace')}"
        )


def run_skopeo(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run ``skopeo ARGS`` with an accept-anything policy and an isolated auth file.

    stdout/stderr are captured (bytes). Raises ``AssertionError`` with stderr on
    failure when ``check``. BLOCKING: from an async test whose event loop also runs
    the server under test, use :func:`run_skopeo_async` instead.
    """
    d = tempfile.mkdtemp(prefix="skopeo-")
    try:
        argv, env = _skopeo_setup(d, args)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"skopeo timed out: {argv}\n{err.decode(errors='replace')}")
        cp = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        _skopeo_check(cp, check)
        return cp
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def run_skopeo_async(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Like :func:`run_skopeo` but does not block the running event loop."""
    d = tempfile.mkdtemp(prefix="skopeo-")
    try:
        argv, env = _skopeo_setup(d, args)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise
        rc = proc.returncode if proc.returncode is not None else -1
        cp = subprocess.CompletedProcess(argv, rc, out, err)
        _skopeo_check(cp, check)
        return cp
    finally:
        shutil.rmtree(d, ignore_errors=True)
