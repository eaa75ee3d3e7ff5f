"""One blob download per node, however many worker processes share the store.

Each blob being fetched has three files in the store's `tmp/`, all named from
its digest, so any process finds them without asking the others:

- `fill-<alg>-<hex>.lock`: held (`flock`, exclusive) by the one process
  filling the blob. Its content is JSON the filler rewrites as it learns
  things: `pid` (which process fills: tests and operators read it), `repo`
  (the repository it fetches through), and `size` once upstream answered.
- `fill-<alg>-<hex>.part`: the bytes received so far, in order. Always the
  same inode for one blob's fill: a filler that stops (killed, shut down,
  upstream gone) leaves it, and the next filler appends to it with a `Range`
  request from its size, so readers following it keep their descriptors.
  Only a digest mismatch removes it (those bytes must not be resumed).
- `fill-<alg>-<hex>.failed`: written under the lock when a fill failed for
  good (JSON: `code`, `message`, `at`, `repo`), so the processes following it
  answer their clients with that error instead of fetching again at once
  (when they fetch through the same repository, and the error is not about
  the filler's own credentials).

Done is the object at its final path: it is renamed there only after its
digest verified, so a follower releases the held-back tail when it appears.

A process that dies holding the lock releases it with its descriptors; a
follower that then takes the lock resumes the fill. Lock files are unlinked
by their holder on release; a taker checks that the inode it locked is still
the one at the path (the store's owner-lock pattern), so an unlink between
open and lock is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from mirror.registry.digest import Digest

FILL_PREFIX = "fill-"


def fill_paths(tmp: Path, digest: Digest) -> tuple[Path, Path, Path]:
    """(lock, part, failed) paths of `digest`'s fill under the store's `tmp/`."""
    stem = f"{FILL_PREFIX}{digest.algorithm}-{digest.hex}"
    return tmp / f"{stem}.lock", tmp / f"{stem}.part", tmp / f"{stem}.failed"


class FillLock:
    """The node-wide claim on filling one blob (blocking I/O: call from a thread)."""

    def __init__(self, tmp: Path, digest: Digest) -> None:
        self.digest = digest
        self.lock_path, self.part_path, self.failed_path = fill_paths(tmp, digest)
        self._fd: int | None = None
        self._info: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def known_size(self) -> int | None:
        """The blob's size as announced by this or an earlier filler."""
        size = self._info.get("size")
        return size if isinstance(size, int) else None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False while another process fills."""
        assert self._fd is None
        while True:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                size = self.info().get("size")  # a dead filler's: its bytes are resumed
                self._info = {"size": size} if isinstance(size, int) else {}
                self.announce(pid=os.getpid())
                return True
            os.close(fd)  # its holder unlinked it meanwhile: lock the new one

    def announce(self, **info: Any) -> None:
        """Publish what the filler knows (pid, repo, size) for the followers."""
        assert self._fd is not None
        self._info.update(info)
        data = json.dumps(self._info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def info(self) -> dict[str, Any]:
        """The current filler's announcement; empty while unreadable (mid-rewrite) or absent."""
        try:
            data = self.lock_path.read_bytes()
            value = json.loads(data) if data else {}
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def mark_failed(self, code: str, message: str) -> None:
        """Tell the followers this fill failed for good (under the lock)."""
        assert self._fd is not None
        with contextlib.suppress(OSError):
            self.failed_path.write_text(json.dumps({"code": code, "message": message, "at": time.time(),
                                                    "repo": self._info.get("repo")}))

    def failed_since(self, since: float) -> dict[str, Any] | None:
        """The failure recorded by a fill that ended after `since` (wall clock), if any."""
        try:
            value = json.loads(self.failed_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict) or float(value.get("at", 0)) < since:
            return None
        return value

    def clear_failed(self) -> None:
        with contextlib.suppress(OSError):
            self.failed_path.unlink()

    def release(self) -> None:
        """Unlink the lock file while still holding it, then let go."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock_path)
        os.close(self._fd)
        self._fd = None


def sweep_fill(tmp: Path, entry: Path) -> bool:
    """Remove one leftover fill file if no process fills its blob; True if removed.

    Taken under the fill's own lock, so a process resuming the fill at the
    same moment either sees the part gone (and starts over) or keeps it.
    """
    stem = entry.name.split(".", 1)[0]
    try:
        digest = Digest.parse(stem[len(FILL_PREFIX):].replace("-", ":", 1))
    except Exception:  # noqa: BLE001 - not one of ours
        return False
    lock = FillLock(tmp, digest)
    if not lock.try_acquire():
        return False
    try:
        for path in (lock.part_path, lock.failed_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        lock.release()
    return True
