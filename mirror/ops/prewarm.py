"""Prewarm: put images in the cache before anyone pulls them.

A prewarm job takes image references (`repo:tag`, `repo@digest`), resolves
each through the node's own manifest service (so a tag is cached as a pull
would cache it), expands an index to the children of the requested platforms
(`linux/amd64` by default, a comma list, or `all`), and fetches every config
and layer not already stored through the node's own fetcher, at most
:data:`BLOB_CONCURRENCY` blobs at once across all jobs. Because it goes
through the same services, a client pulling the same image meanwhile joins
the same downloads, and nothing stored is fetched again.

Jobs run as background work (:mod:`mirror.upstream.budget`): on-demand pulls
go first on the link. Their progress (blobs and bytes done/total, errors,
state) is kept for the last :data:`KEEP_JOBS` jobs, in memory and in a
`diskcache.Index` under `<metadata_dir>/jobs` (written at every state change
and at most every :data:`SAVE_EVERY` seconds of progress). A job a restart or
a crash interrupted is started again under its id when the node starts: what
it had stored counts as already cached, so it goes on where it stopped.

The same machinery warms what a tag moved to when it is refreshed
(:mod:`mirror.proxy.tagrefresh`: push notifications and keep-fresh).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diskcache import Index

from mirror import errors
from mirror.proxy.fetcher import BlobFetch
from mirror.registry import manifest as manifests
from mirror.registry.digest import Digest
from mirror.registry.reference import ImageRef, parse_image
from mirror.upstream.budget import background
from mirror.upstream.credential import Credential
from mirror.upstream.registries import default_names

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from mirror.config import Settings
    from mirror.proxy.blobs import Blobs
    from mirror.proxy.manifests import ManifestResult, Manifests
    from mirror.storage.blobstore import BlobStore
    from mirror.storage.metadata import Metadata
    from mirror.upstream.registries import Registries

log = logging.getLogger(__name__)

#: Error codes that mean upstream refused the node's credentials for the image.
REFUSALS = frozenset({"UNAUTHORIZED", "DENIED"})
#: A finished job logs this many of its errors, one line each.
LOGGED_ERRORS = 5

BLOB_CONCURRENCY = 4
KEEP_JOBS = 100
SAVE_EVERY = 1.0  # seconds between progress saves of a running job
DEFAULT_PLATFORM = "linux/amd64"

#: pin(repo, reference, top digest, objects): keep one image's objects from eviction.
Pin = Callable[[str, str, Digest, list[Digest]], Awaitable[None]]


def parse_platforms(value: str | None) -> list[manifests.Platform] | None:
    """`linux/amd64`, `linux/amd64,linux/arm64/v8` or `all` (None: every platform).

    Raises:
        ValueError: a platform is not `os/arch[/variant]`.
    """
    value = (value or DEFAULT_PLATFORM).strip()
    if value == "all":
        return None
    return [manifests.Platform.parse(p.strip()) for p in value.split(",") if p.strip()]


@dataclass
class Plan:
    """One resolved image of a job: its manifests, all its blobs, and the blobs this job fetches."""

    ref: ImageRef
    digest: Digest
    listed: list[Digest]
    blobs: list[Digest] = field(default_factory=list)
    fetch: list[manifests.Descriptor] = field(default_factory=list)


@dataclass
class Job:
    """One prewarm job and its progress."""

    id: str
    images: list[str]
    platform: str
    pin: bool
    kind: str = "prewarm"
    state: str = "queued"  # queued, running, done, failed (done with errors), cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    manifests: int = 0
    blobs_total: int = 0
    blobs_done: int = 0
    blobs_cached: int = 0
    bytes_total: int = 0
    bytes_completed: int = 0
    bytes_fetched: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    resolved: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0  # times a restart interrupted it and it was started again
    saved: float = 0.0  # monotonic time of the last progress save
    active: dict[Digest, BlobFetch] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    _seen: set[tuple[str, Digest]] = field(default_factory=set)

    def add_blob(self, repo: str, digest: Digest, size: int) -> bool:
        """Count a blob of a repository into the totals once; False when already counted."""
        if (repo, digest) in self._seen:
            return False
        self._seen.add((repo, digest))
        self.blobs_total += 1
        self.bytes_total += size
        return True

    def blob_done(self, size: int, fetched: int = 0, cached: bool = False) -> None:
        self.blobs_done += 1
        self.bytes_completed += size
        self.bytes_fetched += fetched
        if cached:
            self.blobs_cached += 1

    def error(self, image: str, message: str, digest: Digest | None = None) -> None:
        entry = {"image": image, "error": message}
        if digest is not None:
            entry["digest"] = str(digest)
        self.errors.append(entry)

    @property
    def bytes_done(self) -> int:
        in_flight = sum(min(f.written, f.size or f.written) for f in self.active.values())
        return self.bytes_completed + in_flight

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "state": self.state, "images": self.images,
            "platform": self.platform, "pin": self.pin, "created": self.created,
            "started": self.started, "finished": self.finished, "manifests": self.manifests,
            "blobs_total": self.blobs_total, "blobs_done": self.blobs_done,
            "blobs_cached": self.blobs_cached, "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done, "bytes_fetched": self.bytes_fetched,
            "errors": self.errors, "resolved": self.resolved, "resumed": self.resumed,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Job:
        """A job as :meth:`to_json` saved it (finished jobs: history only)."""
        names = {f.name for f in fields(cls)} - {"active", "task", "_seen", "saved"}
        job = cls(**{k: v for k, v in record.items() if k in names})
        job.bytes_completed = record.get("bytes_done", 0)
        return job


class Jobs:
    """The node's recent jobs, by id (bounded), saved on local disk when given a directory."""

    def __init__(self, keep: int = KEEP_JOBS, directory: Path | None = None) -> None:
        self.keep = keep
        self.closing = False
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._saved = Index(str(directory)) if directory is not None else None

    def add(self, job: Job) -> Job:
        self._jobs[job.id] = job
        while len(self._jobs) > self.keep:
            oldest = next((j for j in self._jobs.values() if j.finished is not None), None)
            if oldest is None:
                break
            del self._jobs[oldest.id]
            if self._saved is not None:
                self._saved.pop(oldest.id, None)
        self.save(job)
        return job

    def save(self, job: Job, *, progress: bool = False) -> None:
        """Write a job's state to disk; a progress save at most every SAVE_EVERY seconds."""
        if self._saved is None or job.kind != "prewarm":
            return
        now = time.monotonic()
        if progress and now - job.saved < SAVE_EVERY:
            return
        job.saved = now
        try:
            self._saved[job.id] = job.to_json()
        except Exception:  # a full or broken disk: the job goes on, unsaved
            log.warning("could not save prewarm job %s", job.id, exc_info=True)

    def saved(self) -> list[dict[str, Any]]:
        """Every saved job record, oldest first."""
        if self._saved is None:
            return []
        return sorted(self._saved.values(), key=lambda record: record.get("created", 0))

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    async def close(self) -> None:
        """Stop running jobs; they stay saved as interrupted and resume at the next start."""
        self.closing = True
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._saved is not None:
            self._saved.cache.close()


