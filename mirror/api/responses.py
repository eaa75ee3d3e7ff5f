"""Blob bodies: sendfile from a stored object, or a read-along of a fetch."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from mirror import errors
from mirror.proxy.fetcher import BlobFetch, open_for_read
from mirror.storage.blobstore import BlobStore

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
#: Stored blobs go out in sendfile steps this large: each step waits for the
#: socket buffer to drain before the next starts, so small steps stall the pipe.
SENDFILE_STEP = 8 * READ_CHUNK


class SendfileResponse(web.StreamResponse):
    """Send `count` bytes of an already open, size-checked descriptor.

    The store opens (and checks) the object before the response starts, so
    eviction or quarantine after that point cannot change what is sent: the
    descriptor keeps the verified inode alive. `release` (the quota's reader
    count) is called once the descriptor is closed. It is sent in
    `SENDFILE_STEP`s; a client that accepts nothing for `idle_timeout` (it
    stopped reading) is cut, as readers of a fetch are.
    """

    def __init__(self, fd: int, offset: int, count: int, release: Callable[[], None] | None = None,
                 idle_timeout: float | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._fd = fd
        self._release = release
        self._idle_timeout = idle_timeout
        self._offset = offset
        self._count = count
        self.content_length = count
        self.sent = 0  # sendfile bypasses the writer's byte count

    async def prepare(self, request: web.BaseRequest) -> object:
        if self.prepared:  # aiohttp calls prepare again after the handler chain
            return await super().prepare(request)
        writer = None
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD" and self._count and request.transport is not None:
                loop = asyncio.get_running_loop()
                with os.fdopen(self._fd, "rb", closefd=False) as fobj:
                    while self.sent < self._count and request.transport is not None:
                        step = min(SENDFILE_STEP, self._count - self.sent)
                        sending = loop.sendfile(request.transport, fobj, self._offset + self.sent, step)
                        self.sent += await _unless_stalled(sending, request, self._idle_timeout)
                await super().write_eof()
            return writer
        except (TimeoutError, ConnectionError, RuntimeError):  # stalled, gone, or transport closing
            _abort(request)
            return writer
        finally:
            os.close(self._fd)
            if self._release is not None:
                self._release()


async def _unless_stalled(sending: Awaitable[int], request: web.BaseRequest,
                          idle_timeout: float | None) -> int:
    """Await a sendfile step, cutting a client that accepts nothing for `idle_timeout`.

    Progress is read from the socket's unsent-bytes counter (SIOCOUTQ): a
    client that stopped reading leaves it full and unchanged, while a slow one
    keeps draining it, so a large step never mistakes slow for stalled.

    Raises:
        TimeoutError: the client accepted nothing for `idle_timeout`.
    """
    task = asyncio.ensure_future(sending)
    if idle_timeout is None:
        return await task
    sock = request.transport.get_extra_info("socket") if request.transport else None
    last = _unsent(sock)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=idle_timeout)
            if done:
                return task.result()
            queued = _unsent(sock)
            if queued is None or (queued > 0 and queued == last):
                raise TimeoutError("client stopped reading")
            last = queued
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _unsent(sock: socket.socket | None) -> int | None:
    """Bytes queued in the socket not yet acknowledged by the client (Linux)."""
    if sock is None:
        return None
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None


async def stream_fetch(request: web.Request, response: web.StreamResponse, fetch: BlobFetch,
                       store: BlobStore, executor: ThreadPoolExecutor, idle_timeout: float) -> web.StreamResponse:
    """Send a blob while it is being fetched, reading the growing temp file.

    The held-back tail is only released once the digest verified; if the
    fetch fails, the connection is aborted short of `Content-Length`. A
    client that stops reading for `idle_timeout` is cut without affecting the
    fetch or other readers. A fetch gone uncached (disk full) is read from its
    in-memory ring from where the temp file stopped; a reader that fell behind
    the ring is cut.
    """
    fd = open_for_read(fetch, store)
    loop = asyncio.get_running_loop()
    # Zero-copy from the temp file when the body is not chunked: the node's
    # memory stays flat however many clients read along (and however slowly).
    fobj = os.fdopen(fd, "rb", closefd=False) if fd is not None and response.content_length is not None else None
    try:
        await response.prepare(request)
        offset = 0
        response.sent = 0  # type: ignore[attr-defined]  # bytes sent, for the access log
        while True:
            limit = await fetch.readable(offset)
            if limit <= offset:
                break
            relay = fetch.relay
            if fobj is not None and (relay is None or offset < relay.start):
                end = limit if relay is None else min(limit, relay.start)
                if request.transport is None:
                    raise ConnectionResetError("client gone")
                sent = await asyncio.wait_for(
                    loop.sendfile(request.transport, fobj, offset, min(end - offset, READ_CHUNK)), idle_timeout)
                if not sent:
                    raise errors.Unavailable("blob shorter than announced")
                offset += sent
                response.sent = offset  # type: ignore[attr-defined]
                continue
            if relay is not None and (fd is None or offset >= relay.start):
                data = relay.read(offset, min(limit - offset, READ_CHUNK))
            else:
                assert fd is not None
                end = limit if relay is None else min(limit, relay.start)
                data = await loop.run_in_executor(executor, os.pread, fd, min(end - offset, READ_CHUNK), offset)
            if not data:
                raise errors.Unavailable("blob shorter than announced")
            await asyncio.wait_for(response.write(data), idle_timeout)
            offset += len(data)
            response.sent = offset  # type: ignore[attr-defined]
        await response.write_eof()
    except errors.RegistryError as exc:
        log.warning("aborting blob %s for a client after %s", fetch.digest, exc.code)
        _abort(request)
    except (TimeoutError, ConnectionError, RuntimeError):  # RuntimeError: "Transport is closing"
        _abort(request)
    finally:
        if fobj is not None:
            fobj.close()  # closefd=False: the descriptor is closed below
        if fd is not None:
            os.close(fd)
    return response


def _abort(request: web.BaseRequest) -> None:
    """Cut the connection so the client sees a short body, never a wrong one.

    With a zero linger the kernel resets the connection and drops what is
    still queued for a client that stopped reading, instead of trickling it
    out after the close (and holding the buffers) for as long as it likes.
    """
    if request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.transport.abort()
