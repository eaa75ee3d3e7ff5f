"""A counting, shaping HTTP reverse proxy to put between the mirror and upstream.

It runs an aiohttp server + client on its own event loop in a background thread,
so sync tests and async tests (whatever loop they use) can drive it alike::

    with Relay(registry.url) as relay:          # listens on 127.0.0.1:<free port>
        mirror_upstream = relay.url
        ...
        relay.count("GET", "/blobs/")            # requests seen (incl. in flight)
        relay.bytes_sent("/blobs/")              # body bytes relayed to the client
        relay.rate = 2_000_000                   # shape the whole link, bytes/s
        relay.latency = 0.2                      # before each response starts
        relay.paused = True                      # stall responses until False
        relay.down = True                        # cut the link: refuse + reset
        relay.down = False                       # restore
        relay.upstream = other_registry.url      # re-point (e.g. after a restart)
        relay.fault = lambda rec: 503 if "/manifests/" in rec.path_qs else None
        relay.wait_for(1, "GET", "/blobs/")      # poll until seen (sync / *_async)
        relay.wait_idle()                        # poll until nothing in flight

Semantics:
* bodies are streamed both ways, never buffered; status, reason and all end-to-end
  headers (WWW-Authenticate, Location, Range/Content-Range, Content-Length,
  Docker-Content-Digest, ...) pass through unchanged. Locations are NOT rewritten.
* ``Host`` is passed through unchanged by default (like a TCP link), so upstream
  builds absolute URLs for the relay's address; ``preserve_host=False`` sends the
  upstream's own host instead.
* no automatic headers are added upstream (no Accept-Encoding, no User-Agent) and
  content is never decoded.
* upstream unreachable or failing mid-body => the client's connection is aborted
  (what a TCP-level link would show), and the record gets ``error`` set;
  ``relay.upstream_error_status = 502`` answers unreachable-upstream with 502 instead.
* ``down = True`` closes the listening socket (new connects are refused) and resets
  every open connection, including in-flight transfers.
* a client disconnecting mid-response cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .procs import LOOPBACK, free_port

__all__ = ["Relay", "RelayRecord", "RelayRequest", "run_relay"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
# headers aiohttp's client would add on its own if absent
_CLIENT_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class RelayRequest(NamedTuple):
    """The 4-tuple view of a relayed request (unpackable)."""

    method: str
    path_qs: str
    status: int | None
    response_bytes: int


@dataclass
class RelayRecord:
    """Full detail of one relayed request (a snapshot copy when read from Relay)."""

    method: str
    path_qs: str
    status: int | None = None  # None until upstream's response headers arrived
    response_bytes: int = 0  # body bytes written to the client
    request_bytes: int = 0  # body bytes forwarded upstream
    request_headers: dict[str, str] | None = None
    response_headers: dict[str, str] | None = None
    done: bool = False  # response finished (successfully or not)
    error: str | None = None  # set when the exchange failed/was cut
    started_at: float = 0.0  # time.monotonic()
    finished_at: float | None = None

    def as_tuple(self) -> RelayRequest:
        return RelayRequest(self.method, self.path_qs, self.status, self.response_bytes)


class _TokenBucket:
    """Shared by all streams of one relay: the link's capacity."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def consume(self, n: int, rate: float) -> None:
        async with self.lock:
            now = time.monotonic()
            burst = rate * 0.05
            self.tokens = min(burst, self.tokens + (now - self.last) * rate)
            self.last = now
            self.tokens -= n
            if self.tokens < 0:
                # holding the lock while sleeping serialises streams fairly (FIFO lock)
                await asyncio.sleep(-self.tokens / rate)


