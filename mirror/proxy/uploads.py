"""Write-through of pushed blobs: keep what a push relays, once it verifies.

A blob pushed through the node (monolithic PUT, or POST + PATCH... + PUT)
is teed into a temp file of the store as it streams upstream, keyed by the
upload session. When upstream confirms the upload (201 with its digest) and
our own hash of the bytes agrees, the object is published by rename and
linked to the repository, so the deploy right after a push pulls from the
zone. Anything unusual (chunks out of order, a session that went through
another node, a mismatch) simply abandons the copy: the push itself is
never affected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mirror.registry.digest import Digest
from mirror.storage.blobstore import BlobStore, BlobWriter, DigestMismatch

log = logging.getLogger(__name__)

SESSION_IDLE = 3600.0
MAX_SESSIONS = 1000


@dataclass
class UploadCopy:
    """The node's copy of one upload session's bytes: a store writer whose
    digest is only known when upstream confirms the upload."""

    writer: BlobWriter
    touched: float = field(default_factory=time.monotonic)

    @property
    def written(self) -> int:
        return self.writer.written


class Uploads:
    """Upload sessions being copied, by upstream's upload UUID."""

    def __init__(self, store: BlobStore, executor: ThreadPoolExecutor) -> None:
        self.store = store
        self.executor = executor
        self.sessions: dict[str, UploadCopy] = {}

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def open(self, session: str) -> UploadCopy:
        """Start (or restart) copying a session."""
        await self.abandon(session)
        self._expire()
        copy = UploadCopy(await self._io(self.store.writer, None))
        self.sessions[session] = copy
        return copy

    def get(self, session: str, offset: int) -> UploadCopy | None:
        """The copy of `session` if it continues exactly at `offset`."""
        copy = self.sessions.get(session)
        if copy is not None and copy.written != offset:
            log.info("upload %s continues at %d, our copy has %d: not kept", session[:12], offset,
                     copy.written)
            return None
        return copy

    def get_any(self, session: str) -> UploadCopy | None:
        """The copy of `session` for a chunk that names no offset (it continues)."""
        return self.sessions.get(session)

    async def write(self, copy: UploadCopy, chunk: bytes) -> None:
        """Append (and hash) a relayed chunk."""
        await self._io(copy.writer.write, chunk)
        copy.touched = time.monotonic()

    def rekey(self, old: str, new: str) -> None:
        """Follow a session across the UUIDs upstream hands out."""
        if old != new and old in self.sessions:
            self.sessions[new] = self.sessions.pop(old)

    async def commit(self, session: str, digest: Digest) -> bool:
        """Publish the copy if its bytes hash to `digest` (upstream confirmed it)."""
        copy = self.sessions.pop(session, None)
        if copy is None:
            return False
        copy.writer.digest = digest
        try:
            await self._io(copy.writer.commit)  # verifies, fsyncs, renames; removes on failure
            return True
        except (DigestMismatch, OSError) as exc:
            log.info("pushed blob not kept: %s", exc)
            return False

    async def abandon(self, session: str) -> None:
        """Stop copying a session (cancelled, failed, or out of order)."""
        copy = self.sessions.pop(session, None)
        if copy is not None:
            await self._io(copy.writer.abort)

    def _expire(self) -> None:
        now = time.monotonic()
        stale = [k for k, c in self.sessions.items() if now - c.touched > SESSION_IDLE]
        while len(self.sessions) - len(stale) >= MAX_SESSIONS:
            stale.append(next(k for k in self.sessions if k not in stale))
        for key in stale:
            asyncio.ensure_future(self._io(self.sessions.pop(key).writer.abort))

