"""Fault injection between the node and the REAL upstream, plus the checks a crash needs.

:class:`FaultRelay` is a :class:`~tests.support.relay.Relay` (counting, shaping,
``down``/``paused``/``rate``/``latency``/``fault`` all still work) that, on
chosen requests, misbehaves in one precise way::

    with FaultRelay(registry.url) as link:                      # or the `faults` fixture
        link.inject(reset(after=1 << 20), method="GET", path="/blobs/")        # 1st match only
        link.inject(status(429, retry_after=1), path="/manifests/", times=2)   # 1st and 2nd
        link.inject(corrupt(offset=-10), path="/blobs/", nth=2, times=None)   # 2nd match on
        link.inject(stall(), where=lambda rec: "Range" in (rec.request_headers or {}))
        ...
        link.ranged("/blobs/")          # GET records that carried a Range header
        link.faulted("reset")           # records a fault of that kind acted on
        link.release()                  # let every hang/stall go (they also end when the peer leaves)
        link.clear()                    # drop every rule

Rules: ``method`` (exact, None = any), ``path`` (substring of the raw path and
query) and ``where`` (a predicate on the request's :class:`FaultRecord`) select
the requests a rule *matches*; matches are numbered per rule from 1, and the
fault acts on matches ``nth .. nth + times - 1`` (``times=None``: every match
from ``nth`` on). The first rule (in insertion order) whose window holds the
match acts; a request no rule acts on is relayed untouched by :class:`Relay`.

Actions (each a :class:`Fault`; body offsets are of *this* response's body,
a negative offset counts from its end):

======================  ====================================================================
``drop()``              close the connection without any response (a reset before headers)
``hang()``              never answer: no status line, no headers
``reset(after)``        upstream's headers, ``after`` body bytes, then a TCP reset
``stall(after=0)``      upstream's headers, ``after`` bytes, then nothing at all
``trickle(after, rate)`` upstream's headers, ``after`` bytes, then ``rate`` bytes/s (1 byte/s)
``corrupt(offset)``     one byte flipped (xor 0xff) at ``offset``; length unchanged
``pad(extra)``          ``extra`` bytes appended (``announce=True``: Content-Length grown too)
``truncate(missing)``   Content-Length kept, ``missing`` bytes fewer sent, then a clean close
``short(missing)``      Content-Length shrunk by ``missing`` and the body cut to it (a clean,
                        complete-looking, too-short answer)
``throttle(rate)``      this response's body at ``rate`` bytes/s
``status(code, ...)``   answered here: 429 with ``Retry-After``, 503, ... (JSON error body)
``html()``              ``200 text/html`` with a login-page-like body (a captive portal)
``endless(type)``       ``200``, chunked, a body that never ends (until the peer leaves)
``synthetic(length)``   ``200`` with ``Content-Length: length`` of zeros (1 GiB "layers")
``huge_manifest(size)`` ``200`` manifest media type, ``size`` bytes of JSON (declared or chunked)
``rewrite(path_fn)``    relay to another upstream path (a blob served as a manifest), with
                        optional header overrides
======================  ====================================================================

Faulted requests are recorded as :class:`FaultRecord` (``.fault`` names the
kind) and shaped by the relay's ``rate`` like every other relayed byte.

The module also has what crash, load and soak tests share: :class:`NodeProcess`
(``python -m mirror serve CFG`` as a subprocess, ``kill -9``, restart, peak
RSS, open-files limit), :class:`RawClient` / :func:`pull_image` (a lean
keep-alive client that tells "aborted short" from "complete but wrong") and
:func:`check_store` (every object re-hashed, temp files, metadata rows
against files).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .procs import LOOPBACK, ManagedProcess, free_port, wait_http
from .relay import _CLIENT_AUTO_HEADERS, _HOP_BY_HOP, Relay, RelayRecord

__all__ = [
    "Fault",
    "FaultRecord",
    "FaultRelay",
    "Fetched",
    "NodeProcess",
    "Pulled",
    "RawClient",
    "Rule",
    "StoreCheck",
    "check_store",
    "corrupt",
    "drop",
    "endless",
    "hang",
    "html",
    "huge_manifest",
    "pad",
    "pull_image",
    "raise_nofile",
    "reset",
    "rewrite",
    "short",
    "stall",
    "status",
    "synthetic",
    "throttle",
    "trickle",
    "truncate",
]

MiB = 1 << 20
DOCKER_SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
_MAX_SYNTHETIC = 2 << 30  # even an "endless" body stops here (a runaway test must end)
_MAX_WAIT = 300.0  # a hang or stall never outlives this


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """One way to misbehave; build with the functions below."""

    kind: str
    after: int | None = None  # reset / stall / trickle: body bytes sent first
    offset: int | None = None  # corrupt
    extra: int = 0  # pad
    missing: int = 0  # truncate / short
    rate: float | None = None  # trickle / throttle, bytes per second
    announce: bool = True  # pad: grow Content-Length; synthetic/huge_manifest: declare it
    code: int = 200  # status
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    length: int | None = None  # synthetic / huge_manifest
    content_type: str | None = None
    path_fn: Callable[[str], str] | None = None  # rewrite

    @property
    def proxied(self) -> bool:
        """True when the fault shapes a real upstream answer (it is fetched first)."""
        return self.kind in {"reset", "stall", "trickle", "corrupt", "pad", "truncate", "short",
                             "throttle", "rewrite"}


def drop() -> Fault:
    return Fault("drop")


def hang() -> Fault:
    return Fault("hang")


def reset(after: int) -> Fault:
    return Fault("reset", after=after)


def stall(after: int = 0) -> Fault:
    return Fault("stall", after=after)


def trickle(after: int = 0, rate: float = 1.0) -> Fault:
    return Fault("trickle", after=after, rate=rate)


def corrupt(offset: int) -> Fault:
    return Fault("corrupt", offset=offset)


def pad(extra: int, announce: bool = True) -> Fault:
    return Fault("pad", extra=extra, announce=announce)


def truncate(missing: int) -> Fault:
    return Fault("truncate", missing=missing)


def short(missing: int) -> Fault:
    return Fault("short", missing=missing)


def throttle(rate: float) -> Fault:
    return Fault("throttle", rate=rate)


def status(code: int, retry_after: float | str | None = None, body: bytes | None = None,
           headers: Mapping[str, str] | None = None) -> Fault:
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(retry_after)
    if body is None:
        error = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND"}.get(code, "UNAVAILABLE")
        body = json.dumps({"errors": [{"code": error, "message": f"fault {code}"}]}).encode()
        all_headers.setdefault("Content-Type", "application/json")
    return Fault("status", code=code, headers=all_headers, body=body)


HTML_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>"
             b"<form action=/login method=post><input name=user><input name=pass type=password>"
             b"</form></body></html>\n")


def html(body: bytes = HTML_PAGE) -> Fault:
    return Fault("html", body=body, content_type="text/html; charset=utf-8")


def endless(content_type: str = DOCKER_SCHEMA2) -> Fault:
    return Fault("endless", content_type=content_type, announce=False)


def synthetic(length: int, content_type: str = "application/octet-stream", announce: bool = True) -> Fault:
    return Fault("synthetic", length=length, content_type=content_type, announce=announce)


def huge_manifest(size: int = 5 * MiB, announce: bool = True, content_type: str = DOCKER_SCHEMA2) -> Fault:
    return Fault("huge_manifest", length=size, content_type=content_type, announce=announce)


def rewrite(path_fn: Callable[[str], str], headers: Mapping[str, str] | None = None) -> Fault:
    return Fault("rewrite", path_fn=path_fn, headers=dict(headers or {}))


@dataclass
class FaultRecord(RelayRecord):
    """A relayed request, with the fault that acted on it (if any)."""

    fault: str | None = None


@dataclass
class Rule:
    """Which requests a fault acts on (see the module docstring)."""

    fault: Fault
    method: str | None = None
    path: str | None = None
    where: Callable[[FaultRecord], bool] | None = None
    nth: int = 1
    times: int | None = 1
    matched: int = 0
    fired: int = 0

    def matches(self, rec: FaultRecord) -> bool:
        return ((self.method is None or rec.method == self.method.upper())
                and (self.path is None or self.path in rec.path_qs)
                and (self.where is None or bool(self.where(rec))))

    def acts_on(self, number: int) -> bool:
        return number >= self.nth and (self.times is None or number < self.nth + self.times)


class FaultRelay(Relay):
    """A :class:`Relay` that injects :class:`Fault` s on chosen requests."""

    def __init__(self, upstream: str, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self.rules: list[Rule] = []
        self._rules_lock = threading.Lock()
        self._release_generation = 0

    # -- rules
    def inject(self, fault: Fault, *, method: str | None = None, path: str | None = None,
               where: Callable[[FaultRecord], bool] | None = None, nth: int = 1,
               times: int | None = 1) -> Rule:
        """Act with `fault` on matches `nth .. nth+times-1` of (method, path, where)."""
        rule = Rule(fault, method, path, where, nth, times)
        with self._rules_lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule (requests in flight keep their fault) and release hangs."""
        with self._rules_lock:
            self.rules = []
        self.release()

    def release(self) -> None:
        """End every hang and stall now (their connections are closed)."""
        self._release_generation += 1

    def _pick(self, rec: FaultRecord) -> Fault | None:
        with self._rules_lock:
            chosen = None
            for rule in self.rules:
                if rule.matches(rec):
                    rule.matched += 1
                    if chosen is None and rule.acts_on(rule.matched):
                        rule.fired += 1
                        chosen = rule.fault
            return chosen

    # -- queries
    def ranged(self, path_contains: str | None = None) -> list[RelayRecord]:
        """GET records that carried a `Range` header (resumed fetches)."""
        return [r for r in self.records
                if r.method == "GET" and (path_contains is None or path_contains in r.path_qs)
                and any(k.lower() == "range" for k in (r.request_headers or {}))]

    def faulted(self, kind: str | None = None) -> list[FaultRecord]:
        """Records a fault acted on (of `kind`, or any)."""
        return [r for r in self.records if isinstance(r, FaultRecord) and r.fault is not None
                and (kind is None or r.fault == kind)]

    # -- serving
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rec = FaultRecord(method=request.method, path_qs=request.raw_path,
                          request_headers=dict(request.headers), started_at=time.monotonic())
        fault = self._pick(replace(rec)) if not self.down else None
        if fault is None:
            return await super()._handle(request)
        rec.fault = fault.kind
        with self._rec_lock:
            self._records.append(rec)
        upstream_resp: aiohttp.ClientResponse | None = None
        try:
            if fault.kind == "drop":
                rec.error = "fault: dropped before headers"
                _abort(request)
                return web.Response(status=502)
            if fault.kind == "hang":
                await self._wait_released(request)
                rec.error = "fault: hung before headers"
                _abort(request)
                return web.Response(status=502)
            if not fault.proxied:
                return await self._answer_locally(request, rec, fault)
            upstream_resp = await self._open_upstream(request, fault)
            if upstream_resp is None:
                rec.error = "upstream unreachable"
                _abort(request)
                return web.Response(status=502)
            return await self._shape(request, rec, fault, upstream_resp)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            rec.error = rec.error or f"client: {exc!r}"
            _abort(request)
            return web.Response(status=502)
        finally:
            if upstream_resp is not None:
                upstream_resp.close()
            rec.done = True
            rec.finished_at = time.monotonic()

    async def _wait_released(self, request: web.BaseRequest) -> None:
        generation = self._release_generation
        deadline = time.monotonic() + _MAX_WAIT
        while (self._release_generation == generation and time.monotonic() < deadline
               and request.transport is not None and not request.transport.is_closing()):
            await asyncio.sleep(0.02)

    async def _open_upstream(self, request: web.BaseRequest,
                             fault: Fault) -> aiohttp.ClientResponse | None:
        headers = CIMultiDict()
        for key, value in request.headers.items():
            if key.lower() not in _HOP_BY_HOP:
                headers.add(key, value)
        path = fault.path_fn(request.raw_path) if fault.path_fn is not None else request.raw_path
        assert self._session is not None
        try:
            return await self._session.request(
                request.method, URL(self.upstream + path, encoded=True), headers=headers,
                data=request.content if request.body_exists else None, allow_redirects=False,
                skip_auto_headers=[h for h in _CLIENT_AUTO_HEADERS if h not in request.headers],
                compress=None)
        except aiohttp.ClientError:
            return None

    async def _answer_locally(self, request: web.BaseRequest, rec: FaultRecord,
                              fault: Fault) -> web.StreamResponse:
        if fault.kind in ("status", "html"):
            rec.status = fault.code
            response = web.Response(status=fault.code, body=fault.body, headers=dict(fault.headers))
            if fault.content_type:
                response.headers["Content-Type"] = fault.content_type
            rec.response_bytes = len(fault.body or b"")
            return response
        rec.status = 200
        response = web.StreamResponse(status=200)
        response.headers["Content-Type"] = fault.content_type or "application/octet-stream"
        length = fault.length if fault.announce else None
        if length is not None:
            response.content_length = length
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        limit = _MAX_SYNTHETIC if fault.length is None else fault.length
        chunk = _body_chunk(fault)
        sent = 0
        while sent < limit:
            piece = chunk[: limit - sent] if fault.kind != "huge_manifest" or sent else _manifest_head(chunk)
            piece = piece[: limit - sent]
            rec.response_bytes += len(piece)
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def _shape(self, request: web.BaseRequest, rec: FaultRecord, fault: Fault,
                     upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        rec.status = upstream.status
        rec.response_headers = dict(upstream.headers)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _HOP_BY_HOP:
                response.headers.add(key, value)
        for key, value in fault.headers.items():
            response.headers[key] = value
        total = upstream.content_length
        if "Content-Length" in fault.headers:
            total = int(fault.headers["Content-Length"])
        kind = fault.kind
        if total is not None and kind == "pad" and fault.announce:
            response.content_length = total + fault.extra
        elif total is not None and kind == "short":
            response.content_length = max(0, total - fault.missing)
        await response.prepare(request)
        if request.method == "HEAD":
            return response

        def at(value: int | None) -> int | None:
            if value is None:
                return None
            return value if value >= 0 or total is None else max(0, total + value)

        cut = at(fault.after)
        flip = at(fault.offset)
        stop = (total - fault.missing) if kind in ("truncate", "short") and total is not None else None
        position = 0
        while True:
            chunk = await upstream.content.read(64 * 1024)
            if not chunk:
                break
            if stop is not None:
                chunk = chunk[: max(0, stop - position)]
            if kind == "corrupt" and flip is not None and position <= flip < position + len(chunk):
                data = bytearray(chunk)
                data[flip - position] ^= 0xFF
                chunk = bytes(data)
            if kind in ("reset", "stall", "trickle") and cut is not None and position + len(chunk) >= cut:
                await self._send(response, rec, chunk[: cut - position])
                rest = chunk[cut - position:]
                return await self._after_cut(request, response, rec, fault, upstream, rest)
            if kind == "throttle" and fault.rate:
                await asyncio.sleep(len(chunk) / fault.rate)
            await self._send(response, rec, chunk)
            position += len(chunk)
            if stop is not None and position >= stop:
                break
        if kind == "pad":
            await self._send(response, rec, os.urandom(fault.extra))
        if kind == "truncate":
            rec.error = "fault: truncated, then closed"
            if request.transport is not None:
                request.transport.close()  # a clean FIN after what was sent
            return response
        await response.write_eof()
        return response

    async def _after_cut(self, request: web.BaseRequest, response: web.StreamResponse, rec: FaultRecord,
                         fault: Fault, upstream: aiohttp.ClientResponse, rest: bytes) -> web.StreamResponse:
        if fault.kind == "reset":
            rec.error = f"fault: reset after {rec.response_bytes} bytes"
            _abort(request)
            return response
        if fault.kind == "stall":
            await self._wait_released(request)
            rec.error = f"fault: stalled after {rec.response_bytes} bytes"
            _abort(request)
            return response
        # trickle: the rest at `rate` bytes per second, one write per byte at 1 byte/s
        assert fault.rate
        step = max(1, int(fault.rate))
        pending = bytearray(rest)
        while True:
            while len(pending) < step:
                more = await upstream.content.read(64 * 1024)
                if not more:
                    break
                pending += more
            if not pending:
                break
            if request.transport is None or request.transport.is_closing():
                rec.error = "client left during trickle"
                return response
            await asyncio.sleep(1.0)
            piece, pending = bytes(pending[:step]), pending[step:]
            await self._send(response, rec, piece)
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, rec: FaultRecord, data: bytes) -> None:
        """Write body bytes, shaped by the link's `rate` like every relayed byte."""
        if not data:
            return
        rate = self.rate
        if rate and self._bucket is not None:
            await self._bucket.consume(len(data), rate)
        rec.response_bytes += len(data)
        await response.write(data)


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


