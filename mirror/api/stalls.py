"""nginx's `send_timeout` for the node's connections: a client that takes nothing is cut.

A connection is watched from its first API request until it closes. Every
quarter of `mirror.client_idle_timeout` the watch reads how many bytes the
client has acknowledged (Linux `TCP_INFO.tcpi_bytes_acked`) and how many are
still owed to it (the socket's unsent queue plus the transport's buffer).
The client is making progress when it owes nothing, or when it acknowledged
at least `MIN_PROGRESS` bytes (or all it was owed then) since the last mark; a
client owed bytes that makes no such progress for `client_idle_timeout` is
cut with a reset. This covers every way a body goes out (sendfile of a stored
blob, read-along of a fetch, a small manifest sitting in the buffers after
its handler returned) in one place.

Counting any acknowledged byte as progress is what let a client reading one
byte per second through a 4 KiB receive buffer hold its connection: its
window opens a few bytes at a time, so the unsent queue keeps changing.
nginx's timeout only ends a write once a good part of the send buffer has
drained; `MIN_PROGRESS` is that part, so a client must take at least 64 KiB
per `client_idle_timeout` (about 1 KiB/s at the default 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import time
import weakref

from aiohttp import web

log = logging.getLogger(__name__)

#: Bytes a client owed data must acknowledge per idle timeout to count as reading.
MIN_PROGRESS = 64 * 1024
#: Offset of `tcpi_bytes_acked` (u64) in Linux's `struct tcp_info` (since 4.1).
_BYTES_ACKED = 120
_TCP_INFO_SIZE = 128

_watches: weakref.WeakKeyDictionary[asyncio.BaseTransport, SendWatch] = weakref.WeakKeyDictionary()


def watch(request: web.BaseRequest, idle_timeout: float) -> None:
    """Watch the request's connection until it closes (once per connection)."""
    transport = request.transport
    if transport is None or transport.is_closing() or transport in _watches:
        return
    _watches[transport] = SendWatch(transport, idle_timeout)


class SendWatch:
    """Cuts one connection whose client stops taking what it is owed.

    Args:
        transport: the connection's transport.
        idle_timeout: seconds a client owed bytes may go without progress.
    """

    def __init__(self, transport: asyncio.BaseTransport, idle_timeout: float) -> None:
        self.transport = transport
        self.idle_timeout = idle_timeout
        self.sock: socket.socket | None = transport.get_extra_info("socket")
        self._loop = asyncio.get_running_loop()
        self._mark = (time.monotonic(), self._acked() or 0, self._owed())  # (when, acked, owed then)
        self._schedule()

    def _schedule(self) -> None:
        self._loop.call_later(max(0.05, self.idle_timeout / 4), self._tick)

    def _tick(self) -> None:
        if self.transport.is_closing():
            return
        now, acked, owed = time.monotonic(), self._acked(), self._owed()
        if acked is None:
            return  # not a TCP socket we can read (a test transport): nothing to judge
        if not owed or acked - self._mark[1] >= min(MIN_PROGRESS, self._mark[2]):
            self._mark = (now, acked, owed)
        elif now - self._mark[0] >= self.idle_timeout:
            log.info("cutting a client that took %d bytes in %.0fs with %d owed",
                     acked - self._mark[1], now - self._mark[0], owed)
            cut(self.transport)
            return
        self._schedule()

    def _acked(self) -> int | None:
        if self.sock is None:
            return None
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            return None
        if len(info) < _BYTES_ACKED + 8:
            return None
        return int(struct.unpack_from("Q", info, _BYTES_ACKED)[0])

    def _owed(self) -> int:
        buffered = self.transport.get_write_buffer_size() if isinstance(
            self.transport, asyncio.WriteTransport) else 0
        return buffered + (unsent(self.sock) or 0)


def unsent(sock: socket.socket | None) -> int | None:
    """Bytes queued in the socket not yet acknowledged by the client (Linux)."""
    if sock is None:
        return None
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return None


def cut(transport: asyncio.BaseTransport) -> None:
    """Reset a connection so the client sees a short body, never a wrong one.

    With a zero linger the kernel resets the connection and drops what is
    still queued for a client that stopped reading, instead of trickling it
    out after the close (and holding the buffers) for as long as it likes.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
