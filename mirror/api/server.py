"""The HTTP server's connection limits that aiohttp does not have on its own.

aiohttp closes a connection that sends nothing for `keepalive_timeout`, but a
client that keeps a request's headers coming, one byte at a time
("slowloris"), holds its connection (and a file descriptor) for as long as
it likes. :class:`MirrorRunner` serves with :class:`HeaderTimeoutHandler`,
which closes a connection whose request headers are not complete
`HEADER_TIMEOUT` seconds after the connection opened, or after the first
byte of a later request on a kept-alive connection arrived. Trickling bytes
does not extend the deadline. Bodies are not concerned (uploads stream at
their own pace; `mirror.client_idle_timeout` cuts stalled blob readers).

This is the node's own defence, so it holds with or without nginx in front;
`serve` also raises the process's soft `RLIMIT_NOFILE` to its hard limit, so
thousands of such connections cost descriptors, not the service.

Shutdown is bounded too: aiohttp's own cleanup waits up to 60 s for each
connection's handler, and then as long again after cancelling it, while
systemd and Kubernetes kill after 30 s, before the node has flushed anything.
:func:`drain` stops accepting, gives the requests in flight (counted by
:class:`InFlight`) `mirror.shutdown_grace`, then cuts what is left, so the
flush in the application's cleanup always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mirror.config import Settings

log = logging.getLogger(__name__)

#: Seconds a client has to send complete request headers (nginx: client_header_timeout).
HEADER_TIMEOUT = 10.0
#: Seconds an idle kept-alive connection is kept (aiohttp's handler default is an hour).
KEEPALIVE_TIMEOUT = 75.0


#: Seconds the handlers of cut connections get to unwind before the cleanup goes on.
CUT_WAIT = 2.0
#: aiohttp's own per-connection wait in `runner.cleanup()`, after :func:`drain` left none.
CLEANUP_TIMEOUT = 1.0

#: The aiohttp internals the handler reads; without them it stays out of the way.
SUPPORTED = all(hasattr(RequestHandler, name) for name in ("_waiter", "_messages", "_request_count"))


def warn_if_unguarded() -> bool:
    """Log a warning when this aiohttp lacks what the header timeout needs; True if guarded.

    The guard reads aiohttp internals; after an upgrade that renamed them it
    switches itself off rather than break serving, and this says so at start.
    """
    if not SUPPORTED:
        import aiohttp

        log.warning("the request-header timeout (slowloris guard) is INACTIVE: aiohttp %s lacks the "
                    "internals it needs; install the tested range from pyproject.toml",
                    aiohttp.__version__)
    return SUPPORTED


class HeaderTimeoutHandler(RequestHandler):
    """A request handler that closes connections stuck in request headers."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if SUPPORTED:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if not SUPPORTED:
            return super().data_received(data)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a complete request head was parsed
            self._disarm()
        elif self._waiting_for_request() and self._header_deadline is None:
            self._arm()  # the first bytes of a new request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request the HTTP parser refused gets the spec's JSON error, not plain text."""
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        from mirror.api.middleware import parser_refusal  # the one error mapping, at the route layer

        log.info("refused a malformed request from %s: %s", request.remote, str(exc).split("\n", 1)[0])
        return parser_refusal(status, exc)

    def _waiting_for_request(self) -> bool:
        return not self._messages and self._waiter is not None and not self._waiter.done()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self._loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if self.transport is not None and self._waiting_for_request():
            log.debug("closing a connection from %s: request headers not complete after %.0fs",
                     self.peername, self.header_timeout)
            self.force_close()