class Warmer:
    """Fetches manifests and blobs ahead of clients, through the node's services."""

    def __init__(self, settings: Settings, upstream: Registries, metadata: Metadata, store: BlobStore,
                 executor: ThreadPoolExecutor, blobs: Blobs, manifests: Manifests,
                 pin: Pin | None = None) -> None:
        self.settings = settings
        self.upstream = upstream
        self.metadata = metadata
        self.store = store
        self.executor = executor
        self.blobs = blobs
        self.manifests = manifests
        self.pin = pin
        self.namespaces = default_names(upstream.base_url, settings.mirror.names)  # as Node.namespaces
        self.jobs = Jobs(directory=settings.metadata_dir / "jobs")
        self._blob_slots = asyncio.Semaphore(BLOB_CONCURRENCY)

    # -- jobs -----------------------------------------------------------------

    def submit(self, images: list[str], platform: str | None = None, pin: bool = False) -> Job:
        """Validate and start a prewarm job.

        Raises:
            RegistryError: an image reference or the platform is malformed.
        """
        refs = [parse_image(text, self.namespaces, self.upstream) for text in images]
        try:
            platforms = parse_platforms(platform)
        except ValueError as exc:
            raise errors.RegistryError(str(exc), status=400) from exc
        job = Job(secrets.token_hex(8), [r.text for r in refs], platform or DEFAULT_PLATFORM, pin)
        return self._start(job, refs, platforms)

    def _start(self, job: Job, refs: list[ImageRef], platforms: list[manifests.Platform] | None) -> Job:
        with background():
            job.task = asyncio.create_task(self._run_job(job, refs, platforms), name=f"prewarm-{job.id}")
        return self.jobs.add(job)

    def resume(self) -> None:
        """Start again the saved jobs a stop interrupted; keep the finished ones as history."""
        for record in self.jobs.saved():
            job = Job.from_json(record)
            if job.state not in ("queued", "running"):
                self.jobs.add(job)
                continue
            job.resumed += 1
            job.state, job.finished = "queued", None
            job.manifests = job.blobs_total = job.blobs_done = job.blobs_cached = 0
            job.bytes_total = job.bytes_completed = 0
            job.errors, job.resolved = [], []
            try:
                refs = [parse_image(text, self.namespaces, self.upstream) for text in job.images]
                platforms = parse_platforms(job.platform)
            except (errors.RegistryError, ValueError) as exc:
                job.error("*", f"cannot resume: {exc}")
                job.state, job.finished = "failed", time.time()
                self.jobs.add(job)
                continue
            log.info("prewarm job %s interrupted by a restart: resuming (%d images)", job.id, len(refs))
            self._start(job, refs, platforms)

    def cancel(self, job: Job) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()

    async def _run_job(self, job: Job, refs: list[ImageRef],
                       platforms: list[manifests.Platform] | None, *, blobs: bool = True) -> None:
        job.state, job.started = "running", time.time()
        self.jobs.save(job)
        try:
            plans = []
            for ref in refs:
                plan = await self._resolve(job, ref, platforms)
                if plan is not None:
                    plans.append(plan)
            if blobs:
                await asyncio.gather(*(self._warm_blob(job, plan.ref, d) for plan in plans
                                       for d in plan.fetch))
            if job.pin and self.pin is not None:
                await self._pin(job, plans)
            job.state = "failed" if job.errors else "done"
        except asyncio.CancelledError:
            job.state = "queued" if self.jobs.closing else "cancelled"  # a stop: resumed at the next start
            raise
        except Exception as exc:  # a bug: the job ends failed, visibly
            log.exception("prewarm job %s failed", job.id)
            job.error("*", f"internal error: {exc}")
            job.state = "failed"
        finally:
            job.finished = None if job.state == "queued" else time.time()
            job.active.clear()
            self.jobs.save(job)
            log.info("prewarm job %s %s: %d blobs (%d cached), %d bytes fetched, %d errors", job.id,
                     job.state, job.blobs_done, job.blobs_cached, job.bytes_fetched, len(job.errors))
            for entry in job.errors[:LOGGED_ERRORS]:
                log.warning("prewarm job %s: %s%s: %s", job.id, entry["image"],
                            f" {entry['digest']}" if "digest" in entry else "", entry["error"])

    async def _resolve(self, job: Job, ref: ImageRef, platforms: list[manifests.Platform] | None
                       ) -> Plan | None:
        """The manifests (fetched now) and blobs (counted into the totals) of one image."""
        try:
            top = await self._manifest(ref.repo, ref.tag, ref.digest)
            listed, images = await self.expand(ref.repo, top, platforms)
        except errors.RegistryError as exc:
            job.error(ref.text, self._describe(exc))
            return None
        except Exception as exc:
            log.exception("resolving %s failed", ref.text)
            job.error(ref.text, str(exc))
            return None
        job.manifests += len(listed)
        plan = Plan(ref, top.digest, listed)
        for image in images:
            for descriptor in image.blobs():
                plan.blobs.append(descriptor.digest)
                if job.add_blob(ref.repo, descriptor.digest, descriptor.size):
                    plan.fetch.append(descriptor)
        job.resolved.append({"image": ref.text, "repository": ref.repo, "digest": str(top.digest),
                             "mediaType": top.media_type, "manifests": [str(d) for d in listed]})
        return plan

    async def _pin(self, job: Job, plans: list[Plan]) -> None:
        """Pin each image that resolved, as the operator named it, with what it is made of.

        A blob that failed to download is pinned too: it is held as soon as a
        later pull or prewarm stores it.
        """
        assert self.pin is not None
        for plan in plans:
            try:
                await self.pin(plan.ref.repo, plan.ref.reference, plan.digest, [*plan.listed, *plan.blobs])
            except Exception as exc:
                log.exception("pinning %s failed", plan.ref.text)
                job.error(plan.ref.text, f"pinning failed: {exc}")

    def _describe(self, exc: errors.RegistryError) -> str:
        """A job error; a refusal upstream names whose credentials were refused.

        Prewarm is background work: it runs with the node's own account, so
        "UNAUTHORIZED" alone sends an operator looking at the wrong password.
        """
        text = f"{exc.code}: {exc.message}"
        if exc.code not in REFUSALS:
            return text
        username = self.settings.proxy.username
        whose = f"proxy.username {username}" if username else "anonymous: no proxy.username"
        return f"refused upstream ({text}) with the node's own account ({whose})"

    async def _manifest(self, repo: str, tag: str | None, digest: Digest | None) -> ManifestResult:
        if digest is not None:
            return await self.manifests.by_digest(repo, digest, Credential.node())
        assert tag is not None
        return await self.manifests.by_tag(repo, tag, Credential.node())

    async def expand(self, repo: str, top: ManifestResult, platforms: list[manifests.Platform] | None
                     ) -> tuple[list[Digest], list[manifests.Manifest]]:
        """Every manifest digest to keep and the image manifests to fetch blobs for.

        An index is expanded to its children for `platforms` (None: all of
        them); an image manifest is taken as it is.
        """
        parsed = manifests.parse(top.raw, top.media_type)
        if not parsed.is_index:
            return [top.digest], [parsed]
        listed, images = [top.digest], []
        for child in parsed.children:
            if platforms is not None and not any(
                    child.platform is not None and p.matches(child.platform) for p in platforms):
                continue
            result = await self.manifests.by_digest(repo, child.digest, Credential.node())
            listed.append(result.digest)
            child_manifest = manifests.parse(result.raw, result.media_type)
            if not child_manifest.is_index:
                images.append(child_manifest)
        return listed, images

    async def _warm_blob(self, job: Job, ref: ImageRef, descriptor: manifests.Descriptor) -> None:
        async with self._blob_slots:
            try:
                cached, fetched = await self.fetch_blob(ref.repo, descriptor.digest, job)
            except errors.RegistryError as exc:
                job.error(ref.text, self._describe(exc), descriptor.digest)
                return
            job.blob_done(descriptor.size, fetched, cached)
            self.jobs.save(job, progress=True)

    async def fetch_blob(self, repo: str, digest: Digest, job: Job | None = None) -> tuple[bool, int]:
        """Make sure `digest` is stored and linked to `repo`.

        Returns:
            (True, 0) when it was already stored, else (False, bytes this call
            fetched: 0 when it joined a download already running).

        Raises:
            RegistryError: the fetch failed.
        """
        record = await self.metadata.get_object(digest)
        if record is not None:
            size = await asyncio.get_running_loop().run_in_executor(self.executor, self.store.size, digest)
            if size == record.size:
                await self.blobs.ensure_linked(repo, digest, Credential.node())
                return True, 0
        joined = self.blobs.fetcher.get(digest) is not None  # a client's (or another job's) download
        fetch = self.blobs.fetcher.start(repo, digest, Credential.node())
        if job is not None:
            job.active[digest] = fetch
        try:
            await fetch.done.wait()
        finally:
            if job is not None:
                job.active.pop(digest, None)
        if fetch.error is not None and not fetch.committed:
            raise fetch.error
        if fetch.relay is not None:  # relayed to its readers uncached (quota, disk full)
            raise errors.Unavailable("the blob could not be cached (store quota or disk full)")
        if fetch.repo != repo:
            await self.blobs.ensure_linked(repo, digest, Credential.node())
        return False, 0 if joined else fetch.written

    # -- what a refreshed tag moved to (mirror.proxy.tagrefresh) ---------------------

    async def warm_digest(self, repo: str, digest: Digest,
                          platforms: list[manifests.Platform] | None = None, *,
                          blobs: bool = True) -> Job:
        """Fetch a manifest by digest and what it needs (a job not listed)."""
        job = Job(secrets.token_hex(8), [f"{repo}@{digest}"], "all" if platforms is None else
                  ",".join(map(str, platforms)), False, kind="prefetch")
        ref = ImageRef(job.images[0], repo, None, digest)
        await self._run_job(job, [ref], platforms, blobs=blobs)
        return job
