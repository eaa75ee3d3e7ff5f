"""Store verification (`mirror verify`) and the start-up repair of the metadata.

Verification re-hashes every stored object in worker threads and moves any
object whose bytes do not match its digest to `quarantine/`, so it is never
served again; the next request for it refetches it from upstream. It works on
a running node (through the admin API, which also drops the metadata record)
or offline on a store directory (`mirror verify --store DIR`), in which case
the next start's repair drops the records of what was quarantined.

The repair runs in the background when a node opens: records whose object is
missing are dropped, objects whose size differs from the record are
quarantined, and objects present without a record (published by a process
that died before recording them) are recorded, so the quota counts them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mirror.registry.digest import Digest
from mirror.storage.blobstore import BlobStore, path_for
from mirror.storage.metadata import Metadata

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024
DEFAULT_WORKERS = 4


class NotAStore(Exception):
    """The directory given to an offline verify holds no mirror store."""


@dataclass
class VerifyReport:
    """What a verification found."""

    checked: int = 0
    ok: int = 0
    corrupt: int = 0  # quarantined
    missing: int = 0  # vanished while verifying (evicted, purged)
    bytes: int = 0  # hashed
    quarantined: list[str] = field(default_factory=list)  # digests
    quarantined_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def hash_matches(path: Path, digest: Digest) -> tuple[bool, int] | None:
    """(bytes hash to `digest`, size) of a file, or None when it is gone (blocking)."""
    hasher = digest.hasher()
    size = 0
    try:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(READ_SIZE):
                hasher.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None
    return hasher.hexdigest() == digest.hex, size


def verify_store(store: BlobStore, workers: int = DEFAULT_WORKERS,
                 skip: Callable[[Digest], bool] | None = None) -> VerifyReport:
    """Re-hash every object with `workers` threads, quarantining mismatches (blocking).

    Args:
        skip: objects not to check (e.g. being written right now).
    """
    report = VerifyReport()

    def check(item: tuple[Digest, int]) -> tuple[Digest, tuple[bool, int] | None]:
        return item[0], hash_matches(store.path(item[0]), item[0])

    objects: Iterable[tuple[Digest, int]] = store.iter_objects()
    if skip is not None:
        objects = (item for item in objects if not skip(item[0]))
    for digest, result in _bounded_map(check, objects, max(1, workers)):
        report.checked += 1
        if result is None:
            report.missing += 1
            continue
        matches, size = result
        report.bytes += size
        if matches:
            report.ok += 1
            continue
        log.error("object %s does not match its digest: quarantined", digest)
        if store.quarantine(digest):
            report.corrupt += 1
            report.quarantined.append(str(digest))
            report.quarantined_bytes += size
        else:
            report.missing += 1
    return report


def _bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`fn` over `items` in `workers` threads, in order, with a bounded queue (huge stores)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        window: deque[Future[Any]] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def verify_offline(root: Path, workers: int = DEFAULT_WORKERS) -> VerifyReport:
    """Verify a store directory no node is serving (`mirror verify --store DIR`).

    Raises:
        NotAStore: `root` has no mirror layout file.
    """
    if not path_for(root, "layout").is_file() or not (root / "objects").is_dir():
        raise NotAStore(f"{root}: not a mirror store (no {path_for(root, 'layout').name})")
    return verify_store(BlobStore(root), workers)


async def verify_online(store: BlobStore, metadata: Metadata, workers: int = DEFAULT_WORKERS,
                        skip: Callable[[Digest], bool] | None = None) -> VerifyReport:
    """Verify a running node's store in threads; quarantined objects are forgotten."""
    loop = asyncio.get_running_loop()
    report = await loop.run_in_executor(None, verify_store, store, workers, skip)
    for key in report.quarantined:
        await metadata.forget_object(Digest.parse(key))
    return report


@dataclass
class RepairReport:
    """What the start-up repair changed."""

    forgotten: int = 0  # records whose object is missing
    quarantined: int = 0  # objects whose size differs from their record
    adopted: int = 0  # objects recorded after the fact

    @property
    def changed(self) -> bool:
        return bool(self.forgotten or self.quarantined or self.adopted)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def repair(store: BlobStore, metadata: Metadata, executor: ThreadPoolExecutor) -> RepairReport:
    """Make the metadata agree with the files (run in the background at start)."""
    loop = asyncio.get_running_loop()
    report = RepairReport()
    records = dict(await metadata.all_objects())
    on_disk: dict[str, int] = await loop.run_in_executor(
        executor, lambda: {str(d): size for d, size in store.iter_objects()})
    for key, size in records.items():
        actual = on_disk.get(key)
        if actual == size:
            continue
        digest = Digest.parse(key)
        if actual is None:
            # Published meanwhile? Then the record is right after all.
            if await loop.run_in_executor(executor, store.size, digest) == size:
                continue
            report.forgotten += 1
        else:
            log.error("object %s has %d bytes, recorded %d: quarantined", key, actual, size)
            await loop.run_in_executor(executor, store.quarantine, digest)
            report.quarantined += 1
        await metadata.forget_object(digest)
    for key in on_disk.keys() - records.keys():
        digest = Digest.parse(key)
        if await metadata.get_object(digest) is None:
            found: int | None = await loop.run_in_executor(executor, store.size, digest)
            if found is not None:
                await metadata.put_object(digest, found, None)
                report.adopted += 1
    return report


def store_bytes(root: Path) -> int:
    """Bytes of objects and temp files under a store root (tests, du cross-checks)."""
    total = 0
    for sub in ("objects", "tmp"):
        for directory, _dirs, files in os.walk(root / sub):
            for name in files:
                if sub == "tmp" and not name.endswith(".part"):
                    continue
                try:
                    total += os.stat(os.path.join(directory, name)).st_size
                except FileNotFoundError:
                    pass
    return total
