"""Bit rot on a running node: objects hashed when first served, and a paced scrub.

A stored object was verified when it was written, but a disk can flip a byte
later without changing its size or mtime. So each process hashes an object
the first time it serves it (:class:`Integrity`; the response holds back its
tail until the digest matched, see `mirror.api.responses`), remembers the
digests it found right in a bounded set so later serves are plain sendfile,
and :class:`Scrubber` re-hashes the whole store once per
`mirror.scrub.interval`, paced so it stays below on-demand I/O. A mismatch,
found either way, quarantines the object and drops its metadata record, so
the next request refetches it from upstream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mirror.observe.metrics import Metrics
from mirror.registry.digest import Digest
from mirror.storage.blobstore import BlobStore
from mirror.storage.metadata import Metadata

log = logging.getLogger(__name__)

#: Digests remembered as verified per process (about 100 bytes each).
VERIFIED_LIMIT = 100_000
#: Bytes hashed per read; hashlib releases the GIL for buffers this large.
HASH_CHUNK = 1024 * 1024
#: Objects listed per step of a scrub pass.
LIST_BATCH = 1000
#: The scrub's extra pause while on-demand work (fetches, first-serve hashes) is running.
YIELD_PAUSE = 0.2


def hash_fd(fd: int, digest: Digest) -> bool:
    """Whether an open object's bytes hash to `digest` (blocking; reads with pread)."""
    hasher = digest.hasher()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest() == digest.hex


class Integrity:
    """Which objects this process has verified, and what happens to corrupt ones.

    Args:
        executor: where first-serve hashes run (the node's store pool).
        limit: digests remembered; the oldest is forgotten first, and is
            simply hashed again the next time it is served.
    """

    def __init__(self, store: BlobStore, metadata: Metadata, executor: ThreadPoolExecutor,
                 metrics: Metrics, limit: int = VERIFIED_LIMIT) -> None:
        self.store = store
        self.metadata = metadata
        self.executor = executor
        self.metrics = metrics
        self.limit = limit
        self._verified: OrderedDict[str, None] = OrderedDict()
        self._checks: dict[str, asyncio.Future[bool]] = {}

    def is_verified(self, digest: Digest) -> bool:
        """Whether this process already found the stored object right."""
        return str(digest) in self._verified

    @property
    def busy(self) -> bool:
        """First-serve hashes are running (the scrub yields to them)."""
        return bool(self._checks)

    def remember(self, digest: Digest) -> None:
        """Record an object as verified, forgetting the oldest beyond the limit."""
        key = str(digest)
        self._verified[key] = None
        self._verified.move_to_end(key)
        while len(self._verified) > self.limit:
            self._verified.popitem(last=False)

    def check(self, digest: Digest, fd: int) -> asyncio.Future[bool]:
        """Hash an open stored object in a thread; one hash per digest at a time.

        The thread reads its own duplicate of `fd`, so the caller may close
        `fd` (a client gone) while the hash goes on. The result is settled
        (remembered, or quarantined and forgotten) before the future is done.

        Returns:
            A future of whether the bytes match; shielded, so a cancelled
            waiter does not cancel the check.
        """
        key = str(digest)
        running = self._checks.get(key)
        if running is None:
            running = asyncio.ensure_future(self._check(digest, os.dup(fd)))
            self._checks[key] = running
            running.add_done_callback(lambda _f: self._checks.pop(key, None))
        return asyncio.shield(running)

    async def _check(self, digest: Digest, fd: int) -> bool:
        try:
            inode = os.fstat(fd).st_ino
            matches = await asyncio.get_running_loop().run_in_executor(self.executor, hash_fd, fd, digest)
        finally:
            os.close(fd)
        await self.settle(digest, matches, inode, "serve")
        return matches

    async def settle(self, digest: Digest, matches: bool, inode: int, found_by: str) -> None:
        """Remember a right object; quarantine and forget a corrupt one."""
        if matches:
            self.remember(digest)
            return
        self._verified.pop(str(digest), None)
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self.executor, self.store.quarantine, digest, inode):
            log.error("object %s does not match its digest (found by %s): quarantined", digest, found_by)
            self.metrics.corrupt.labels(found_by).inc()
            await self.metadata.forget_object(digest)


class Scrubber:
    """Re-hash every stored object once per `interval`, paced below on-demand I/O.

    A pass lists the store, then hashes it at `total bytes / interval` bytes
    per second (a sleep after each chunk, proportional to its size), one
    chunk at a time in a thread of its own, so it never holds one of the
    store pool's threads. While `busy()` (fetches or first-serve hashes in
    flight) it pauses a little longer after each chunk. A pass that ends
    early waits for the rest of its interval.

    Args:
        interval: seconds per whole pass; 0 disables the scrub.
        busy: whether on-demand work is running right now.
    """

    def __init__(self, store: BlobStore, integrity: Integrity, metrics: Metrics, interval: float,
                 busy: Callable[[], bool]) -> None:
        self.store = store
        self.integrity = integrity
        self.metrics = metrics
        self.interval = interval
        self.busy = busy
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrub")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run passes in the background (nothing when the interval is 0)."""
        if self.interval > 0:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop between chunks; release the thread."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.scrub_pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("store scrub failed; the next pass starts after the interval")
            await asyncio.sleep(max(0.0, started + self.interval - time.monotonic()))

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def scrub_pass(self) -> None:
        """Hash every object in the store, at the paced rate.

        The listing is walked twice (the total sets the rate) and read in
        batches in the thread, so a store of millions of objects is never
        held in memory nor listed on the event loop.
        """
        total = await self._in_thread(lambda: sum(size for _d, size in self.store.iter_objects()))
        rate = max(1.0, total / self.interval)  # bytes per second
        objects = self.store.iter_objects()
        while batch := await self._in_thread(lambda: list(itertools.islice(objects, LIST_BATCH))):
            for digest, _size in batch:
                await self._scrub_object(digest, rate)
        self.metrics.scrub_last_pass.set(time.time())

    async def _scrub_object(self, digest: Digest, rate: float) -> None:
        try:
            fd = await self._in_thread(os.open, self.store.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return  # evicted or purged since the listing
        try:
            inode = os.fstat(fd).st_ino
            hasher = digest.hasher()
            offset = 0
            while chunk := await self._in_thread(_hash_chunk, fd, hasher, offset):
                offset += chunk
                self.metrics.scrub_bytes.inc(chunk)
                await self._pace(chunk, rate)
        finally:
            os.close(fd)
        self.metrics.scrub_objects.inc()
        await self.integrity.settle(digest, hasher.hexdigest() == digest.hex, inode, "scrub")

    async def _pace(self, hashed: int, rate: float) -> None:
        pause = hashed / rate
        if self.busy():
            pause += YIELD_PAUSE
        await asyncio.sleep(pause)


def _hash_chunk(fd: int, hasher: Any, offset: int) -> int:
    """Hash one chunk at `offset`; returns its length, 0 at the end (blocking)."""
    chunk = os.pread(fd, HASH_CHUNK, offset)
    hasher.update(chunk)
    return len(chunk)

