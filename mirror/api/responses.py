"""Blob bodies: sendfile from a stored object, or a read-along of a fetch."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from mirror import errors
from mirror.proxy.fetcher import BlobFetch, open_for_read
from mirror.storage.blobstore import BlobStore

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024


class SendfileResponse(web.StreamResponse):
    """Send `count` bytes of an already open, size-checked descriptor.

    The store opens (and checks) the object before the response starts, so
    eviction or quarantine after that point cannot change what is sent: the
    descriptor keeps the verified inode alive.
    """

    def __init__(self, fd: int, offset: int, count: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._fd = fd
        self._offset = offset
        self._count = count
        self.content_length = count
        self.sent = 0  # sendfile bypasses the writer's byte count

    async def prepare(self, request: web.BaseRequest) -> object:
        if self.prepared:  # aiohttp calls prepare again after the handler chain
            return await super().prepare(request)
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD" and self._count and request.transport is not None:
                with os.fdopen(self._fd, "rb", closefd=False) as fobj:
                    self.sent = await asyncio.get_running_loop().sendfile(
                        request.transport, fobj, self._offset, self._count)
                await super().write_eof()
            return writer
        finally:
            os.close(self._fd)


async def stream_fetch(request: web.Request, response: web.StreamResponse, fetch: BlobFetch,
                       store: BlobStore, executor: ThreadPoolExecutor, idle_timeout: float) -> web.StreamResponse:
    """Send a blob while it is being fetched, reading the growing temp file.

    The held-back tail is only released once the digest verified; if the
    fetch fails, the connection is aborted short of `Content-Length`. A
    client that stops reading for `idle_timeout` is cut without affecting the
    fetch or other readers.
    """
    fd = open_for_read(fetch, store)
    loop = asyncio.get_running_loop()
    try:
        await response.prepare(request)
        offset = 0
        while True:
            limit = await fetch.readable(offset)
            if limit <= offset:
                break
            data = await loop.run_in_executor(executor, os.pread, fd, min(limit - offset, READ_CHUNK), offset)
            if not data:
                raise errors.Unavailable("blob shorter than announced")
            await asyncio.wait_for(response.write(data), idle_timeout)
            offset += len(data)
        await response.write_eof()
    except errors.RegistryError as exc:
        log.warning("aborting blob %s for a client after %s", fetch.digest, exc.code)
        _abort(request)
    except (TimeoutError, ConnectionResetError):
        _abort(request)
    finally:
        os.close(fd)
    return response


def _abort(request: web.Request) -> None:
    """Cut the connection so the client sees a short body, never a wrong one."""
    if request.transport is not None:
        request.transport.abort()
