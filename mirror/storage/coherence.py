"""Invalidations: what one process took out of the metadata, heard by every other at once.

Every process of a node (worker processes, `mirror.workers`) keeps small
in-memory maps of the metadata (tags, links, object records; the hot
manifests are served only behind them). A process that deletes or moves
something (purge, a notification's delete or push, quarantine, eviction, a
tag revalidated to a new digest) must make every other process drop its
copy before that process answers from it again; the next lookup then reads
SQLite, the truth.

The channel is one small file beside the metadata database, mapped into
every process's memory (``mmap``, ``MAP_SHARED``: the pages are the kernel's
page cache, the same bytes in every process):

- a header: a magic, the slot count, and the *generation*, the number of
  invalidations ever published;
- a ring of `SLOTS` fixed-size slots; invalidation number ``g`` lives in slot
  ``g % SLOTS`` as its sequence number and a key (UTF-8 text).

A writer takes an exclusive ``flock`` on the file, writes its keys into the
next slots (each slot's sequence is cleared first and set last) and then
bumps the generation. A reader never locks: on every cached lookup it
compares the mapped generation with the one it last caught up to (one
8-byte load from shared memory, no system call, no thread hop); only when
they differ does it read the new slots. A slot whose sequence is not the one
expected (overwritten by a writer that lapped the ring, or being written) and
a generation that ran more than `SLOTS` ahead make the reader drop all its
maps instead: coherence never depends on keeping up, only speed does.

Keys are opaque to this module; :class:`~mirror.storage.metadata.Metadata`
writes and reads them. Local files only (``flock`` and shared mappings are
not coherent over NFS, as SQLite is not: the metadata is on local disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

MAGIC = b"MIRRINV1"
#: Invalidations a reader may fall behind before it drops its maps whole.
SLOTS = 4096
#: Bytes per slot: 8 of sequence, 2 of length, the key (a repository, a tag and a digest fit).
SLOT = 512
HEADER = 64
#: The key published when one does not fit in a slot: every reader drops everything.
EVERYTHING = "*"

_U64 = struct.Struct("<Q")
_SLOT_HEAD = struct.Struct("<QH")
_HEADER = struct.Struct("<8sIxxxxQ")  # magic, slots, generation (at offset 16)
_GENERATION_AT = 16
_BLANK = (1 << 64) - 1  # a slot being written


class Invalidations:
    """The shared ring of invalidated keys (see the module docstring).

    Args:
        path: the file; created (sparse) when missing or not ours.
        slots: ring size (tests use a small one to lap it).
    """

    def __init__(self, path: Path, slots: int = SLOTS) -> None:
        self.path = path
        self.slots = slots
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._generation: memoryview | None = None

    def open(self) -> None:
        """Map the file, laying it out first if it is new or of another shape."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size = HEADER + self.slots * SLOT
        with self._locked():
            head = os.pread(self._fd, _HEADER.size, 0)
            laid = len(head) == _HEADER.size and _HEADER.unpack(head)[:2] == (MAGIC, self.slots)
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)  # sparse; readers treat a generation going back as "drop all"
            if not laid:
                os.pwrite(self._fd, _HEADER.pack(MAGIC, self.slots, 0), 0)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._generation = memoryview(self._map)[_GENERATION_AT:_GENERATION_AT + 8].cast("Q")

    def close(self) -> None:
        if self._generation is not None:
            self._generation.release()
            self._generation = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def counter(self) -> memoryview:
        """The mapped generation as a one-element view: ``counter[0]`` is the cheapest read."""
        assert self._generation is not None, "invalidations not open"
        return self._generation

    def generation(self) -> int:
        """Invalidations published so far by every process (one load from the mapping)."""
        assert self._generation is not None, "invalidations not open"
        return self._generation[0]

    def publish(self, keys: Iterable[str]) -> tuple[int, int]:
        """Append `keys` for every process, under the file's lock.

        Returns:
            The generation before and after: a publisher that had seen
            everything before may skip its own keys.
        """
        assert self._map is not None and self._generation is not None, "invalidations not open"
        encoded = [key.encode() for key in keys]
        with self._locked():
            before = generation = self._generation[0]
            for data in encoded:
                if len(data) > SLOT - _SLOT_HEAD.size:
                    data = EVERYTHING.encode()
                at = HEADER + (generation % self.slots) * SLOT
                _SLOT_HEAD.pack_into(self._map, at, _BLANK, len(data))
                self._map[at + _SLOT_HEAD.size:at + _SLOT_HEAD.size + len(data)] = data
                _U64.pack_into(self._map, at, generation)
                generation += 1
            self._generation[0] = generation
        return before, generation

    def since(self, seen: int) -> tuple[list[str] | None, int]:
        """The keys published after generation `seen`, and the generation they bring us to.

        None instead of keys means "drop everything": the reader fell more
        than the ring behind, or a slot was overwritten while it read.
        """
        assert self._map is not None, "invalidations not open"
        now = self.generation()
        if now < seen or now - seen > self.slots:
            return None, now
        keys = []
        for number in range(seen, now):
            key = self._read(number)
            if key is None:
                return None, self.generation()
            keys.append(key)
        if self.generation() - seen > self.slots:  # lapped while we read
            return None, self.generation()
        return keys, now

    def _read(self, number: int) -> str | None:
        assert self._map is not None
        at = HEADER + (number % self.slots) * SLOT
        sequence, length = _SLOT_HEAD.unpack_from(self._map, at)
        if sequence != number or length > SLOT - _SLOT_HEAD.size:
            return None
        data = self._map[at + _SLOT_HEAD.size:at + _SLOT_HEAD.size + length]
        if _U64.unpack_from(self._map, at)[0] != number:
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
