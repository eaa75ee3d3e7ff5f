"""Blob bodies: sendfile from a stored object, or a read-along of a fetch."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from aiohttp import web

from mirror import errors
from mirror.api.stalls import cut
from mirror.proxy.fetcher import BlobFetch, open_for_read
from mirror.storage.blobstore import BlobStore

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
#: Stored blobs go out in sendfile steps this large: each step waits for the
#: socket buffer to drain before the next starts, so small steps stall the pipe.
SENDFILE_STEP = 8 * READ_CHUNK
#: Bytes of a stored blob held back until its first-serve hash matched.
HOLD_BACK = READ_CHUNK
#: Seconds between checks that a connection waited on was not cut meanwhile.
CUT_POLL = 0.5
T = TypeVar("T")


class CorruptObject(Exception):
    """The stored object's bytes did not hash to its digest while it was sent."""


class SendfileResponse(web.StreamResponse):
    """Send `count` bytes of an already open, size-checked descriptor.

    The store opens (and checks) the object before the response starts, so
    eviction or quarantine after that point cannot change what is sent: the
    descriptor keeps the inode alive. `release` (the quota's reader count) is
    called once the descriptor is closed. It is sent in `SENDFILE_STEP`s
    (copied through the buffer where the loop has no sendfile, as uvloop);
    a client that stops taking them is cut by the connection's stall watch
    (`mirror.api.stalls`).

    With `verification` (the object is being hashed for the first time in
    this process), the last `HOLD_BACK` bytes wait until it says the bytes
    match: on a mismatch the connection is cut short of `Content-Length`, so
    a client never receives a complete body with wrong bytes.
    """

    def __init__(self, fd: int, offset: int, count: int, release: Callable[[], None] | None = None,
                 verification: Awaitable[bool] | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._fd = fd
        self._release = release
        self._verification = verification
        self._offset = offset
        self._count = count
        self._copying = False  # the loop has no sendfile
        self.content_length = count
        self.sent = 0  # sendfile bypasses the writer's byte count

    async def prepare(self, request: web.BaseRequest) -> object:
        if self.prepared:  # aiohttp calls prepare again after the handler chain
            return await super().prepare(request)
        writer = None
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD" and self._count:
                hold = min(self._count, HOLD_BACK) if self._verification is not None else 0
                await self._send_until(request, self._count - hold)
                if self._verification is not None and not await self._verified():
                    raise CorruptObject(f"{self._count - self.sent} bytes held back")
                await self._send_until(request, self._count)
            await super().write_eof()
            return writer
        except CorruptObject as exc:
            log.error("cut a blob response short: the stored object is corrupt (%s)", exc)
            _abort(request)
            return writer
        except (ConnectionError, RuntimeError, errors.RegistryError):  # gone, cut, or shorter than announced
            _abort(request)
            return writer
        finally:
            os.close(self._fd)
            if self._release is not None:
                self._release()
            if isinstance(self._verification, asyncio.Future):  # not awaited when the client left early
                self._verification.add_done_callback(_retrieve)

    async def _verified(self) -> bool:
        assert self._verification is not None
        try:
            return await self._verification
        except OSError as exc:  # unreadable (EIO): the rest cannot be trusted either
            raise CorruptObject(f"hashing failed: {exc}") from exc

    async def _send_until(self, request: web.BaseRequest, end: int) -> None:
        """Send the object's bytes up to `end` (of `count`), step by step."""
        loop = asyncio.get_running_loop()
        with os.fdopen(self._fd, "rb", closefd=False) as fobj:
            while self.sent < end:
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client gone")
                step = min(SENDFILE_STEP, end - self.sent)
                if self._copying:
                    self.sent += await self._copy_step(transport, step)
                    continue
                try:
                    sending = loop.sendfile(transport, fobj, self._offset + self.sent, step)
                    sent = await _unless_cut(sending, transport)
                except NotImplementedError:  # uvloop has no loop.sendfile: copy instead
                    self._copying = True
                    continue
                if not sent:
                    raise errors.Unavailable("blob shorter than announced")
                self.sent += sent

    async def _copy_step(self, transport: asyncio.BaseTransport, count: int) -> int:
        """Read a chunk in a thread and write it through the response buffer."""
        loop = asyncio.get_running_loop()
        offset = self._offset + self.sent
        data = await loop.run_in_executor(None, os.pread, self._fd, min(count, READ_CHUNK), offset)
        if not data:
            raise errors.Unavailable("blob shorter than announced")
        await _unless_cut(super().write(data), transport)
        return len(data)


def _retrieve(future: asyncio.Future[bool]) -> None:
    """Consume a check's outcome nobody awaited (it settled the object itself)."""
    if not future.cancelled():
        future.exception()


async def _unless_cut(sending: Awaitable[T], transport: asyncio.BaseTransport) -> T:
    """Await a send step, giving up once the connection is cut or closing.

    The stall watch (`mirror.api.stalls`) resets a client that stopped
    reading; a sendfile already waiting on that socket would otherwise wait
    forever, so the step is polled and cancelled.

    Raises:
        ConnectionResetError: the connection was cut while sending.
    """
    task = asyncio.ensure_future(sending)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=CUT_POLL)
            if done:
                return task.result()
            if transport.is_closing():
                raise ConnectionResetError("connection cut while sending")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def stream_fetch(request: web.Request, response: web.StreamResponse, fetch: BlobFetch,
                       store: BlobStore, executor: ThreadPoolExecutor) -> web.StreamResponse:
    """Send a blob while it is being fetched, reading the growing temp file.

    The held-back tail is only released once the digest verified; if the
    fetch fails, the connection is aborted short of `Content-Length`. A
    client that stops reading is cut by the connection's stall watch
    (`mirror.api.stalls`) without affecting the fetch or other readers. Where
    the loop has no sendfile (uvloop) the temp file is read in threads. A
    fetch gone uncached (disk full) is read from its in-memory ring from
    where the temp file stopped; a reader that fell behind the ring is cut.
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
                transport = request.transport
                if transport is None:
                    raise ConnectionResetError("client gone")
                try:
                    sent = await _unless_cut(
                        loop.sendfile(transport, fobj, offset, min(end - offset, READ_CHUNK)), transport)
                except NotImplementedError:  # uvloop has no loop.sendfile: read in threads instead
                    fobj.close()
                    fobj = None
                    continue
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
            if request.transport is None:
                raise ConnectionResetError("client gone")
            await _unless_cut(response.write(data), request.transport)
            offset += len(data)
            response.sent = offset  # type: ignore[attr-defined]
        await response.write_eof()
    except errors.RegistryError as exc:
        log.warning("aborting blob %s for a client after %s", fetch.digest, exc.code)
        _abort(request)
    except (ConnectionError, RuntimeError):  # RuntimeError: "Transport is closing"
        _abort(request)
    finally:
        if fobj is not None:
            fobj.close()  # closefd=False: the descriptor is closed below
        if fd is not None:
            os.close(fd)
    return response


def _abort(request: web.BaseRequest) -> None:
    """Cut the connection so the client sees a short body, never a wrong one."""
    if request.transport is not None:
        cut(request.transport)