class HeaderTimeoutServer(web.Server):
    """`web.Server` whose connections are :class:`HeaderTimeoutHandler` s."""

    def __call__(self) -> RequestHandler:
        return HeaderTimeoutHandler(self, loop=self._loop, **self._kwargs)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """The requests being handled (their bodies included), so shutdown can wait for them.

    Its :attr:`middleware` goes first in the application's chain: the access
    log sends bodies inside the chain, so a request counts until its last
    byte is handed to the socket. aiohttp runs each request in a task of its
    own, which is what is tracked (and cancelled when the grace is over).
    """

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                return await handler(request)
            finally:
                self.tasks.discard(task)

        return in_flight

    async def wait(self, timeout: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout` s."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.wait(set(self.tasks), timeout=left)
        return True

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)


async def drain(runner: web.AppRunner, grace: float) -> int:
    """Stop accepting; give the requests in flight `grace` s; cut the rest. Returns how many were cut.

    Idle kept-alive connections close at once, busy ones after their
    response. A request still running after `grace` (a slow client mid-blob)
    is cancelled and its connection reset, so the client sees a short body,
    never a wrong one.
    """
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    in_flight = runner.app.get(IN_FLIGHT)
    if server is None or in_flight is None:
        return 0
    server.pre_shutdown()
    if in_flight.tasks:
        log.info("draining: %d requests in flight, waiting up to %.1fs", len(in_flight.tasks), grace)
    deadline = asyncio.get_running_loop().time() + grace
    if await in_flight.wait(grace):
        await _flushed(server, deadline)
        return 0
    cut = len(in_flight.tasks)
    log.warning("shutdown grace (%.1fs) over: cutting %d requests still in flight", grace, cut)
    for connection in server.connections:
        _zero_linger(connection.transport)  # the close that follows resets
    in_flight.cancel()
    await in_flight.wait(CUT_WAIT)
    return cut


async def _flushed(server: Any, deadline: float) -> None:
    """Wait (until `deadline`, loop time) for every connection's queued bytes to reach the kernel.

    A handler is done once its last bytes are *queued* on the transport; the
    event loop writes them out later. The loop ends soon after the drain, and
    what is still queued then is never sent: a drained download would lose its
    tail. The kernel sends what it holds after the process exits.
    """
    loop = asyncio.get_running_loop()
    while loop.time() < deadline and any(_queued(c) for c in server.connections):
        await asyncio.sleep(0.01)


def _queued(connection: RequestHandler) -> bool:
    transport = connection.transport
    return transport is not None and transport.get_write_buffer_size() > 0


def _zero_linger(transport: asyncio.BaseTransport | None) -> None:
    """Make the socket's close a reset: the kernel drops what a slow client has not read yet."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class MirrorRunner(web.AppRunner):
    """`web.AppRunner` with the header timeout and a 75 s keep-alive.

    `mirror serve` calls :func:`drain` before `cleanup()`, and builds it with
    `shutdown_timeout=CLEANUP_TIMEOUT` instead of aiohttp's 60 s.

    Args:
        app: the application.
        **kwargs: as for `web.AppRunner` (e.g. `access_log=None`).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:  # aiohttp builds a plain Server; serve ours
            server.__class__ = HeaderTimeoutServer
        return server


class TLSSetupError(OSError):
    """A TLS file named by the config cannot be used; the message names the key."""


_MINIMUM = {"tls1.3": ssl.TLSVersion.TLSv1_3}  # tls1.0/1.1/1.2: never below 1.2


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context for `http.tls`, or None for plain HTTP.

    TLS 1.2 or newer (1.3 with `minimumtls: tls1.3`). With `clientcas`, every
    connection must present a certificate chaining to one of those CAs
    (`CERT_REQUIRED`), as distribution's `RequireAndVerifyClientCert`; with
    `clientauth: verify-client-cert-if-given` one is verified when sent.

    Raises:
        TLSSetupError: a certificate, key or CA file is unreadable or unusable.
    """
    tls = settings.http.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _MINIMUM.get(tls.minimumtls, ssl.TLSVersion.TLSv1_2)
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"http.tls.certificate/key: cannot load {tls.certificate}: {exc}") from None
    for i, cafile in enumerate(tls.clientcas):
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"http.tls.clientcas[{i}]: cannot load {cafile}: {exc}") from None
    if tls.clientcas:
        required = tls.clientauth == "require-and-verify-client-cert"
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return context
