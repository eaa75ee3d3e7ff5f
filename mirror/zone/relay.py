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
owner would be this node, the connection is cut and the client's retry
fills here.

A client's Range is passed to the owner, which answers ranges only from a
verified object (a fill in flight is waited for first), and relayed as is.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from aiohttp import web

from mirror import errors
from mirror.api.responses import _abort, _unless_cut
from mirror.registry.digest import Digest
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

    def __init__(self, zone: Zone, repo: str, digest: Digest, credential: Credential) -> None:
        self.zone = zone
        self.repo = repo
        self.digest = digest
        self.credential = credential
        self.total: int | None = None
        self.stack = AsyncExitStack()
        self.stream: BlobStream | None = None

    @classmethod
    async def open(cls, zone: Zone, repo: str, digest: Digest, credential: Credential) -> PeerRelay | None:
        """Open the first live owner's stream (its errors, 404/401..., are the client's answer).

        Returns:
            None when no owner before this node answers: the caller fills locally.
        """
        relay = cls(zone, repo, digest, credential)
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
                if resumes > MAX_RESUMES or not await self._reopen(passed):
                    raise
                log.info("zone: blob %s resumed at %d bytes from the next owner", self.digest, passed)
        if (self.total is not None and passed != self.total) or hasher.hexdigest() != self.digest.hex:
            raise errors.Unavailable(f"peer sent content that does not match {self.digest}")
        await self._write(request, response, pending)

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