class Relay:
    def __init__(
        self,
        upstream: str,
        *,
        port: int | None = None,
        preserve_host: bool = True,
        chunk_size: int = 256 * 1024,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port if port is not None else free_port()
        self.preserve_host = preserve_host
        self.chunk_size = chunk_size
        self.rate: float | None = None
        self.latency: float = 0.0
        #: None: abort the client connection when upstream can't be reached (TCP-like);
        #: an int (e.g. 502): answer with that status instead, like a gateway would.
        self.upstream_error_status: int | None = None
        #: optional hook(request_record) -> None|int status to answer locally (e.g. 503)
        self.fault: Callable[[RelayRecord], int | None] | None = None
        self._records: list[RelayRecord] = []
        self._rec_lock = threading.Lock()
        self._down = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        # loop-side objects
        self._server: web.Server | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._bucket: _TokenBucket | None = None
        self._unpaused: asyncio.Event | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Relay:
        if self._thread is not None:
            raise RuntimeError("relay already started")
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start within 10s")
        if self._start_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"relay failed to start: {self._start_error!r}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._teardown(), loop).result(15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(15)
            self._thread = None

    def __enter__(self) -> Relay:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._setup())
            except BaseException as e:  # report to start(), never raise in the thread
                self._start_error = e
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            except BaseException:
                pass
            loop.close()
            self._loop = None

    async def _setup(self) -> None:
        self._bucket = _TokenBucket()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            trust_env=False,
            skip_auto_headers=_CLIENT_AUTO_HEADERS,
        )
        self._server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        if not self._down:
            await self._listen()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._server, LOOPBACK, self.port, reuse_address=True, backlog=512
        )

    async def _unlisten_and_reset(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await _abort_all(self._server)

    async def _teardown(self) -> None:
        await self._unlisten_and_reset()
        if self._server is not None:
            await self._server.shutdown(1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _call(self, coro_fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        loop = self._loop
        if loop is None or self._thread is None:
            return None
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot drive the relay from its own thread")
        return asyncio.run_coroutine_threadsafe(coro_fn(), loop).result(timeout)

    # ------------------------------------------------------------------ controls
    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        value = bool(value)
        if value == self._down:
            return
        self._down = value
        if self._thread is None:
            return
        if value:
            self._call(self._unlisten_and_reset)
        else:
            self._call(self._listen)

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = bool(value)
        loop, ev = self._loop, self._unpaused
        if loop is not None and ev is not None:
            loop.call_soon_threadsafe(ev.clear if value else ev.set)

    # ------------------------------------------------------------------ records
    @property
    def records(self) -> list[RelayRecord]:
        """Snapshot copies of all records (in flight ones have ``done=False``)."""
        with self._rec_lock:
            return [replace(r) for r in self._records]

    @property
    def requests(self) -> list[RelayRequest]:
        """``(method, path_qs, status, response_bytes)`` for every request seen."""
        with self._rec_lock:
            return [r.as_tuple() for r in self._records]

    def _match(
        self,
        r: RelayRecord,
        method: str | None,
        path_contains: str | None,
        status: int | None,
        done: bool | None,
    ) -> bool:
        return (
            (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path_qs)
            and (status is None or r.status == status)
            and (done is None or r.done == done)
        )

    def count(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        done: bool | None = None,
    ) -> int:
        """Number of requests seen (in flight included unless ``done=True``)."""
        with self._rec_lock:
            return sum(
                1 for r in self._records if self._match(r, method, path_contains, status, done)
            )

    def bytes_sent(self, path_contains: str | None = None, method: str | None = None) -> int:
        """Response body bytes relayed to clients."""
        with self._rec_lock:
            return sum(
                r.response_bytes
                for r in self._records
                if self._match(r, method, path_contains, None, None)
            )

    def bytes_received(self, path_contains: str | None = None, method: str | None = None) -> int:
        """Request body bytes relayed upstream."""
        with self._rec_lock:
            return sum(
                r.request_bytes
                for r in self._records
                if self._match(r, method, path_contains, None, None)
            )

    def in_flight(self) -> int:
        with self._rec_lock:
            return sum(1 for r in self._records if not r.done)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Poll until no exchange is in flight (all records ``done``)."""
        deadline = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay still busy: {[r for r in self.records if not r.done]}")
            time.sleep(0.005)

    async def wait_idle_async(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay still busy: {[r for r in self.records if not r.done]}")
            await asyncio.sleep(0.005)

    def reset(self) -> None:
        """Forget all records (in-flight exchanges keep updating their own objects)."""
        with self._rec_lock:
            self._records = []

    def wait_for(
        self,
        n: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        done: bool | None = None,
        timeout: float = 10.0,
    ) -> int:
        """Poll until ``count(...) >= n``; returns the count. Blocking (ms granularity)."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.count(method, path_contains, status=status, done=done)
            if c >= n:
                return c
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"relay saw {c} < {n} matching requests ({method}, {path_contains!r}); "
                    f"all: {self.requests}"
                )
            time.sleep(0.005)

    async def wait_for_async(
        self,
        n: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        *,
        status: int | None = None,
        done: bool | None = None,
        timeout: float = 10.0,
    ) -> int:
        """Async twin of :meth:`wait_for` (does not block the caller's loop)."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.count(method, path_contains, status=status, done=done)
            if c >= n:
                return c
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"relay saw {c} < {n} matching requests ({method}, {path_contains!r}); "
                    f"all: {self.requests}"
                )
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ proxying
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rec = RelayRecord(
            method=request.method,
            path_qs=request.raw_path,
            request_headers=dict(request.headers),
            started_at=time.monotonic(),
        )
        with self._rec_lock:
            self._records.append(rec)
        upstream_resp: aiohttp.ClientResponse | None = None
        response: web.StreamResponse | None = None
        try:
            if self._down:
                raise _Cut("relay down")
            if self.fault is not None:
                code = self.fault(replace(rec))
                if code is not None:
                    rec.status = code
                    return web.Response(status=code, text=f"relay fault {code}\n")

            headers = CIMultiDict()
            for k, v in request.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    headers.add(k, v)
            if not self.preserve_host:
                headers.popall("Host", None)
                headers["Host"] = URL(self.upstream).raw_authority
            skip = [h for h in _CLIENT_AUTO_HEADERS if h not in request.headers]

            data = self._request_body(request, rec) if request.body_exists else None
            target = URL(self.upstream + request.raw_path, encoded=True)
            assert self._session is not None
            try:
                upstream_resp = await self._session.request(
                    request.method,
                    target,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    skip_auto_headers=skip,
                    compress=None,
                )
            except aiohttp.ClientError as e:
                if self.upstream_error_status is not None:
                    rec.status = self.upstream_error_status
                    rec.error = f"upstream: {e!r}"
                    return web.Response(
                        status=self.upstream_error_status, text=f"relay: upstream error {e!r}\n"
                    )
                raise _Cut(f"upstream: {e!r}") from e

            rec.status = upstream_resp.status
            rec.response_headers = dict(upstream_resp.headers)
            if self.latency:
                await asyncio.sleep(self.latency)
            await self._wait_unpaused()
            if self._down:
                raise _Cut("relay down")

            response = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason)
            for k, v in upstream_resp.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    response.headers.add(k, v)
            # Records are updated *before* the bytes go out, so that once a client has
            # the whole response the record is already complete (no accounting race).
            expected = upstream_resp.content_length
            if request.method == "HEAD" or upstream_resp.status in (204, 304):
                expected = 0
            if expected == 0:
                rec.done = True
            await response.prepare(request)

            if request.method != "HEAD":
                assert self._bucket is not None
                while True:
                    rate = self.rate
                    n = (
                        self.chunk_size
                        if not rate
                        else max(1024, min(self.chunk_size, int(rate / 20)))
                    )
                    try:
                        chunk = await upstream_resp.content.read(n)
                    except (TimeoutError, aiohttp.ClientError) as e:
                        raise _Cut(f"upstream body: {e!r}") from e
                    if not chunk:
                        break
                    await self._wait_unpaused()
                    rate = self.rate
                    if rate:
                        await self._bucket.consume(len(chunk), rate)
                    if self._down:
                        raise _Cut("relay down")
                    rec.response_bytes += len(chunk)
                    if expected is not None and rec.response_bytes >= expected:
                        rec.done = True
                    try:
                        await response.write(chunk)
                    except BaseException:
                        rec.response_bytes -= len(chunk)
                        raise
            rec.done = True
            await response.write_eof()
            return response
        except _Cut as e:
            rec.error = str(e)
            if request.transport is not None:
                request.transport.abort()
            # the transport is gone; aiohttp will not manage to send anything
            return response if response is not None else web.Response(status=502)
        except asyncio.CancelledError:
            rec.error = rec.error or "cancelled (client went away or relay cut)"
            raise
        except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
            rec.error = f"client: {e!r}"
            if request.transport is not None:
                request.transport.abort()
            return response if response is not None else web.Response(status=502)
        finally:
            if upstream_resp is not None:
                upstream_resp.close()
            rec.done = True
            rec.finished_at = time.monotonic()

    async def _wait_unpaused(self) -> None:
        ev = self._unpaused
        if ev is not None and not ev.is_set():
            await ev.wait()

    async def _request_body(self, request: web.BaseRequest, rec: RelayRecord):  # type: ignore[no-untyped-def]
        async for chunk in request.content.iter_any():
            rec.request_bytes += len(chunk)
            yield chunk


class _Cut(Exception):
    pass


async def _abort_all(server: web.Server | None) -> None:
    """Reset every connection of ``server``, including ones whose accept was still
    in progress when the listener closed (asyncio finishes accepts in a task; a
    transport left behind would surface later as an 'unclosed transport'
    ResourceWarning from the garbage collector)."""
    if server is None:
        return
    for _ in range(3):
        await asyncio.sleep(0)  # let pending accept tasks / connection_lost run
        for handler in list(server.connections):
            tr = handler.transport
            if tr is not None:
                tr.abort()
    await asyncio.sleep(0)


class EventSink:
    """Receives distribution's notification envelopes (background thread + loop).

        with EventSink() as sink:
            run_registry(..., notifications=[sink.endpoint()])
            sink.wait_for(lambda e: e["action"] == "push")

    Responses use ``Connection: close`` so no idle keep-alive connection outlives
    the sender.
    """

    def __init__(self, port: int | None = None, path: str = "/events") -> None:
        self.port = port if port is not None else free_port()
        self.path = path
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: web.Server | None = None
        self._listener: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{self.path}"

    def endpoint(self, name: str = "sink", **kw: Any) -> dict[str, Any]:
        """An entry for ``run_registry(notifications=[...])``."""
        return {"name": name, "url": self.url, **kw}

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], n: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Poll until ``n`` events match; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [e for e in self.events if predicate(e)]
            if len(hits) >= n:
                return hits
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(hits)} < {n} matching events; got {self.events}")
            time.sleep(0.01)

    async def wait_for_async(
        self, predicate: Callable[[dict[str, Any]], bool], n: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            hits = [e for e in self.events if predicate(e)]
            if len(hits) >= n:
                return hits
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(hits)} < {n} matching events; got {self.events}")
            await asyncio.sleep(0.01)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        resp = web.Response(status=200)
        resp.force_close()
        if request.method == "POST" and request.path == self.path:
            try:
                events = json.loads(body).get("events", [])
            except ValueError:
                return web.Response(status=400)
            with self._lock:
                self._events.extend(events)
        return resp

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:

                async def setup() -> None:
                    self._server = web.Server(self._handle, access_log=None)
                    self._listener = await loop.create_server(
                        self._server, LOOPBACK, self.port, reuse_address=True
                    )

                loop.run_until_complete(setup())
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    def start(self) -> EventSink:
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"event sink failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def teardown() -> None:
            if self._listener is not None:
                self._listener.close()
            await _abort_all(self._server)
            if self._server is not None:
                await self._server.shutdown(1.0)

        try:
            asyncio.run_coroutine_threadsafe(teardown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._thread = None

    def __enter__(self) -> EventSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class run_relay:
    """``with run_relay(upstream_url, **kw) as relay:`` — start and always stop."""

    def __init__(self, upstream: str, **kwargs: Any) -> None:
        self.relay = Relay(upstream, **kwargs)

    def __enter__(self) -> Relay:
        return self.relay.start()

    def __exit__(self, *exc: object) -> None:
        self.relay.stop()
