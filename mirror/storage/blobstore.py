"""The content-addressed object store: verified, atomic, shareable.

Blobs and manifests alike are stored once, by digest. Objects are immutable:
they are written to a uniquely named temp file, hashed and counted while they
are written, fsynced, and only then renamed into place (and the directory
fsynced), so a reader never sees a partial or unverified object, and several
processes (or hosts on a shared NFS export) can fill one store at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mirror.registry.digest import Digest
from mirror.storage.fills import FILL_PREFIX, fill_paths, sweep_fill

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
_LAYOUT_FILE = "mirror-store.json"


class DigestMismatch(Exception):
    """The bytes written do not match the digest or size they claimed."""


class StoreLayoutError(Exception):
    """The store directory was written by an incompatible layout version."""


def path_for(root: Path, kind: str, digest: Digest | None = None, name: str = "") -> Path:
    """Build every path of the store; the only code that knows the layout.

    Layout version 1::

        <root>/
          mirror-store.json                 {"layout": 1}
          objects/<alg>/<hex[0:2]>/<hex>    one verified object per digest
          tmp/<owner>.lock                  held (flock) by each live process
          tmp/<owner>-<random>.part         an object being written
          tmp/fill-<alg>-<hex>.{lock,part,failed}  a blob fetched for the node
                                            (:mod:`mirror.storage.fills`)
          quarantine/<alg>-<hex>.<time>.<rand>  objects that failed `verify`

    Digests reaching here were validated by :class:`Digest`, so no path is
    ever built from an unvalidated client string.
    """
    if kind == "object":
        assert digest is not None
        return root / "objects" / digest.algorithm / digest.hex[:2] / digest.hex
    if kind == "quarantine":
        assert digest is not None
        return root / "quarantine" / f"{digest.algorithm}-{digest.hex}.{int(time.time())}.{name}"
    if kind == "tmp":
        return root / "tmp" / name
    if kind == "layout":
        return root / _LAYOUT_FILE
    raise ValueError(kind)


class BlobWriter:
    """Writes one object to a temp file, verifying as it goes (blocking I/O).

    Call :meth:`write` per chunk, then :meth:`commit` (verify, fsync, rename)
    or :meth:`abort`. Use from a worker thread, never on the event loop.
    """

    def __init__(self, store: BlobStore, digest: Digest | None, expected_size: int | None,
                 temp_path: Path | None = None) -> None:
        self.store = store
        self.digest = digest  # None: learnt later (a push), set it before commit
        self.expected_size = expected_size
        self._hasher = digest.hasher() if digest is not None else hashlib.sha256()
        self.written = 0
        if temp_path is None:
            self.temp_path = store.new_temp_path()
            # Unbuffered: readers of the growing temp file use their own fds.
            self._file = open(self.temp_path, "xb", buffering=0)  # noqa: SIM115 - closed in commit/abort
        else:  # a node-wide fill: go on from the bytes an earlier filler left
            self.temp_path = temp_path
            self._file = open(self.temp_path, "ab", buffering=0)  # noqa: SIM115 - closed in commit/abort
            self._rehash()

    def _rehash(self) -> None:
        """Hash the bytes already in the temp file (a resumed fill)."""
        with open(self.temp_path, "rb") as existing:
            while chunk := existing.read(1 << 20):
                self._hasher.update(chunk)
                self.written += len(chunk)

    def running_hash(self) -> Any:
        """A copy of the hash of the bytes written so far, for whoever goes on without the file
        (a fetch relayed uncached keeps verifying the rest)."""
        return self._hasher.copy()

    @property
    def inode(self) -> int:
        """The temp file's inode: readers of a fill check they follow this one."""
        return os.fstat(self._file.fileno()).st_ino

    def write(self, chunk: bytes) -> int:
        """Append and hash a chunk; returns the total written so far."""
        if self.expected_size is not None and self.written + len(chunk) > self.expected_size:
            raise DigestMismatch(f"{self.digest}: more bytes than the announced {self.expected_size}")
        view = memoryview(chunk)
        while view:
            view = view[self._file.write(view) :]
        self._hasher.update(chunk)
        self.written += len(chunk)
        return self.written

    def commit(self) -> Path:
        """Verify size and digest, fsync and publish by rename.

        Raises:
            DigestMismatch: the content is not what the digest names; the
                temp file is removed and nothing is published.
        """
        try:
            if self.expected_size is not None and self.written != self.expected_size:
                raise DigestMismatch(f"{self.digest}: {self.written} bytes, expected {self.expected_size}")
            if self.digest is None or self.digest.algorithm != self._hasher.name \
                or self._hasher.hexdigest() != self.digest.hex:
                raise DigestMismatch(f"{self.digest}: content has another digest")
            os.fsync(self._file.fileno())
            self._file.close()
            assert self.digest is not None  # checked above
            return self.store.publish(self.temp_path, self.digest)
        except BaseException:
            self.abort()
            raise

    def keep(self) -> None:
        """Close, leaving the temp file for a later fill to resume from."""
        if not self._file.closed:
            self._file.close()

    def abort(self) -> None:
        """Drop the temp file; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


class BlobStore:
    """Objects by digest under one root directory (blocking I/O methods).

    Args:
        root: the store directory (`storage.filesystem.rootdirectory`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Create or check the layout, take this process's owner lock, sweep."""
        for sub in ("objects", "tmp", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._check_layout()
        self._lock_fd = self._take_owner_lock()
        self.sweep_temp()

    def _take_owner_lock(self) -> int:
        """Create and hold `<owner>.lock`, surviving a concurrent sweep.

        Another process's sweep may see the fresh lock file before it is
        locked, briefly probe it, or even unlink it as dead; so the lock is
        taken blocking and kept only if the locked inode is still the file
        at that path.
        """
        lock_path = path_for(self.root, "tmp", name=f"{self.owner}.lock")
        while True:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def close(self) -> None:
        """Release the owner lock and remove its lock file."""
        if self._lock_fd is not None:
            os.unlink(path_for(self.root, "tmp", name=f"{self.owner}.lock"))
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_layout(self) -> None:
        layout = path_for(self.root, "layout")
        if not layout.exists():
            self._atomic_write(layout, json.dumps({"layout": LAYOUT_VERSION}).encode())
            return
        try:
            version = json.loads(layout.read_text()).get("layout")
        except (ValueError, AttributeError) as exc:
            raise StoreLayoutError(f"{layout}: not a mirror layout file") from exc
        if version != LAYOUT_VERSION:
            raise StoreLayoutError(f"{layout}: layout {version}, this mirror reads {LAYOUT_VERSION}")

    def sweep_temp(self) -> int:
        """Remove temp files of processes that are gone (their lock is free).

        A live process holds an exclusive flock on its `<owner>.lock`, so its
        in-progress temp files are left alone; this is what makes a sweep at
        start safe with several processes on one store.
        """
        removed = 0
        tmp = self.root / "tmp"
        live = {self.owner} | {p.stem for p in tmp.glob("*.lock") if self._is_locked(p)}
        for entry in tmp.iterdir():
            if entry.name.startswith(FILL_PREFIX):
                removed += self._sweep_fill(tmp, entry)
                continue
            owner = entry.name.rsplit("-", 1)[0] if entry.suffix == ".part" else entry.stem
            if owner in live:
                continue
            entry.unlink(missing_ok=True)
            removed += entry.suffix == ".part"
        if removed:
            log.info("swept %d leftover temp files", removed)
        return removed

    @staticmethod
    def _sweep_fill(tmp: Path, entry: Path) -> bool:
        """A node-wide fill no process holds is removed (under its lock).

        When a worker dies mid-fill, the workers following it take its lock
        within `fetcher.FOLLOW_POLL` and resume, long before a restarted
        worker sweeps; a fill nobody followed is swept like any temp file.
        """
        return sweep_fill(tmp, entry) and entry.suffix == ".part"

    @staticmethod
    def _is_locked(lock_path: Path) -> bool:
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def new_temp_path(self) -> Path:
        """A temp name no other process or fetch can pick."""
        return path_for(self.root, "tmp", name=f"{self.owner}-{secrets.token_hex(8)}.part")

    def fill_writer(self, digest: Digest) -> BlobWriter:
        """Write (or go on writing) `digest`'s node-wide fill; hold its FillLock first."""
        return BlobWriter(self, digest, None, fill_paths(self.root / "tmp", digest)[1])

    def writer(self, digest: Digest | None, expected_size: int | None = None) -> BlobWriter:
        """Start writing one object (blocking: call from a worker thread).

        `digest` may be None when it is only known at the end (a push); the
        bytes are then hashed with sha256 and checked once it is set.
        """
        return BlobWriter(self, digest, expected_size)

    def publish(self, temp_path: Path, digest: Digest) -> Path:
        """Rename a verified temp file into place and fsync the directory."""
        final = path_for(self.root, "object", digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp_path, final)
        _fsync_dir(final.parent)
        return final

    def put_bytes(self, digest: Digest, data: bytes) -> Path:
        """Store small verified content (manifests) in one call."""
        writer = self.writer(digest, len(data))
        try:
            writer.write(data)
        except BaseException:
            writer.abort()  # EIO, ENOSPC: no temp file left behind
            raise
        return writer.commit()

    def path(self, digest: Digest) -> Path:
        """Where the object for `digest` lives (it may not exist)."""
        return path_for(self.root, "object", digest)

    def size(self, digest: Digest) -> int | None:
        """The stored object's size, or None when absent."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def open_object(self, digest: Digest, expected_size: int | None) -> tuple[int, int] | None:
        """Open an object for reading, checking its size on every open.

        Returns:
            (fd, size), or None when absent. An object whose size differs from
            what was recorded is quarantined and reported absent.
        """
        try:
            fd = os.open(self.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        size = os.fstat(fd).st_size
        if expected_size is not None and size != expected_size:
            os.close(fd)
            log.error("object %s has %d bytes, recorded %d: quarantined", digest, size, expected_size)
            self.quarantine(digest)
            return None
        return fd, size

    def read(self, digest: Digest, expected_size: int | None = None) -> bytes | None:
        """Read a small object whole (manifests), or None when absent."""
        opened = self.open_object(digest, expected_size)
        if opened is None:
            return None
        fd, size = opened
        try:
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def quarantine(self, digest: Digest, inode: int | None = None) -> bool:
        """Move an object aside so it is never served again (and refetched).

        Args:
            inode: quarantine only this file: a check that read an object
                which was meanwhile quarantined and refetched must not move
                the good copy that replaced it.
        """
        try:
            if inode is not None and os.stat(self.path(digest)).st_ino != inode:
                return False
            os.replace(self.path(digest), path_for(self.root, "quarantine", digest, secrets.token_hex(4)))
        except FileNotFoundError:
            return False
        return True

    def delete(self, digest: Digest) -> int:
        """Remove an object; returns the bytes freed (0 when absent)."""
        path = self.path(digest)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size

    def iter_objects(self) -> Iterator[tuple[Digest, int]]:
        """Every stored object with its size (for verify, repair and du)."""
        objects = self.root / "objects"
        for algorithm_dir in sorted(objects.iterdir()):
            for prefix_dir in sorted(algorithm_dir.iterdir()):
                for entry in prefix_dir.iterdir():
                    try:
                        digest = Digest.parse(f"{algorithm_dir.name}:{entry.name}")
                    except Exception:  # noqa: BLE001 - a stray file is not an object
                        continue
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:  # evicted or quarantined meanwhile
                        continue
                    yield digest, size

    def _atomic_write(self, path: Path, data: bytes) -> None:
        temp = path.with_name(f".{path.name}.{self.owner}.tmp")
        with open(temp, "wb") as handle:
            handle.write(data)
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself is fsynced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems refuse directory fsync
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
