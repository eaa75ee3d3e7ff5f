"""Pins: images an operator keeps in the store whatever the quota says.

A pin belongs to an image as the operator named it, a (registry,
repository, reference) where the reference is a tag or a digest, and holds
the objects that image was made of when it was pinned (its manifests, an
index's children for the platforms prewarmed, configs and layers). Objects
are held by reference count: `objects.pinned` is the number of pins holding
an object, so unpinning one image never releases a layer another pinned
image shares, and eviction (`pinned = 0` only) keeps every held object.

The tables (`pins`, `pin_objects`, in :mod:`mirror.storage.metadata`) are
the truth; the count is recomputed from them for every object a change
touches, in the same transaction, and set again when a purged object is
stored anew (:meth:`Metadata.put_object`). Pinning the same image again
replaces what it holds (a tag pinned again after it moved holds the new
version only). Purge still removes pinned content: the pin stays and holds
the objects again when they are fetched back.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mirror.registry.digest import Digest
from mirror.storage.metadata import Metadata


@dataclass(frozen=True, slots=True)
class PinKey:
    """Whose pin: the registry, repository and reference the operator named."""

    registry: str
    repo: str
    reference: str

    def __str__(self) -> str:
        separator = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.repo}{separator}{self.reference}"


_RECOUNT = ("UPDATE objects SET pinned = (SELECT count(*) FROM pin_objects p WHERE p.digest = objects.digest) "
            "WHERE digest = ?")

_LIST = """
SELECT p.registry, p.repo, p.reference, p.digest, p.created,
       count(o.digest), coalesce(sum(o.size), 0),
       coalesce(sum(CASE WHEN o.pinned = 1 THEN o.size ELSE 0 END), 0)
FROM pins p
LEFT JOIN pin_objects po ON po.registry = p.registry AND po.repo = p.repo AND po.reference = p.reference
LEFT JOIN objects o ON o.digest = po.digest
GROUP BY p.registry, p.repo, p.reference
ORDER BY p.registry, p.repo, p.reference
"""


class Pins:
    """Pin and unpin images; list pins with the bytes they hold."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    async def pin(self, key: PinKey, digest: Digest, objects: Iterable[Digest]) -> int:
        """Pin the image `key` (resolved to `digest`) with its `objects`; returns how many it holds."""
        held = list(dict.fromkeys(str(d) for d in (digest, *objects)))

        def apply(db: sqlite3.Connection) -> int:
            before = _held(db, key)
            db.execute("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?, ?)",
                       (key.registry, key.repo, key.reference, str(digest), time.time()))
            db.execute("DELETE FROM pin_objects WHERE registry=? AND repo=? AND reference=?",
                       (key.registry, key.repo, key.reference))
            db.executemany("INSERT INTO pin_objects VALUES (?, ?, ?, ?)",
                           [(key.registry, key.repo, key.reference, d) for d in held])
            _recount(db, set(before) | set(held))
            return len(held)

        return await self.metadata.transact(apply)

    async def unpin(self, registry: str, repo: str, reference: str) -> list[dict[str, Any]]:
        """Remove the pins of `repo` named by `reference` (the tag or digest pinned, or the digest
        a tag was pinned at).

        Returns:
            One entry per pin removed: `{"pin", "released", "kept"}` with the
            objects no pin holds any longer and those another pin still holds.
        """
        def apply(db: sqlite3.Connection) -> list[dict[str, Any]]:
            keys = [PinKey(*row) for row in db.execute(
                "SELECT registry, repo, reference FROM pins WHERE registry=? AND repo=? "
                "AND (reference=? OR digest=?)", (registry, repo, reference, reference))]
            removed = []
            for key in keys:
                held = _held(db, key)
                db.execute("DELETE FROM pins WHERE registry=? AND repo=? AND reference=?",
                           (key.registry, key.repo, key.reference))
                db.execute("DELETE FROM pin_objects WHERE registry=? AND repo=? AND reference=?",
                           (key.registry, key.repo, key.reference))
                _recount(db, held)
                still = {row[0] for row in db.execute(
                    f"SELECT DISTINCT digest FROM pin_objects WHERE digest IN ({_marks(held)})", held)}
                removed.append({"pin": str(key), "released": [d for d in held if d not in still],
                                "kept": [d for d in held if d in still]})
            return removed

        return await self.metadata.transact(apply)

    async def list(self) -> list[dict[str, Any]]:
        """Every pin with the objects it holds that are stored, their bytes, and the bytes only it holds."""
        rows = await self.metadata.transact(lambda db: db.execute(_LIST).fetchall())
        return [{"pin": str(PinKey(registry, repo, reference)), "registry": registry, "repository": repo,
                 "reference": reference, "digest": digest, "created": created, "objects": objects,
                 "bytes": size, "exclusive_bytes": exclusive}
                for registry, repo, reference, digest, created, objects, size, exclusive in rows]


def _held(db: sqlite3.Connection, key: PinKey) -> list[str]:
    return [row[0] for row in db.execute(
        "SELECT digest FROM pin_objects WHERE registry=? AND repo=? AND reference=?",
        (key.registry, key.repo, key.reference))]


def _recount(db: sqlite3.Connection, digests: Iterable[str]) -> None:
    db.executemany(_RECOUNT, [(d,) for d in digests])


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))
