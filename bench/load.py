"""Client side of the benchmark: a lean HTTP/1.1 client and the jobs run in child processes.

The client is a keep-alive, one-request-at-a-time HTTP/1.1 client written directly on
``asyncio.BufferedProtocol`` (``recv_into`` a preallocated buffer, no per-chunk objects,
no header dict building beyond what is asked for). It is several times cheaper per
request than aiohttp's or httpx's clients, so on a small machine the server under test,
not the load generator, is what saturates. It only understands ``Content-Length``
framed responses (every registry response we measure has one).

Every ``job_*`` function runs in a child process started by :func:`run_jobs` (spawn),
so the load never shares a GIL with the relays that live in the orchestrating process.
All timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, shared across processes on
Linux), so the orchestrator and the workers agree on measurement windows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.index.v1+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)

_HEADERS, _BODY, _IDLE = 0, 1, 2
_BUF = 1 << 20


class HTTPError(Exception):
    pass


class Response:
    __slots__ = ("body", "digest", "headers", "nbytes", "status")

    def __init__(self, status: int, headers: dict[str, str], nbytes: int, body: bytes | None,
                 digest: str | None) -> None:
        self.status = status
        self.headers = headers
        self.nbytes = nbytes
        self.body = body
        self.digest = digest


class _Proto(asyncio.BufferedProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: list[int]) -> None:
        self.loop = loop
        self.stats = stats  # [body bytes received] shared by the clients of one job
        self.array = bytearray(_BUF)
        self.view = memoryview(self.array)
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.fut: asyncio.Future[Response] | None = None
        self.head = bytearray()
        self.closed = False
        self.close_after = False
        self._reset_response()

    def _reset_response(self) -> None:
        self.status = 0
        self.resp_headers: dict[str, str] = {}
        self.remaining = 0
        self.nbytes = 0
        self.is_head = False
        self.body: bytearray | None = None
        self.hasher: Any = None

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._feed(nbytes)
        except Exception as exc:  # noqa: BLE001 - protocol error: fail the request, drop the connection
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection lost mid-response ({exc!r})"))

    # -- parsing
    def _fail(self, exc: Exception) -> None:
        fut, self.fut = self.fut, None
        self.state = _IDLE
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _feed(self, n: int) -> None:
        pos = 0
        arr, view = self.array, self.view
        while pos < n:
            if self.state == _HEADERS:
                if self.head:
                    old = len(self.head)
                    self.head += view[pos:n]
                    i = self.head.find(b"\r\n\r\n", max(0, old - 3))
                    if i < 0:
                        if len(self.head) > 65536:
                            raise HTTPError("response head too large")
                        return
                    self._parse_head(bytes(self.head[:i]))
                    pos += i + 4 - old
                    self.head = bytearray()
                else:
                    i = arr.find(b"\r\n\r\n", pos, n)
                    if i < 0:
                        self.head += view[pos:n]
                        return
                    self._parse_head(bytes(arr[pos:i]))
                    pos = i + 4
                if self.remaining == 0:
                    self._finish()
            elif self.state == _BODY:
                take = min(n - pos, self.remaining)
                chunk = view[pos : pos + take]
                if self.hasher is not None:
                    self.hasher.update(chunk)
                if self.body is not None:
                    self.body += chunk
                self.remaining -= take
                self.nbytes += take
                self.stats[0] += take
                pos += take
                if self.remaining == 0:
                    self._finish()
            else:
                raise HTTPError("unexpected bytes from the server")

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        self.status = int(parts[1])
        hdrs: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            hdrs[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        self.resp_headers = hdrs
        if hdrs.get("connection", "").lower() == "close":
            self.close_after = True
        if self.is_head or self.status in (204, 304) or 100 <= self.status < 200:
            self.remaining = 0
        elif "content-length" in hdrs:
            self.remaining = int(hdrs["content-length"])
        else:
            raise HTTPError(f"response without Content-Length (status {self.status}, {hdrs})")
        self.state = _BODY

    def _finish(self) -> None:
        fut, self.fut = self.fut, None
        self.state = _IDLE
        digest = "sha256:" + self.hasher.hexdigest() if self.hasher is not None else None
        resp = Response(self.status, self.resp_headers, self.nbytes,
                        bytes(self.body) if self.body is not None else None, digest)
        self._reset_response()
        if self.close_after and self.transport is not None:
            self.transport.close()
        if fut is not None and not fut.done():
            fut.set_result(resp)

    # -- driving
    def send(self, raw: bytes, is_head: bool, keep_body: bool, verify: bool) -> asyncio.Future[Response]:
        assert self.state == _IDLE and self.transport is not None
        self._reset_response()
        self.is_head = is_head
        self.body = bytearray() if keep_body else None
        self.hasher = hashlib.sha256() if verify else None
        self.state = _HEADERS
        self.fut = self.loop.create_future()
        self.transport.write(raw)
        return self.fut


class Client:
    """One keep-alive connection, reconnecting when the server closed it."""

    def __init__(self, base_url: str, stats: list[int] | None = None) -> None:
        u = urlsplit(base_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.hostport = f"{self.host}:{self.port}".encode()
        self.stats = stats if stats is not None else [0]
        self.proto: _Proto | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Proto(loop, self.stats), self.host, self.port)
        self.proto = proto

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), *,
                      keep_body: bool = False, verify: bool = False) -> Response:
        if self.proto is None or self.proto.closed or self.proto.close_after:
            if self.proto is not None and self.proto.transport is not None:
                self.proto.transport.close()
            await self.connect()
        assert self.proto is not None
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self.hostport,
                 b"User-Agent: mirror-bench"]
        lines += [f"{k}: {v}".encode() for k, v in headers]
        raw = b"\r\n".join(lines) + b"\r\n\r\n"
        return await self.proto.send(raw, method == "HEAD", keep_body, verify)

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abort()
        self.proto = None


# --------------------------------------------------------------------------- jobs


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _cold_blob(base: str, path: str, clients: int, digest: str, size: int,
                     verify: int, start_at: float) -> dict[str, Any]:
    stats = [0]
    conns = [Client(base, stats) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    await _sleep_until(start_at)
    t0 = time.monotonic()

    async def one(i: int, c: Client) -> dict[str, Any]:
        try:
            r = await c.request("GET", path, verify=i < verify)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"ok": False, "error": repr(exc), "t": time.monotonic() - t0, "bytes": 0}
        ok = r.status == 200 and r.nbytes == size and (r.digest is None or r.digest == digest)
        err = None if ok else f"status {r.status}, {r.nbytes}/{size} bytes, digest {r.digest}"
        return {"ok": ok, "error": err, "t": time.monotonic() - t0, "bytes": r.nbytes,
                "verified": r.digest is not None}

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    wall = time.monotonic() - t0
    for c in conns:
        c.close()
    return {"wall": wall, "clients": results, "ok": all(r["ok"] for r in results),
            "errors": [r["error"] for r in results if r["error"]]}


def job_cold_blob(base: str, path: str, clients: int, digest: str, size: int, verify: int = 1,
                  start_at: float = 0.0) -> dict[str, Any]:
    """``clients`` concurrent GETs of one blob; wall time until all have all of it.

    ``verify``: how many of the clients hash what they receive (sha256).
    """
    return asyncio.run(_cold_blob(base, path, clients, digest, size, verify, start_at))


async def _pull(base: str, repo: str, ref: str, parallel: int, verify: bool,
                start_at: float) -> dict[str, Any]:
    stats = [0]
    await _sleep_until(start_at)
    t0 = time.monotonic()
    pool = [Client(base, stats) for _ in range(parallel)]
    free: asyncio.Queue[Client] = asyncio.Queue()
    for c in pool:
        free.put_nowait(c)
    errors: list[str] = []
    c = await free.get()
    r = await c.request("GET", f"/v2/{repo}/manifests/{ref}", [("Accept", MANIFEST_ACCEPT)],
                        keep_body=True)
    free.put_nowait(c)
    if r.status != 200 or r.body is None:
        return {"ok": False, "errors": [f"manifest: status {r.status} {r.body[:200] if r.body else b''!r}"],
                "wall": time.monotonic() - t0, "bytes": 0}
    m = json.loads(r.body)
    descs = [m["config"], *m["layers"]]

    async def blob(d: dict[str, Any]) -> None:
        c = await free.get()
        try:
            resp = await c.request("GET", f"/v2/{repo}/blobs/{d['digest']}", verify=verify)
            if resp.status != 200 or resp.nbytes != d["size"] or (verify and resp.digest != d["digest"]):
                errors.append(f"{d['digest'][:19]}: status {resp.status} {resp.nbytes}/{d['size']}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{d['digest'][:19]}: {exc!r}")
            c = Client(base, stats)
        finally:
            free.put_nowait(c)

    await asyncio.gather(*(blob(d) for d in descs))
    wall = time.monotonic() - t0
    for c in pool:
        c.close()
    return {"ok": not errors, "errors": errors, "wall": wall, "bytes": stats[0], "blobs": len(descs)}


def job_pull(base: str, repo: str, ref: str, parallel: int = 3, verify: bool = True,
             start_at: float = 0.0) -> dict[str, Any]:
    """Pull like a client: manifest by tag, then config+layers ``parallel`` at a time."""
    return asyncio.run(_pull(base, repo, ref, parallel, verify, start_at))


async def _load(base: str, path: str, headers: list[tuple[str, str]], conns: int, start_at: float,
                warmup: float, duration: float, expect_size: int | None) -> dict[str, Any]:
    stats = [0]
    clients = [Client(base, stats) for _ in range(conns)]
    await asyncio.gather(*(c.connect() for c in clients))
    t_start, t_end = start_at + warmup, start_at + warmup + duration
    counted = 0
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    window: dict[str, float] = {}

    async def sampler() -> None:
        await _sleep_until(t_start)
        window["b0"], window["c0"], window["t0"] = stats[0], time.process_time(), time.monotonic()
        await _sleep_until(t_end)
        window["b1"], window["c1"], window["t1"] = stats[0], time.process_time(), time.monotonic()

    async def worker(c: Client) -> None:
        nonlocal counted
        await _sleep_until(start_at)
        while True:
            now = time.monotonic()
            if now >= t_end:
                return
            try:
                r = await c.request("GET", path, headers)
            except Exception as exc:  # noqa: BLE001
                errors[type(exc).__name__] += 1
                c.close()
                await asyncio.sleep(0.01)
                continue
            done = time.monotonic()
            if t_start <= done < t_end:
                statuses[r.status] += 1
                if r.status == 200 and (expect_size is None or r.nbytes == expect_size):
                    counted += 1
                else:
                    errors[f"status {r.status} ({r.nbytes} bytes)"] += 1

    samp = asyncio.create_task(sampler())
    tasks = [asyncio.create_task(worker(c)) for c in clients]
    await _sleep_until(t_end)
    await samp
    await asyncio.sleep(0.05)  # let responses that finished right at t_end be recorded
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        c.close()
    span = window["t1"] - window["t0"]
    return {"requests": counted, "bytes": window["b1"] - window["b0"], "span": span,
            "cpu": window["c1"] - window["c0"], "statuses": dict(statuses), "errors": dict(errors)}


def job_load(base: str, path: str, headers: list[tuple[str, str]], conns: int, start_at: float,
             warmup: float, duration: float, expect_size: int | None = None) -> dict[str, Any]:
    """``conns`` connections looping GET ``path`` from ``start_at``; counts the window
    ``[start_at + warmup, start_at + warmup + duration)``: completed 200s, body bytes
    received (partial responses included) and this process's CPU time."""
    return asyncio.run(_load(base, path, headers, conns, start_at, warmup, duration, expect_size))


# --------------------------------------------------------------------------- process runner


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        result = fn(*args, **kwargs)
        conn.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_jobs(jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]],
             timeout: float, on_started: Callable[[], None] | None = None) -> list[Any]:
    """Run each job in its own spawned process; return their results in order.

    Raises RuntimeError if a job fails or outlives ``timeout`` (its process is then
    terminated, then killed, by PID). ``on_started`` runs in this process once all
    children are started (e.g. to take measurements alongside).
    """
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        for fn, args, kwargs in jobs:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(child, fn, args, kwargs), daemon=True)
            p.start()
            child.close()
            procs.append((p, parent))
        if on_started is not None:
            on_started()
        deadline = time.monotonic() + timeout
        results = []
        for p, parent in procs:
            left = max(0.0, deadline - time.monotonic())
            if not parent.poll(left):
                raise RuntimeError(f"job in pid {p.pid} did not finish within {timeout:.0f}s")
            try:
                status, value = parent.recv()
            except EOFError as exc:
                raise RuntimeError(f"job in pid {p.pid} died (exit {p.exitcode})") from exc
            if status != "ok":
                raise RuntimeError(f"job in pid {p.pid} failed: {value}")
            results.append(value)
        return results
    finally:
        for p, parent in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
            parent.close()


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
