"""One upstream download per blob, streamed to every waiter as it arrives.

A :class:`BlobFetch` writes upstream's bytes to a temp file in the store,
hashing as it goes, and publishes by rename once the digest checks. Readers
(the first client included) never share its memory: each reads the growing
temp file through its own descriptor, up to what is written minus a held-back
tail, and receives the tail only after the digest verified. So a slow client
never slows the fetch, a client that leaves never cancels it, memory stays
bounded whatever the blob size, and a mismatch leaves every reader short of
`Content-Length` (a complete-looking wrong blob cannot be received).

A connection reset mid-blob resumes with a `Range` request from the bytes
already written; the final digest still verifies the whole blob.

Across worker processes sharing the store, one process fills each blob
(:mod:`mirror.storage.fills`): a fetch that finds another process holding
the blob's fill lock *follows* that fill instead, polling the shared temp
file's size every `FOLLOW_POLL` seconds and releasing the held-back tail only
once the verified object appears at its final path. A follower that finds
the lock free (its filler died, or shut down) takes it and resumes from the
bytes written; one that finds the fill failed answers with its error.

A blob that does not fit the quota, or whose temp-file write fails because the
disk is full, is relayed to its readers uncached (:mod:`mirror.storage.quota`).

Readers are bounded as the fetch is not: when upstream sends nothing (less
than `MIN_BYTES_PER_WINDOW`, a trickle being nothing) for `read_timeout`, each
reader is cut at once, while the fetch itself may go on resuming in the
background for the next request. Otherwise each resumption would restart the
clock and a client could hang for retries x timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mirror import errors
from mirror.observe.metrics import Metrics
from mirror.registry.digest import Digest
from mirror.storage.blobstore import BlobStore, BlobWriter, DigestMismatch
from mirror.storage.fills import FillLock
from mirror.storage.quota import Quota, RelayBuffer, is_disk_full
from mirror.upstream import budget
from mirror.upstream.client import MIN_BYTES_PER_WINDOW, Upstream, retry_delay
from mirror.upstream.credential import Credential
from mirror.upstream.reads import use_large_reads

log = logging.getLogger(__name__)

HOLD_BACK = 64 * 1024
WRITE_BATCH = 256 * 1024
#: Seconds between a follower's looks at another process's fill.
FOLLOW_POLL = 0.02


class BlobFetch:
    """The state of one in-flight download, observed by its readers."""

    def __init__(self, digest: Digest, repo: str) -> None:
        self.digest = digest
        self.repo = repo
        self.size: int | None = None
        self.written = 0
        self.began = time.monotonic()  # for the status page's rate
        self.joined_at = time.time()  # a fill failure recorded after this is ours to report
        self.fill: FillLock | None = None  # the node-wide fill lock, once this process holds it
        self.committed = False
        self.task: asyncio.Task[None] | None = None
        self.error: errors.RegistryError | None = None
        self.temp_path: str | None = None
        self.relay: RelayBuffer | None = None  # served uncached from memory (disk full, over quota)
        self.work: budget.Work | None = None  # its priority on the link; promoted when a client joins
        self.credentials: list[Credential] = []  # waiting clients' tokens, to continue if one expires
        self.stall_timeout: float | None = None  # readers are cut after this long without progress
        self.last_progress = time.monotonic()  # when upstream last sent a window's worth of bytes
        self._unmarked = 0  # bytes received since `last_progress`
        self._started = asyncio.Event()
        self._progress = asyncio.Event()
        self.done = asyncio.Event()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def fail(self, error: errors.RegistryError) -> None:
        """End the fetch with an error every reader sees."""
        self.error = error
        self._started.set()
        self.done.set()
        self._notify()

    def offer(self, credential: Credential) -> None:
        """A joining client's credential, usable if the current one stops working."""
        if credential.is_client and credential not in self.credentials:
            self.credentials.append(credential)

    def next_credential(self, failed: Credential) -> Credential | None:
        """The credential to continue with after `failed` was refused.

        Another waiting client's token, else None: the fetch fails. Never the
        node's own account: a client refused upstream must not be served
        with the node's rights.
        """
        if failed in self.credentials:
            self.credentials.remove(failed)
        return self.credentials[0] if self.credentials else None

    def received(self, count: int) -> None:
        """Count bytes from upstream: a window's worth (not a trickle) is progress."""
        self._unmarked += count
        if self._unmarked >= MIN_BYTES_PER_WINDOW:
            self._unmarked = 0
            self.last_progress = time.monotonic()

    async def started(self) -> int | None:
        """Wait for upstream's headers; the blob size, or raise its error."""
        await self._started.wait()
        if self.error is not None and self.written == 0:
            raise self.error
        return self.size

    async def readable(self, offset: int) -> int:
        """Wait until bytes past `offset` may be sent; the end of what may.

        Raises:
            RegistryError: the fetch failed; the reader must abort.
        """
        while True:
            if self.error is not None:
                raise self.error
            limit = self._limit()
            if limit > offset:
                return limit
            if self.committed:
                return limit
            await self._progress_or_stall()

    async def _progress_or_stall(self) -> None:
        """Wait for the fetch to move on.

        Raises:
            Unavailable: upstream sent nothing for `stall_timeout`; the reader
                is cut, the fetch goes on (resuming) without it.
        """
        event = self._progress
        if self.stall_timeout is None:
            await event.wait()
            return
        idle = time.monotonic() - self.last_progress
        if idle >= self.stall_timeout:
            raise errors.Unavailable(f"upstream sent nothing for {idle:.0f}s; the mirror keeps trying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), self.stall_timeout - idle)

    def _limit(self) -> int:
        if self.committed:
            return self.written
        if self.size is None:
            return max(0, self.written - HOLD_BACK)
        return min(self.written, max(0, self.size - HOLD_BACK))


OnCommit = Callable[[BlobFetch], Awaitable[None]]
Confirm = Callable[[str, Digest, Credential], Awaitable[Any]]


class Fetcher:
    """Runs and de-duplicates blob downloads for the whole process.

    Args:
        store: where verified blobs are published.
        upstream: the registry they come from.
        executor: threads for file writes (never the event loop).
        on_commit: records metadata (size, link) once a blob is published.
        confirm: checks upstream that a repository holds a digest, before
            serving it from a fill made through another repository.
        quota: admits each fill (or has it relayed uncached) and never
            evicts a blob in flight.
        shared: other worker processes share the store: a fill stopped by
            shutdown keeps its bytes for them to resume (a lone node sweeps them).

    A broken stream is resumed up to the owning registry's `retries` times,
    and readers are cut after its `read_timeout` without progress.
    """

    def __init__(self, store: BlobStore, upstream: Upstream, executor: ThreadPoolExecutor, *,
                 on_commit: OnCommit, confirm: Confirm, quota: Quota, metrics: Metrics,
                 shared: bool = False) -> None:
        self.store = store
        self.upstream = upstream
        self.executor = executor
        self.on_commit = on_commit
        self.confirm = confirm
        self.quota = quota
        self.metrics = metrics
        self.shared = shared
        self.inflight: dict[Digest, BlobFetch] = {}
        self._evictable: dict[Digest, Callable[[], None]] = {}  # quota holds, one per in-flight digest
        self._tasks: set[asyncio.Task[None]] = set()
        use_large_reads()  # blob bodies in pieces of up to 1 MiB, not httpcore's 64 KiB

    def get(self, digest: Digest) -> BlobFetch | None:
        """The in-flight fetch of `digest`, if any (an on-demand caller promotes it)."""
        fetch = self.inflight.get(digest)
        if fetch is not None:
            budget.promote(fetch.work)
        return fetch

    def start(self, repo: str, digest: Digest, credential: Credential) -> BlobFetch:
        """Join the fetch of `digest`, starting one (through `repo`) if needed."""
        fetch = self.inflight.get(digest)
        if fetch is None:
            fetch = BlobFetch(digest, repo)
            fetch.stall_timeout = self.upstream.read_timeout_of(repo)  # the owning registry's
            fetch.offer(credential)
            self._enter(fetch)
            fetch.work, context = budget.context_for_task()
            task = asyncio.create_task(self._run(fetch, credential), context=context)
            fetch.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            budget.promote(fetch.work)
            fetch.offer(credential)
        return fetch

    def _enter(self, fetch: BlobFetch) -> None:
        """Put `fetch` in flight: joined by new requests, its blob never evicted."""
        self.inflight[fetch.digest] = fetch
        self._evictable[fetch.digest] = self.quota.fetching(fetch.digest)

    def _leave(self, fetch: BlobFetch) -> None:
        """Take `fetch` out of flight (if still there): new requests start a fetch of their own."""
        if self.inflight.get(fetch.digest) is fetch:
            del self.inflight[fetch.digest]
            self._evictable.pop(fetch.digest)()

    async def close(self, grace: float = 5.0) -> None:
        """Shutdown: cancel every fetch, but let published ones finish recording.

        A blob is published before its metadata (size, repository link) is
        written, and its readers may already be done; cancelling that short
        bookkeeping would leave the object unlinked after a restart (served
        only once upstream confirms it again). Unfinished downloads are
        cancelled and their temp files removed.
        """
        recording = [f.task for f in self.inflight.values() if f.committed and f.task is not None]
        if recording:
            await asyncio.wait(recording, timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self, fetch: BlobFetch, credential: Credential) -> None:
        writer: BlobWriter | None = None
        fill = FillLock(self.store.root / "tmp", fetch.digest)
        keep = False  # leave the bytes written for another worker to resume (shutdown)
        try:
            if not await self._io(fill.try_acquire):
                if await self._follow(fetch, fill, credential):
                    await self.on_commit(fetch)
                    return
            fetch.fill = fill
            failure = await self._io(self._fill_failed_meanwhile, fetch, fill)
            if failure is not None:  # the fill this fetch followed failed: its error, not a new fetch
                fetch.fail(failure)
                return
            if await self._published_meanwhile(fetch, credential):
                await self.on_commit(fetch)
                return
            await self._io(functools.partial(fill.announce, repo=fetch.repo))
            writer = await self._io(self.store.fill_writer, fetch.digest)
            fetch.temp_path = str(writer.temp_path)
            fetch.written = writer.written  # a dead filler's bytes: resumed with a Range
            if fetch.written:
                log.info("blob %s: resuming another filler's %d bytes", fetch.digest, fetch.written)
                fetch.size = writer.expected_size = fill.known_size
            if fetch.size is None or fetch.written < fetch.size:
                await self._download(fetch, writer, credential)
            fetch._started.set()  # a dead filler's complete bytes: only the verify was missing
            if fetch.relay is not None:  # served uncached: verified, nothing published
                fetch.relay.verify(fetch.digest)
                fetch.committed = True
                return
            await self._io(writer.commit)
            writer = None
            fetch.committed = True
            fetch._notify()  # readers finish now; the metadata records follow
            await self._io(fill.clear_failed)
            await self.on_commit(fetch)
        except errors.RegistryError as exc:
            fetch.fail(exc)
        except DigestMismatch as exc:
            log.error("upstream sent wrong bytes for %s: %s", fetch.digest, exc)
            fetch.fail(errors.Unavailable("upstream sent content that does not match the digest"))
        except OSError as exc:
            log.error("store write failed for %s: %s", fetch.digest, exc)
            self.quota.store_error(exc)
            fetch.fail(errors.Unavailable("the mirror could not store this blob", headers={"Retry-After": "10"}))
        except asyncio.CancelledError:
            fetch.fail(Shutdown("mirror shutting down"))
            keep = self.shared
            raise
        except Exception:
            log.exception("fetch of %s failed", fetch.digest)
            fetch.fail(errors.Unknown())
        finally:
            if writer is not None:
                await self._io(writer.keep if keep and writer.written else writer.abort)
            if fill.held:
                if fetch.error is not None and not isinstance(fetch.error, (Shutdown, FollowedFailure)) \
                        and not getattr(fetch.error, "followed", False):
                    await self._io(fill.mark_failed, fetch.error.code, fetch.error.message)
                await self._io(fill.release)
            self._leave(fetch)  # a relayed fetch left early
            self.quota.finish(fetch)
            if fetch.error is not None:
                self.metrics.fill_failures.labels(fetch.error.code).inc()
            fetch.done.set()
            fetch._notify()

    async def _follow(self, fetch: BlobFetch, fill: FillLock, credential: Credential) -> bool:
        """Read along another process's fill of the blob until it ends.

        Returns True when the verified object was published (the fetch is
        committed), False when this process took the fill lock (its filler
        stopped): the caller fills, from the bytes written.

        Raises:
            RegistryError: `fetch.repo` does not hold the blob upstream, or
                the fill failed while followed, or its file was replaced.
        """
        confirmed = False
        inode: int | None = None
        while True:
            info = await self._io(fill.info)
            if not confirmed and info.get("repo"):
                if info["repo"] != fetch.repo:
                    await self.confirm(fetch.repo, fetch.digest, credential)  # another repository's fill
                confirmed = True
            part, final = await self._io(_fill_state, fill.part_path, self.store.path(fetch.digest))
            if final is not None:
                if inode is not None and final[1] != inode:
                    raise errors.Unavailable("the blob's fill started over; retry")
                if not confirmed:
                    await self.confirm(fetch.repo, fetch.digest, credential)  # filled through which repository?
                fetch.size = fetch.written = final[0]
                fetch.committed = True
                fetch._started.set()
                fetch._notify()
                return True
            if part is not None and confirmed:
                if inode is None:
                    inode = part[1]
                    fetch.temp_path = str(fill.part_path)
                if part[1] == inode and part[0] > fetch.written:
                    fetch.received(part[0] - fetch.written)
                    fetch.written = part[0]
                    fetch._notify()
                size = info.get("size")
                if isinstance(size, int) and not fetch._started.is_set():
                    fetch.size = size
                    fetch._started.set()
            if await self._io(fill.try_acquire):
                return False
            await asyncio.sleep(FOLLOW_POLL)

    @staticmethod
    def _fill_failed_meanwhile(fetch: BlobFetch, fill: FillLock) -> errors.RegistryError | None:
        """The error of a fill that failed while this fetch waited for its lock, if any.

        Only an answer that holds for this fetch too: through the same
        repository, and not a refusal of the filler's client's credentials
        (this fetch's own client may be allowed): then this fetch fills itself.
        """
        failure = fill.failed_since(fetch.joined_at)
        code = failure.get("code") if failure is not None else None
        if failure is None or failure.get("repo") != fetch.repo or code in ("UNAUTHORIZED", "DENIED"):
            return None
        cls = next((c for c in (errors.BlobUnknown, errors.TooManyRequests) if c.code == code),
                   FollowedFailure)
        error = cls(str(failure.get("message") or "") or None)
        if cls is not FollowedFailure:
            error.followed = True  # type: ignore[attr-defined]
        return error

    async def _published_meanwhile(self, fetch: BlobFetch, credential: Credential) -> bool:
        """Whether another process published the blob before this one took its lock."""
        size = await self._io(self.store.size, fetch.digest)
        if size is None:
            return False
        await self.confirm(fetch.repo, fetch.digest, credential)
        fetch.size = fetch.written = size
        fetch.committed = True
        fetch._started.set()
        fetch._notify()
        return True

    async def _download(self, fetch: BlobFetch, writer: BlobWriter, credential: Credential) -> None:
        """Stream upstream into `writer`, resuming from the bytes it has."""
        attempt = 0
        while True:
            try:
                await self._stream_once(fetch, writer, credential)
                return
            except (errors.Unauthorized, errors.Denied):
                # A token can expire mid-way through a long layer or a resume:
                # go on with another waiter's token, never the node's own.
                following = fetch.next_credential(credential) if credential.is_client else None
                if following is None:
                    raise
                credential = following
                log.info("blob %s: credential refused at %d bytes; continuing with another client's",
                         fetch.digest, fetch.written)
            except errors.Unavailable as exc:
                delay = retry_delay(exc, attempt)  # upstream's Retry-After, else jittered backoff
                if attempt >= self.upstream.retries_of(fetch.repo) or delay is None:
                    raise
                attempt += 1
                log.warning("blob %s broke at %d bytes; resuming in %.1fs (attempt %d)",
                            fetch.digest, fetch.written, delay, attempt)
                await asyncio.sleep(delay)

    async def _stream_once(self, fetch: BlobFetch, writer: BlobWriter, credential: Credential) -> None:
        async with self.upstream.stream_blob(fetch.repo, fetch.digest, fetch.written,
                                             credential) as stream:
            known = fetch.size
            self._announce(fetch, writer, stream.total)
            if fetch.fill is not None and fetch.size is not None and known is None:
                await self._io(functools.partial(fetch.fill.announce, size=fetch.size))  # followers send Content-Length
            if not fetch._started.is_set():  # before any response headers: reserve, or 503
                if not await self.quota.admit(fetch):
                    await self._relay(fetch, writer)
                fetch.last_progress = time.monotonic()
                fetch._started.set()
            await self._pump(fetch, writer, stream.chunks())
        if fetch.size is not None and fetch.written < fetch.size:
            raise errors.Unavailable("upstream closed the blob early")

    async def _pump(self, fetch: BlobFetch, writer: BlobWriter, chunks: AsyncIterator[bytes]) -> None:
        """Network to disk with one batch written while the next is read.

        At most two batches are in memory; writes stay in order (each waits
        for the previous), and a failure waits for the write in progress so
        `fetch.written` is exact before a resume asks for the rest.
        """
        pending: list[bytes] = []
        pending_size = 0
        flushing: asyncio.Future[None] | None = None
        try:
            try:
                async for chunk in chunks:
                    fetch.received(len(chunk))
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= WRITE_BATCH:
                        if flushing is not None:
                            await flushing
                        flushing = asyncio.ensure_future(self._flush(fetch, writer, pending))
                        pending, pending_size = [], 0
            except errors.Unavailable:
                # The stream broke: keep every byte received, so the resume's
                # Range starts exactly where upstream stopped.
                if flushing is not None:
                    await flushing
                await self._flush(fetch, writer, pending)
                raise
            if flushing is not None:
                await flushing
            await self._flush(fetch, writer, pending)
        finally:
            if flushing is not None and not flushing.done():
                await asyncio.wait([flushing])
            if flushing is not None and flushing.done() and not flushing.cancelled():
                flushing.exception()  # retrieved; raised above when it mattered

    def _announce(self, fetch: BlobFetch, writer: BlobWriter, total: int | None) -> None:
        """Record the size from the first response; later ranges must agree."""
        if fetch.size is None:  # the first response (or the first after another filler's bytes)
            if total == 0 and fetch.digest != Digest.of(b"", fetch.digest.algorithm):
                # An empty body has no tail to hold back: readers would get it whole.
                raise DigestMismatch(f"{fetch.digest}: upstream announced an empty body")
            fetch.size = total
            writer.expected_size = total
        elif total is not None and fetch.size is not None and total != fetch.size:
            raise DigestMismatch(f"{fetch.digest}: resumed size {total} != {fetch.size}")

    async def _flush(self, fetch: BlobFetch, writer: BlobWriter, pending: list[bytes]) -> None:
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        if fetch.relay is not None:
            fetch.written = fetch.relay.append(data)
        else:
            try:
                fetch.written = await self._io(writer.write, data)
            except OSError as exc:
                await self._write_failed(fetch, writer, data, exc)
        fetch._notify()
        self.metrics.upstream_bytes.inc(len(data))

    async def _write_failed(self, fetch: BlobFetch, writer: BlobWriter, pending: bytes, exc: OSError) -> None:
        """A temp-file write failed mid-fetch: relay the rest if the disk is full, else re-raise."""
        if not is_disk_full(exc):
            raise exc
        log.error("disk full while fetching %s at %d bytes: serving it uncached (%s)",
                  fetch.digest, fetch.written, exc)
        await self._relay(fetch, writer, pending)
        await self.quota.disk_full()

    async def _relay(self, fetch: BlobFetch, writer: BlobWriter, pending: bytes = b"") -> None:
        """Stop caching `fetch`: its readers get the rest from memory, nothing is published.

        `pending` is the chunk whose write failed (relayed, not lost).
        """
        # The writer hashed exactly the `written` bytes it wrote; go on from that state.
        fetch.relay = RelayBuffer(fetch.written, writer.running_hash(), fetch.size)
        self._leave(fetch)
        if fetch.fill is not None:
            fetch.fill.release()  # ... in this worker or another, free to fill it
        self.quota.release(fetch)
        await self._io(writer.abort)
        if pending:
            fetch.written = fetch.relay.append(pending)


class Shutdown(errors.Unavailable):  # type: ignore[misc,valid-type]
    """The fetch was stopped by shutdown: not a failure other processes should repeat."""


class FollowedFailure(errors.Unavailable):  # type: ignore[misc,valid-type]
    """Another process's fill of the blob failed while this one followed it."""


def _fill_state(part: Path, final: Path) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(size, inode) of a fill's temp file and of the published object, each None when absent."""
    found: list[tuple[int, int] | None] = []
    for path in (part, final):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            found.append(None)
            continue
        found.append((st.st_size, st.st_ino))
    return found[0], found[1]


def open_for_read(fetch: BlobFetch, store: BlobStore) -> int | None:
    """Open the blob being fetched: its temp file, or the object once published.

    None when it is relayed from memory from its first byte (nothing on disk).

    Raises:
        RegistryError: the fetch failed before anything could be read, or it
            went uncached after its start (the client retries: a new fetch).
    """
    if fetch.relay is not None:
        if fetch.relay.first == 0:
            return None
        raise errors.Unavailable("the mirror is short of disk space; retry", headers={"Retry-After": "10"})
    for path in (fetch.temp_path, store.path(fetch.digest)):
        # The temp file is renamed on commit; only a verified object is ever
        # at the final path, so falling back to it is safe.
        if path is None:
            continue
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
    raise fetch.error or errors.Unavailable("blob fetch ended")
