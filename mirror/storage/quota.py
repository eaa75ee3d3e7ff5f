"""Disk quota and LRU eviction, open readers, pins, and running out of disk.

Accounting. `used` is the bytes of recorded objects (the metadata's totals,
kept current in memory and re-read every tick); `reserved` is the sum of the
`Content-Length`s of admitted fetches that have not finished. A fetch is
admitted by :meth:`Quota.admit` *before* its response headers are sent:

* with a quota (`mirror.cache.max_size`), when `used + reserved + size` would
  pass the high watermark, least-recently-used objects are evicted down to
  the low watermark first. A blob that still does not fit under the high
  watermark (what is left is pinned, being read or in flight, or the blob is
  larger than the quota) is relayed to its clients without being cached;
* whatever the quota, the store's filesystem must have room for it, for what
  admitted fetches still have to write, and a little headroom; else LRU
  objects are evicted when that makes it fit and, failing that, the request
  is answered 503 UNAVAILABLE with `Retry-After` (the fetcher maps the
  `NoSpace` raised here). A disk filled by something else is never emptied
  of cached objects for a fill that would still not fit.

So concurrent fetches cannot overshoot together: the store stays under the
high watermark, in-flight temp files included.

Eviction never removes a pinned object (`objects.pinned`, the count of pins
holding it, kept by :mod:`mirror.storage.pins`), an object an open response is still reading
(counted per digest by :meth:`Quota.hold`; on NFS an unlinked open file
gives ESTALE), nor a blob in flight (counted by :meth:`Quota.fetching`). Access times are batched in memory
(`Metadata.touch`), flushed every ACCESS_FLUSH_INTERVAL seconds and before
every eviction pass.

Out of disk mid-fetch (ENOSPC/EDQUOT on a temp-file write, say another
process filled the disk): the fetch switches to *relay mode* (`Fetcher` `_relay`).
The temp file is removed and nothing will be published; the rest of the blob
is kept in a bounded in-memory ring (:class:`RelayBuffer`) for the readers
the fetch already has, who read what was written before the switch through
their own descriptors. A reader that falls further behind than the ring is
cut short of `Content-Length` (the fetch is never paced by a slow reader);
the digest is still verified before the held-back tail goes out, so a wrong
blob is never completed. The space reserve file kept beside the metadata
(when it shares the store's filesystem) is deleted so SQLite can still
write, and the reserve is recreated by a later tick once space is back.
Nothing is evicted for it: a full disk costs only new fills, and what is
stored goes on being served (with upstream down it is all a zone has). New
requests start a new fetch, which is admitted again (or answered 503 while
the disk is still full).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mirror import errors
from mirror.registry.digest import Digest
from mirror.storage.blobstore import DigestMismatch

if TYPE_CHECKING:
    from mirror.config import Settings
    from mirror.observe.metrics import Metrics
    from mirror.storage.blobstore import BlobStore
    from mirror.storage.metadata import Metadata

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
ACCESS_FLUSH_INTERVAL = 10.0  # seconds between access-time flushes (and the other housekeeping)
RELAY_BUFFER = 16 * MiB  # memory kept per uncached fetch for its readers
RESERVE_FILE = "space-reserve"
RESERVE_MAX = 8 * MiB
RETRY_AFTER = {"Retry-After": "10"}
EVICT_BATCH = 512

_CANDIDATES = ("SELECT digest, size FROM objects WHERE pinned = 0 "
               "ORDER BY last_access, created LIMIT ? OFFSET ?")


class NoSpace(OSError):
    """Admission refused: the disk has no room for this blob even after eviction."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT (disk or quota of the filesystem full)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def headroom(total: int) -> int:
    """Free space always kept on the store's filesystem (1/64 of it, at most 64 MiB)."""
    return min(64 * MiB, total // 64)


class RelayBuffer:
    """The rest of a blob that is no longer cached, held in memory for its readers.

    Bytes before `start` went to the (since removed) temp file and are read
    through each reader's own descriptor; bytes from `start` on are kept here,
    the newest `limit` of them (never fewer than the last chunk, so the
    held-back tail is always here). Hashing goes on, seeded with the state of
    the bytes before `start`, so the digest is still verified.
    """

    def __init__(self, start: int, hasher: Any, size: int | None, limit: int = RELAY_BUFFER) -> None:
        self.start = start
        self.first = start  # the oldest offset still held
        self.end = start
        self.size = size
        self.limit = limit
        self._hasher = hasher
        self._chunks: deque[bytes] = deque()
        self._held = 0

    def append(self, data: bytes) -> int:
        """Hash and keep a chunk; returns the end offset.

        Raises:
            DigestMismatch: more bytes than the announced size.
        """
        if self.size is not None and self.end + len(data) > self.size:
            raise DigestMismatch(f"more bytes than the announced {self.size}")
        self._hasher.update(data)
        self._chunks.append(data)
        self._held += len(data)
        self.end += len(data)
        while self._held > self.limit and len(self._chunks) > 1:
            dropped = self._chunks.popleft()
            self._held -= len(dropped)
            self.first += len(dropped)
        return self.end

    def read(self, offset: int, count: int) -> bytes:
        """Up to `count` bytes at `offset`.

        Raises:
            Unavailable: the reader fell behind what is held; it must be cut.
        """
        if offset < self.first:
            raise errors.Unavailable("client fell too far behind an uncached blob", headers=RETRY_AFTER)
        position = self.first
        for chunk in self._chunks:
            if offset < position + len(chunk):
                return chunk[offset - position : offset - position + count]
            position += len(chunk)
        return b""

    def verify(self, digest: Digest) -> None:
        """Raises DigestMismatch unless every byte arrived and hashes to `digest`."""
        if self.size is not None and self.end != self.size:
            raise DigestMismatch(f"{digest}: {self.end} bytes, expected {self.size}")
        if self._hasher.hexdigest() != digest.hex:
            raise DigestMismatch(f"{digest}: content has another digest")


class Fill(Protocol):
    """What the quota reads of a blob being fetched (:class:`mirror.proxy.fetcher.BlobFetch`)."""

    digest: Digest
    size: int | None  # announced by upstream; None until then
    written: int
    committed: bool  # published (or, relayed, verified)
    relay: RelayBuffer | None  # served uncached: nothing is published


class Quota:
    """The store's space: quota, reservations, eviction, readers, disk-full recovery.

    Objects being read (:meth:`hold`) or fetched (:meth:`fetching`) in this
    process are never evicted.

    Args:
        settings: the node's settings (`mirror.cache`, `metadata_dir`).
    """

    def __init__(self, settings: Settings, store: BlobStore, metadata: Metadata, executor: ThreadPoolExecutor,
                 metrics: Metrics) -> None:
        self.cache = settings.mirror.cache
        self.store = store
        self.metadata = metadata
        self.executor = executor
        self.metrics = metrics
        self.limit: int | None = self.cache.max_size  # a percentage is resolved in start()
        self.used = 0
        self.readers: Counter[str] = Counter()
        self.fetches: Counter[str] = Counter()  # digests this process is fetching
        self.interval = ACCESS_FLUSH_INTERVAL
        self.reserve_path: Path = settings.metadata_dir / RESERVE_FILE
        self.reserve_size = 0
        self.repaired = asyncio.Event()
        self.verifying = asyncio.Lock()  # one `verify` at a time
        self._reserved: dict[Fill, int] = {}
        self._version = 0  # bumped by every in-memory change of `used`
        self._admit_lock = asyncio.Lock()
        self._evict_lock = asyncio.Lock()
        self._evicting: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- figures --------------------------------------------------------------

    @property
    def reserved(self) -> int:
        """Bytes promised to fetches in flight."""
        return sum(self._reserved.values())

    @property
    def high(self) -> int | None:
        """The high watermark in bytes (None without a quota)."""
        return None if self.limit is None else int(self.limit * self.cache.high_watermark)

    @property
    def low(self) -> int | None:
        """The low watermark in bytes (None without a quota)."""
        return None if self.limit is None else int(self.limit * self.cache.low_watermark)

    def disk(self) -> tuple[int, int]:
        """(total, free) bytes of the store's filesystem (blocking)."""
        st = os.statvfs(self.store.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _unwritten(self) -> int:
        return sum(max(0, size - fetch.written) for fetch, size in self._reserved.items())

    def _adjust(self, delta: int) -> None:
        self.used = max(0, self.used + delta)
        self._version += 1

    def adjust(self, delta: int) -> None:
        """Account for objects added (manifests) or removed outside eviction (purge, verify)."""
        self._adjust(delta)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- lifecycle -------------------------------------------------------------

    async def start(self, housekeeping: bool = True) -> None:
        """Resolve a percentage quota, load usage, keep the reserve, start housekeeping.

        Args:
            housekeeping: run the start-up repair and the background eviction
                passes (the leader worker only: a node has one background
                evictor). Every worker still flushes its own access times, and
                evicts when a fill it admits needs the room.
        """
        self.evictor = housekeeping
        if self.cache.max_size_percent is not None:
            total, _free = await self._io(self.disk)
            self.limit = int(total * self.cache.max_size_percent / 100)
        await self.metadata.transact(lambda db: db.execute(
            "CREATE INDEX IF NOT EXISTS objects_by_access ON objects (pinned, last_access)"))
        await self.resync()
        await self._io(self.ensure_reserve)
        self._spawn(self._housekeeping())
        if housekeeping:
            self._spawn(self._repair())

    async def close(self) -> None:
        """Stop housekeeping and any eviction in progress."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def resync(self) -> None:
        """Re-read `used` from the metadata, unless it changed meanwhile."""
        version = self._version
        _count, size = await self.metadata.totals()
        if version == self._version:
            self.used = size

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("store housekeeping failed")

    async def tick(self) -> None:
        """Flush access times, resync usage, restore the reserve, evict above the high watermark."""
        await self.metadata.flush_access()
        await self.resync()
        await self._io(self.ensure_reserve)
        if not getattr(self, "evictor", True):
            return
        if self.high is not None and self.low is not None and self.used + self.reserved > self.high:
            await self.evict_to(self.low - self.reserved)

    async def _repair(self) -> None:
        from mirror.storage.verify import repair

        try:
            report = await repair(self.store, self.metadata, self.executor)
            if report.changed:
                log.warning("store repair: %s", report.as_dict())
            await self.resync()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store repair failed")
        finally:
            self.repaired.set()

    # -- the reserve beside the metadata ---------------------------------------

    def ensure_reserve(self) -> None:
        """Keep a reserve file in `metadata_dir` when it shares the store's filesystem (blocking).

        It is deleted when the disk fills, so SQLite can still write, and
        recreated here once there is room again.
        """
        directory = self.reserve_path.parent
        temp = self.reserve_path.with_name(f".{RESERVE_FILE}.{self.store.owner}")
        try:
            if os.stat(directory).st_dev != os.stat(self.store.root).st_dev:
                return
            if self.reserve_path.exists():
                self.reserve_size = self.reserve_path.stat().st_size
                return
            st = os.statvfs(directory)
            total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
            size = min(RESERVE_MAX, total // 16)
            if free < size + headroom(total) + self._unwritten():
                return  # not now: space is short
            with open(temp, "wb") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    handle.write(bytes(size))
                os.fsync(handle.fileno())
            os.replace(temp, self.reserve_path)
            self.reserve_size = size
            log.info("space reserve of %d bytes kept at %s", size, self.reserve_path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.warning("cannot keep a space reserve in %s: %s", directory, exc)

    def release_reserve(self) -> bool:
        """Delete the reserve file (blocking); True if there was one."""
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        log.warning("disk full: released the %d-byte space reserve for the metadata", self.reserve_size)
        return True

    # -- readers ----------------------------------------------------------------

    def hold(self, digest: Digest) -> Callable[[], None]:
        """Count an open reader of `digest` (never evicted meanwhile); returns its release."""
        return _count(self.readers, str(digest))

    def fetching(self, digest: Digest) -> Callable[[], None]:
        """Count a fetch of `digest` in flight (never evicted meanwhile); returns its release."""
        return _count(self.fetches, str(digest))

    # -- fetches -----------------------------------------------------------------

    async def admit(self, fetch: Fill) -> bool:
        """Decide, before response headers are sent, whether a starting fetch is stored.

        Reserves its size, evicting first when needed.

        Returns:
            False when it does not fit the quota: the caller relays it uncached.

        Raises:
            NoSpace: the disk has no room for it even after eviction.
        """
        size = fetch.size or 0
        async with self._admit_lock:
            if self.limit is not None and not await self._fits_quota(size):
                log.warning("blob %s (%d bytes) does not fit the quota now: relayed uncached",
                            fetch.digest, size)
                return False
            await self._ensure_disk(size)
            self._reserved[fetch] = size
            return True

    async def _fits_quota(self, size: int) -> bool:
        assert self.high is not None and self.low is not None
        if size > self.high:
            return False
        if self.used + self.reserved + size > self.high:
            await self.evict_to(self.low - self.reserved - size)
        return self.used + self.reserved + size <= self.high

    async def _ensure_disk(self, size: int) -> None:
        total, free = await self._io(self.disk)
        needed = size + self._unwritten() + headroom(total)
        if needed <= free:
            return
        if needed - free <= await self._evictable():  # evicting can make it fit; else keep what is stored
            await self.evict_to(self.used - (needed - free))
            total, free = await self._io(self.disk)
        if needed > free:
            raise NoSpace(f"{free} bytes free on the store's disk, {needed} needed")

    async def _evictable(self) -> int:
        """Bytes eviction could free at most: the unpinned objects."""
        return int(await self.metadata.transact(lambda db: db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM objects WHERE pinned = 0").fetchone()[0]))

    def release(self, fetch: Fill) -> None:
        """A fetch goes on uncached: its reservation is released now, not at its end."""
        self._reserved.pop(fetch, None)

    def finish(self, fetch: Fill) -> None:
        """A fetch ended: its reservation becomes used bytes (published) or is released."""
        if self._reserved.pop(fetch, None) is None:
            return
        if fetch.committed and fetch.relay is None:
            self._adjust(fetch.written)
            if self.high is not None and self.used + self.reserved > self.high:
                self.evict_soon()

    def store_error(self, exc: BaseException) -> None:
        """Any other store write failed (fetcher, manifests): recover if the disk is full."""
        if is_disk_full(exc) and not isinstance(exc, NoSpace):
            self._spawn(self.disk_full())

    async def disk_full(self) -> None:
        """Free the metadata reserve so SQLite can still write; evict nothing.

        What is stored stays served: eviction only ever makes room for a
        fill that then fits (:meth:`admit`), never for a disk something else
        filled, which emptying the cache would not win back.
        """
        await self._io(self.release_reserve)

    # -- eviction -------------------------------------------------------------------

    def evict_soon(self) -> None:
        """Start one background pass down to the low watermark (if none is running)."""
        if self.low is None or not getattr(self, "evictor", True) \
                or (self._evicting is not None and not self._evicting.done()):
            return
        self._evicting = self._spawn(self.evict_to(self.low - self.reserved))

    async def evict_to(self, target: int) -> tuple[int, int]:
        """Evict least-recently-used objects until `used <= target`.

        Pinned objects, objects being read and blobs in flight are skipped.

        Returns:
            (objects evicted, bytes freed).
        """
        async with self._evict_lock:
            if self.used <= target:
                return 0, 0
            await self.metadata.flush_access()
            count = freed = skipped = 0
            while self.used > target:
                rows = await self.metadata.transact(_candidates(skipped))
                if not rows:
                    break
                for key, size in rows:
                    if self.used <= target:
                        break
                    digest = Digest.parse(key)
                    if self.readers.get(key) or self.fetches.get(key):
                        skipped += 1
                        continue
                    removed = await self._io(self.store.delete, digest)
                    await self.metadata.forget_object(digest)
                    self._adjust(-size)
                    count += 1
                    freed += removed
                    self.metrics.evictions.inc()
                    self.metrics.evicted_bytes.inc(removed)
            if count:
                log.info("evicted %d objects (%d bytes); %d bytes used", count, freed, self.used)
            return count, freed

    async def gc(self, target: int | None = None) -> dict[str, int]:
        """Evict now down to `target` bytes (default: the low watermark)."""
        if target is None:
            if self.low is None:
                raise errors.RegistryError("no quota configured: give a target size", status=400)
            target = self.low
        await self.resync()
        count, freed = await self.evict_to(target)
        return {"evicted": count, "bytes": freed, "used": self.used}


def _count(counter: Counter[str], key: str) -> Callable[[], None]:
    """Count one user of `key`; returns the release, which counts down once however often called."""
    counter[key] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]

    return release


def _candidates(offset: int) -> Callable[[sqlite3.Connection], list[Any]]:
    """The next eviction candidates, least recently used first, after `offset` skipped ones."""
    def query(db: sqlite3.Connection) -> list[Any]:
        return db.execute(_CANDIDATES, (EVICT_BATCH, offset)).fetchall()

    return query
