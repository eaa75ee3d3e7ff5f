"""Hot manifests: verified manifest bytes by digest, in this process's memory.

A warm manifest (by digest, or by a tag within its TTL) is answered from
here without a thread hop or a re-hash: the bytes were hashed to their
digest when they entered, and a digest's bytes never change.

Coherence is the metadata's, not this map's: a hit is only served after
the metadata's in-process maps still say the object is recorded as a
manifest and linked to the repository (and, for a tag, that the tag points
at it within the TTL). Everything any process of the node deletes (purge, a
notification's tag delete, quarantine on bit rot, eviction) goes through
:class:`~mirror.storage.metadata.Metadata`, which drops those entries here
and, through the shared invalidation ring (:mod:`mirror.storage.coherence`),
in every other worker before its next lookup; so a deleted manifest is never
served from here, by any worker.

An entry is still trusted only for `recheck` seconds (the tag TTL), after
which the next request reads and re-hashes the stored file again (a file
gone or rotten is then forgotten or quarantined as before): that is the
bit-rot check of a manifest that stays hot, and it bounds what a change
made to the store by hand leaves visible. The recheck runs on the wall
clock, as the tag TTL does.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from mirror.registry.digest import Digest

#: Bytes of manifests kept per process (a typical manifest is 1 to 10 KB).
HOT_BYTES = 32 * 1024 * 1024


class HotManifests:
    """A bounded, least-recently-used map of digest -> verified manifest bytes.

    Args:
        recheck: seconds an entry is served before the stored file is read
            (and hashed) again.
        max_bytes: the bound on the bytes held; the least recently used
            entries fall out first.
    """

    def __init__(self, recheck: float, max_bytes: int = HOT_BYTES) -> None:
        self.recheck = recheck
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Digest, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: Digest) -> bytes | None:
        """The verified bytes of `digest`, or None (absent, or due for a re-read)."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if time.time() - entry[1] >= self.recheck:
            self.discard(digest)
            return None
        self._entries.move_to_end(digest)
        return entry[0]

    def put(self, digest: Digest, raw: bytes) -> None:
        """Keep bytes that were just hashed to `digest` (the caller verified them)."""
        if len(raw) > self.max_bytes // 4:  # one huge manifest must not flush the rest
            return
        self.discard(digest)
        self._entries[digest] = (raw, time.time())
        self.bytes += len(raw)
        while self.bytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.bytes -= len(old)

    def discard(self, digest: Digest) -> None:
        """Drop `digest` (forgotten, quarantined, or due for a re-read)."""
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self.bytes -= len(entry[0])

    def clear(self) -> None:
        """Drop everything (tests; an operator's purge of the whole store)."""
        self._entries.clear()
        self.bytes = 0
