"""One tag revalidation per node, however many worker processes serve the tag.

Each worker remembers tag records in memory, so when a tag's TTL runs out
every worker would send its own `HEAD` upstream. With `mirror.workers` above
1 a revalidation first takes the tag's lock, an `flock` on one of
`STRIPES` lock files under `<metadata_dir>/locks/` (chosen by a hash of
repository and tag, so the files stay few however many tags there are), then
reads the tag's row again: a worker that revalidated meanwhile left a fresh
record there, which is used without asking upstream. The lock is polled, not
waited on in a thread: waiting revalidations cost no store thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

STRIPES = 256
#: Seconds between attempts at a lock another worker holds.
POLL = 0.02


class TagLocks:
    """Node-wide locks for tag revalidation, striped over a fixed set of files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, repo: str, tag: str) -> Path:
        stripe = int.from_bytes(hashlib.sha256(f"{repo}:{tag}".encode()).digest()[:4], "big") % STRIPES
        return self.directory / f"tag-{stripe:03d}.lock"

    @contextlib.asynccontextmanager
    async def hold(self, repo: str, tag: str) -> AsyncIterator[None]:
        """Hold the lock of `repo:tag` for the block (other workers wait, polling)."""
        fd = os.open(self._path(repo, tag), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(POLL)
            yield
        finally:
            os.close(fd)  # releases the lock
