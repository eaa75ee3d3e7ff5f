"""A non-owner's pass-through: the owner's blob to the client, verified as it passes, not stored.

The body is hashed as it arrives and the last `HOLD_BACK` bytes are held
until the whole blob hashed to its digest, as a fill's readers are: a
mismatch, or an owner that dies with no other to resume from, cuts the
connection short of `Content-Length`, so the client never gets a complete
wrong body. When the owner breaks the stream, the owners in rendezvous
order are asked for the rest (a Range from the
bytes already passed): the same owner is asked first (it may be alive and
only have cut its readers because its own upstream stalled), and a dead
one refuses the connection, is marked down and skipped. When the next
owner is this node, it fills the blob itself (from a peer holding it, else
the link, once, as any fill) and the client reads on from that fill.

A client's Range is passed to the owner, which answers ranges only from a
verified object (a fill in flight is waited for first), and relayed as is.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from aiohttp import web

from mirror import errors
from mirror.api.responses import READ_CHUNK, _abort, _unless_cut
from mirror.proxy.fetcher import BlobFetch, Fetcher, open_for_read
from mirror.registry.digest import Digest
from mirror.storage.blobstore import BlobStore
from mirror.upstream.client import BlobStream
from mirror.upstream.credential import Credential
from mirror.zone.peers import PeerUnavailable, blob_path

if TYPE_CHECKING:
    from mirror.zone.routing import Zone

log = logging.getLogger(__name__)

HOLD_BACK = 64 * 1024
#: Broken owner streams one client's relay resumes from before it gives up (cut short).
MAX_RESUMES = 3


class PeerRelay:
    """One client's stream of a blob from its owner (and its successors)."""

    def __init__(self, zone: Zone, repo: str, digest: Digest, credential: Credential,
                 fill: Fetcher) -> None:
        self.zone = zone
        self.fill = fill  # this node's fetcher: the next owner may be this node
        self.repo = repo
        self.digest = digest
        self.credential = credential
        self.total: int | None = None
        self.stack = AsyncExitStack()
        self.stream: BlobStream | _LocalStream | None = None

    @classmethod
    async def open(cls, zone: Zone, repo: str, digest: Digest, credential: Credential,
                   fill: Fetcher) -> PeerRelay | None:
        """Open the first live owner's stream (its errors, 404/401..., are the client's answer).

        Returns:
            None when no owner before this node answers: the caller fills locally.
        """
        relay = cls(zone, repo, digest, credential, fill)
        if not await relay._reopen(0):
            return None
        return relay

    async def _reopen(self, offset: int) -> bool:
        """Open the stream at `offset` from the first live owner before this node."""
        await self.stack.aclose()
        self.stack = AsyncExitStack()
        for owner in self.zone.remote_owners(self.digest):
            try:
                self.stream = await self.stack.enter_async_context(self.zone.peers.stream_blob(
                    owner, blob_path(self.digest, self.repo), self.digest, offset, self.credential))
            except PeerUnavailable:
                continue
            except BaseException:
                await self.stack.aclose()
                raise
            if offset == 0:
                self.total = self.stream.total
            elif self.stream.total != self.total:
                raise errors.Unavailable("the next owner announced another size")
            return True
        return False

    async def close(self) -> None:
        await self.stack.aclose()

    async def send(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Send the whole blob, or cut the connection short; never a complete unverified body."""
        try:
            if "Range" in request.headers:
                return await self._send_range(request, response)
            if self.total is not None:
                response.content_length = self.total
            await response.prepare(request)
            await self._pump(request, response)
            await response.write_eof()
        except (errors.RegistryError, ConnectionError, RuntimeError) as exc:
            log.warning("zone: cut blob %s for a client: %s", self.digest, exc)
            _abort(request)
        finally:
            await self.close()
        return response

    async def _pump(self, request: web.Request, response: web.StreamResponse) -> None:
        hasher = self.digest.hasher()
        passed = 0  # bytes received (hashed), sent or held
        pending = bytearray()
        resumes = 0
        response.sent = 0  # type: ignore[attr-defined]  # for the access log
        while True:
            assert self.stream is not None
            try:
                async for chunk in self.stream.chunks():
                    hasher.update(chunk)
                    passed += len(chunk)
                    pending += chunk
                    if len(pending) > HOLD_BACK:
                        await self._write(request, response, pending[:-HOLD_BACK])
                        del pending[:-HOLD_BACK]
                break
            except PeerUnavailable:
                if self.total is not None and passed >= self.total:
                    break
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise
                if await self._reopen(passed):
                    log.info("zone: blob %s resumed at %d bytes from the next owner", self.digest, passed)
                elif not await self._fill_here(passed):
                    raise
        if (self.total is not None and passed != self.total) or hasher.hexdigest() != self.digest.hex:
            raise errors.Unavailable(f"peer sent content that does not match {self.digest}")
        await self._write(request, response, pending)

    async def _fill_here(self, offset: int) -> bool:
        """This node is the next owner: fill here (peers holding it, else the link) and go on
        reading that fill from `offset`. False when the zone has no local fill to offer."""
        fetcher = self.fill
        await self.stack.aclose()
        self.stack = AsyncExitStack()
        fetch = fetcher.start(self.repo, self.digest, self.credential)
        size = await fetch.started()
        if self.total is not None and size is not None and size != self.total:
            raise errors.Unavailable("the local fill announced another size")
        self.stream = _LocalStream(fetch, self.zone.store, self.zone.executor, offset)
        log.info("zone: blob %s resumed at %d bytes from this node's own fill (the next owner)",
                 self.digest, offset)
        return True

    async def _write(self, request: web.Request, response: web.StreamResponse, data: bytes | bytearray) -> None:
        if not data:
            return
        if request.transport is None:
            raise ConnectionResetError("client gone")
        await _unless_cut(response.write(bytes(data)), request.transport)
        response.sent += len(data)  # type: ignore[attr-defined]

    async def _send_range(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """A client's Range: asked of the owner, which serves it from its verified object."""
        await self.close()
        self.stack = AsyncExitStack()
        owners = self.zone.remote_owners(self.digest)
        answer = await self.stack.enter_async_context(self.zone.peers.ranged(
            owners, blob_path(self.digest, self.repo), self.credential, request.headers["Range"]))
        response.set_status(answer.status_code)
        for name in ("Content-Range", "Content-Length"):
            if name in answer.headers:
                response.headers[name] = answer.headers[name]
        await response.prepare(request)
        async for chunk in answer.aiter_raw():
            await self._write(request, response, chunk)
        await response.write_eof()
        return response



class _LocalStream:
    """This node's own fill of the blob, read from `offset` as a fill's readers read it."""

    def __init__(self, fetch: BlobFetch, store: BlobStore, executor: Executor, offset: int) -> None:
        self.fetch = fetch
        self.store = store
        self.executor = executor
        self.offset = offset

    async def chunks(self) -> AsyncIterator[bytes]:
        fd = open_for_read(self.fetch, self.store)
        if fd is None:  # relayed uncached from its first byte (disk full): nothing to read at an offset
            raise errors.Unavailable("the mirror is short of disk space; retry")
        loop = asyncio.get_running_loop()
        try:
            while True:
                limit = await self.fetch.readable(self.offset)
                if limit <= self.offset:
                    return
                data = await loop.run_in_executor(self.executor, os.pread, fd,
                                                  min(limit - self.offset, READ_CHUNK), self.offset)
                if not data:
                    raise errors.Unavailable("blob shorter than announced")
                self.offset += len(data)
                yield data
        finally:
            os.close(fd)
