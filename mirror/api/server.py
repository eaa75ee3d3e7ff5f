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
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mirror.config import Settings

log = logging.getLogger(__name__)

#: Seconds a client has to send complete request headers (nginx: client_header_timeout).
HEADER_TIMEOUT = 10.0
#: Seconds an idle kept-alive connection is kept (aiohttp's handler default is an hour).
KEEPALIVE_TIMEOUT = 75.0


#: The aiohttp internals the handler reads; without them it stays out of the way.
SUPPORTED = all(hasattr(RequestHandler, name) for name in ("_waiter", "_messages", "_request_count"))


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


class MirrorRunner(web.AppRunner):
    """`web.AppRunner` with the header timeout and a 75 s keep-alive.

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