def _body_chunk(fault: Fault) -> bytes:
    if fault.kind == "huge_manifest":
        return b'"' + b"a" * (64 * 1024 - 2) + b'"'  # JSON-ish filler
    return b"\0" * (64 * 1024)


def _manifest_head(chunk: bytes) -> bytes:
    head = b'{"schemaVersion":2,"mediaType":"' + DOCKER_SCHEMA2.encode() + b'","pad":'
    return head + chunk[len(head):]


# --------------------------------------------------------------------------- the node as a process


class NodeProcess:
    """`python -m mirror serve CFG` in a subprocess, for crash, load and soak tests.

    Args:
        root: a directory of its own (config, store, log).
        remote_url: `proxy.remoteurl`.
        mirror: `mirror:` settings (e.g. ``upstream={"read_timeout": "1s"}``).
        nofile: a soft RLIMIT_NOFILE to start the process with (the node raises
            its own soft limit to the hard one at start).
    """

    def __init__(self, root: Path, remote_url: str, *, nofile: int | None = None,
                 config: dict[str, Any] | None = None, **mirror: Any) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = config or {
            "version": 0.1,
            "log": {"level": "info"},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "store")}},
            "http": {"addr": f"{LOOPBACK}:{self.port}"},
            "proxy": {"remoteurl": remote_url},
            "mirror": {"negative_ttl": "0s", "workers": 1, **mirror},
        }
        self.config_path = self.root / "config.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        argv = [sys.executable, "-m", "mirror", "serve", str(self.config_path)]
        if nofile is not None:
            argv = ["prlimit", f"--nofile={nofile}:{_hard_nofile()}", "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = f"{repo_root}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else repo_root
        self.process = ManagedProcess(argv, env=env, log_dir=self.root, name="mirror")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def metadata_db(self) -> Path:
        return self.store / "metadata" / "metadata.sqlite"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.process.start()
        wait_http(f"{self.url}/v2/", timeout=timeout, process=self.process)
        return self

    def kill9(self) -> None:
        self.process.kill9()

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> NodeProcess:
        self.process.stop()
        return self.start()

    def server_pid(self) -> int | None:
        """The Python process itself (prlimit execs it, so the same pid)."""
        return self.process.pid

    def status_field(self, name: str) -> int:
        """A `/proc/PID/status` value in KiB (VmHWM, VmRSS) or count (Threads)."""
        pid = self.server_pid()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
        raise KeyError(name)

    def nofile_limit(self) -> tuple[int, int]:
        """(soft, hard) RLIMIT_NOFILE of the running node."""
        for line in Path(f"/proc/{self.server_pid()}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                parts = line.split()
                return int(parts[3]), int(parts[4])
        raise KeyError("Max open files")

    def log_text(self) -> str:
        return self.process.log_text()

    def close(self) -> None:
        self.process.close()

    def __enter__(self) -> NodeProcess:  # noqa: PYI034 - start() returns self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hard_nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# --------------------------------------------------------------------------- a lean client


MANIFEST_ACCEPT = f"{DOCKER_SCHEMA2}, application/vnd.oci.image.manifest.v1+json"


@dataclass
class Fetched:
    """One response as a raw client saw it."""

    status: int
    length: int | None  # Content-Length announced
    received: int
    digest: str  # sha256 of what was received
    body: bytes = b""

    @property
    def whole(self) -> bool:
        return self.length is not None and self.received == self.length


class RawClient:
    """A minimal keep-alive HTTP/1.1 GET client, cheap enough for hundreds at once.

    A connection cut mid-body is not an exception: the short `Fetched` is
    returned (and the connection dropped), so callers can tell "aborted short"
    from "complete but wrong".
    """

    def __init__(self, port: int, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, headers: Mapping[str, str] | None = None, keep_body: bool = False,
                  timeout: float = 60.0) -> Fetched:
        return await asyncio.wait_for(self._get(path, headers, keep_body), timeout)

    async def _get(self, path: str, headers: Mapping[str, str] | None, keep_body: bool) -> Fetched:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"GET {path} HTTP/1.1", "Host: node"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise ConnectionResetError("connection closed before a response") from None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        length = int(fields["content-length"]) if "content-length" in fields else None
        remaining = length or 0
        hasher = hashlib.sha256()
        body = bytearray()
        received = 0
        try:
            while remaining:
                chunk = await self.reader.read(min(remaining, MiB))
                if not chunk:
                    break
                hasher.update(chunk)
                received += len(chunk)
                remaining -= len(chunk)
                if keep_body or int(status_line.split()[1]) >= 300:
                    body += chunk
        except ConnectionError:
            pass
        if remaining or fields.get("connection", "").lower() == "close":
            await self.close()
        return Fetched(int(status_line.split()[1]), length, received, f"sha256:{hasher.hexdigest()}", bytes(body))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class Pulled:
    """The outcome of one image pull."""

    ok: bool = False
    bytes: int = 0
    requests: int = 0
    error: str | None = None
    wrong: list[str] = field(default_factory=list)  # complete-looking responses with wrong bytes


async def pull_image(port: int, repo: str, reference: str, *, host: str = LOOPBACK,
                     timeout: float = 60.0) -> Pulled:
    """Pull an image as a client does (manifest, then every blob), verifying each digest.

    A body that arrived whole (`Content-Length` bytes) but hashes to something
    else is recorded in `wrong`: that is the one thing that must never happen.
    """
    client = RawClient(port, host)
    result = Pulled()
    try:
        manifest = await client.get(f"/v2/{repo}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT},
                                    keep_body=True, timeout=timeout)
        result.requests += 1
        if manifest.status != 200 or not manifest.whole:
            result.error = f"manifest: {manifest.status}, {manifest.received}/{manifest.length} bytes"
            return result
        if reference.startswith("sha256:") and manifest.digest != reference:
            result.wrong.append(f"manifest {reference} hashed to {manifest.digest}")
            return result
        document = json.loads(manifest.body)
        wanted = [document["config"]["digest"]] + [layer["digest"] for layer in document["layers"]]
        for digest in wanted:
            blob = await client.get(f"/v2/{repo}/blobs/{digest}", timeout=timeout)
            result.requests += 1
            result.bytes += blob.received
            if blob.status == 200 and blob.whole and blob.digest != digest:
                result.wrong.append(f"blob {digest} hashed to {blob.digest}")
            if blob.status != 200 or not blob.whole or blob.digest != digest:
                result.error = f"blob {digest[:19]}: {blob.status}, {blob.received}/{blob.length} bytes"
                return result
        result.ok = True
    except (TimeoutError, OSError, ValueError, KeyError) as exc:
        result.error = repr(exc)
    finally:
        await client.close()
    return result


# --------------------------------------------------------------------------- store invariants


@dataclass
class StoreCheck:
    """What :func:`check_store` found; `problems` must be empty."""

    objects: dict[str, int] = field(default_factory=dict)  # digest -> size of verified files
    temp_files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # objects table: digest -> size
    quarantined: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _iter_object_files(store: Path) -> Iterator[tuple[str, Path]]:
    objects = store / "objects"
    if not objects.is_dir():
        return
    for algorithm in sorted(objects.iterdir()):
        for prefix in sorted(algorithm.iterdir()):
            for entry in sorted(prefix.iterdir()):
                yield f"{algorithm.name}:{entry.name}", entry


def check_store(store: Path, metadata_db: Path | None = None, *, allow_temp: bool = False) -> StoreCheck:
    """Re-hash every object file, list temp files, and check metadata rows against files.

    Problems: an object whose bytes do not hash to its file name, a file not
    under its prefix directory, a temp file left (unless `allow_temp`), and
    an `objects` row with no file or a file of another size.
    """
    check = StoreCheck()
    for digest, path in _iter_object_files(store):
        algorithm, hexpart = digest.split(":", 1)
        if path.parent.name != hexpart[:2]:
            check.problems.append(f"{digest}: stored under {path.parent.name}/")
        hasher = hashlib.new(algorithm)
        size = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(MiB):
                hasher.update(chunk)
                size += len(chunk)
        if hasher.hexdigest() != hexpart:
            check.problems.append(f"{digest}: content hashes to {hasher.hexdigest()[:12]}…")
        check.objects[digest] = size
    tmp = store / "tmp"
    if tmp.is_dir():
        check.temp_files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".part")
        if check.temp_files and not allow_temp:
            check.problems.append(f"temp files left: {check.temp_files}")
    quarantine = store / "quarantine"
    if quarantine.is_dir():
        check.quarantined = sorted(p.name for p in quarantine.iterdir())
    if metadata_db is not None and metadata_db.exists():
        db = sqlite3.connect(f"file:{metadata_db}?mode=ro", uri=True, timeout=10)
        try:
            rows = db.execute("SELECT digest, size FROM objects").fetchall()
        finally:
            db.close()
        for digest, size in rows:
            check.rows[digest] = size
            actual = check.objects.get(digest)
            if actual is None:
                check.problems.append(f"row {digest} has no object file")
            elif actual != size:
                check.problems.append(f"row {digest} says {size} bytes, file has {actual}")
    return check
