"""Metadata: tags, repository links, object sizes and access times, in SQLite.

SQLite is on local disk only (it is unsafe on NFS even when the object store
is not), one connection per process, used from one dedicated worker thread so
the event loop never blocks on it. Hot reads are answered from small
in-process maps that mirror what this process wrote or read; they are an
optimisation only, the database stays the truth shared between processes.

The maps stay coherent across processes (worker processes, `mirror.workers`):
every delete, unlink, forget and tag write is published, after its SQL, on
the shared ring of :mod:`mirror.storage.coherence`, and every cached lookup
first catches up with that ring (one load from shared memory when nothing
changed). A row read from SQLite is kept only if nothing was published,
and this process wrote nothing, while it was read, so a read racing a
delete cannot bring the old row back; a process skips its own publications
(its maps already hold their outcome) unless others published before them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mirror.registry.digest import Digest
from mirror.storage.coherence import EVERYTHING, Invalidations

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,
    created REAL NOT NULL, last_access REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS links (
    repo TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS links_by_digest ON links (digest);
CREATE TABLE IF NOT EXISTS tags (
    repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL,
    fetched_at REAL NOT NULL, PRIMARY KEY (repo, tag));
CREATE TABLE IF NOT EXISTS tag_lists (
    repo TEXT PRIMARY KEY, tags TEXT NOT NULL, fetched_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
    registry TEXT NOT NULL, repo TEXT NOT NULL, reference TEXT NOT NULL, digest TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (registry, repo, reference));
CREATE TABLE IF NOT EXISTS pin_objects (
    registry TEXT NOT NULL, repo TEXT NOT NULL, reference TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (registry, repo, reference, digest));
CREATE INDEX IF NOT EXISTS pin_objects_by_digest ON pin_objects (digest);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY, value REAL NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag pointed at when upstream last confirmed it."""

    digest: Digest
    media_type: str
    fetched_at: float


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """A stored object's recorded size and (for manifests) media type."""

    size: int
    media_type: str | None


class _LRU(OrderedDict[Any, Any]):
    """A tiny bounded map: recent entries stay, old ones fall out."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)

    def recall(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


class Metadata:
    """Async access to the metadata database.

    Args:
        path: the SQLite file, on local disk.
        memory_entries: bound of each in-process map.
    """

    def __init__(self, path: Path, memory_entries: int = 100_000) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metadata")
        self._db: sqlite3.Connection | None = None
        self._tags = _LRU(memory_entries)
        self._links = _LRU(memory_entries)
        self._objects = _LRU(memory_entries)
        self._accessed: dict[str, float] = {}
        self.invalidations = Invalidations(path.with_name(f"{path.stem}.invalidations"))
        self._seen = 0  # the invalidations' generation these maps reflect
        self._generation: Any = (0,)  # the mapped generation, once open (mirror.storage.coherence)
        self._writes = 0  # this process's tag/link/object writes begun (a read spanning one is not kept)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        """Create the schema (idempotent) on the worker thread."""
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(SCHEMA)
        self._db = db
        self.invalidations.open()
        self._generation = self.invalidations.counter
        self._seen = self._generation[0]

    async def close(self) -> None:
        """Flush access times and close the connection."""
        await self.flush_access()
        await self._run(self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        self._generation = (self._seen,)
        self.invalidations.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._db is not None, "metadata not open"
        return self._db.execute(query, params).fetchall()

    # -- coherence across processes (mirror.storage.coherence) ---------------

    def _heed(self) -> tuple[int, int]:
        """Drop what other processes invalidated since we last looked; a mark for :meth:`_still`."""
        if self._generation[0] != self._seen:  # the hot path: one load from shared memory
            keys, self._seen = self.invalidations.since(self._seen)
            self._drop(keys)
        return self._seen, self._writes

    def _still(self, mark: tuple[int, int]) -> bool:
        """Nothing was invalidated or written since `mark`: a row read meanwhile may be kept."""
        return self._generation[0] == mark[0] and self._writes == mark[1]

    def _drop(self, keys: list[str] | None) -> None:
        """Forget invalidated keys (None: everything) from the in-process maps."""
        if keys is None or EVERYTHING in keys:
            self._tags.clear()
            self._links.clear()
            self._objects.clear()
            return
        objects: set[str] = set()
        tags_to: set[tuple[str, str]] = set()
        for key in keys:
            kind, *parts = key.split("\n")
            if kind == "tag":
                self._tags.pop(tuple(parts), None)
            elif kind == "link":
                self._links.pop(tuple(parts), None)
            elif kind == "object":
                objects.add(parts[0])
                self._objects.pop(parts[0], None)
            elif kind == "tags-to":
                tags_to.add((parts[0], parts[1]))
        if tags_to:
            for tag_key in [k for k, v in self._tags.items() if (k[0], str(v.digest)) in tags_to]:
                self._tags.pop(tag_key, None)
        if objects:
            for link_key in [k for k in self._links if k[1] in objects]:
                self._links.pop(link_key, None)

    def _publish(self, kind: str, *parts: str) -> None:
        """Tell every other process (after the SQL) to drop one key."""
        before, after = self.invalidations.publish(["\n".join((kind, *parts))])
        if before == self._seen:  # nothing of others' missed: our maps already hold the outcome
            self._seen = after

    # -- tags ---------------------------------------------------------------

    async def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        """The cached tag record, or None."""
        key = (repo, tag)
        seen = self._heed()
        record = self._tags.recall(key)
        if record is None:
            rows = await self._run(
                self._sql, "SELECT digest, media_type, fetched_at FROM tags WHERE repo=? AND tag=?", key
            )
            if not rows:
                return None
            record = TagRecord(Digest.parse(rows[0][0]), rows[0][1], rows[0][2])
            if self._still(seen):
                self._tags.remember(key, record)
        return record

    async def reload_tag(self, repo: str, tag: str) -> TagRecord | None:
        """The tag's row as stored now (another worker may have revalidated it)."""
        self._tags.pop((repo, tag), None)
        return await self.get_tag(repo, tag)

    async def put_tag(self, repo: str, tag: str, record: TagRecord) -> None:
        """Record what upstream said a tag points at, and when."""
        self._tags.remember((repo, tag), record)
        self._writes += 1
        await self._run(
            self._sql,
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
            (repo, tag, str(record.digest), record.media_type, record.fetched_at),
        )
        self._publish("tag", repo, tag)  # moved, or expired by a notification: others reread it

    async def delete_tag(self, repo: str, tag: str) -> None:
        """Forget a tag (upstream said it is gone or denied)."""
        self._tags.pop((repo, tag), None)
        self._writes += 1
        await self._run(self._sql, "DELETE FROM tags WHERE repo=? AND tag=?", (repo, tag))
        self._publish("tag", repo, tag)

    async def get_tag_list(self, repo: str) -> tuple[list[str], float] | None:
        """The last tag list upstream gave for `repo`, with its fetch time."""
        rows = await self._run(self._sql, "SELECT tags, fetched_at FROM tag_lists WHERE repo=?", (repo,))
        if not rows:
            return None
        return rows[0][0].split("\n") if rows[0][0] else [], rows[0][1]

    async def put_tag_list(self, repo: str, tags: list[str]) -> None:
        """Remember a repository's full tag list."""
        await self._run(
            self._sql, "INSERT OR REPLACE INTO tag_lists VALUES (?, ?, ?)", (repo, "\n".join(tags), time.time())
        )

    # -- links --------------------------------------------------------------

    async def is_linked(self, repo: str, digest: Digest) -> bool:
        """True when `digest` was fetched through (or confirmed in) `repo`."""
        key = (repo, str(digest))
        seen = self._heed()
        if self._links.recall(key):
            return True
        rows = await self._run(self._sql, "SELECT 1 FROM links WHERE repo=? AND digest=?", key)
        if rows and self._still(seen):
            self._links.remember(key, True)
        return bool(rows)

    async def link(self, repo: str, digest: Digest) -> None:
        """Record that `repo` holds `digest`."""
        key = (repo, str(digest))
        self._links.remember(key, True)
        # Always written: another process may have dropped the row meanwhile.
        await self._run(self._sql, "INSERT OR IGNORE INTO links VALUES (?, ?)", key)

    async def unlink(self, repo: str, digest: Digest) -> None:
        """Forget that `repo` holds `digest` (deleted upstream through this node)."""
        key = (repo, str(digest))
        self._links.pop(key, None)
        self._writes += 1
        await self._run(self._sql, "DELETE FROM links WHERE repo=? AND digest=?", key)
        self._publish("link", *key)

    async def delete_tags_to(self, repo: str, digest: Digest) -> None:
        """Forget every tag of `repo` that points at `digest`."""
        for key in [k for k, v in self._tags.items() if k[0] == repo and v.digest == digest]:
            self._tags.pop(key, None)
        self._writes += 1
        await self._run(self._sql, "DELETE FROM tags WHERE repo=? AND digest=?", (repo, str(digest)))
        self._publish("tags-to", repo, str(digest))

    async def repositories(self) -> list[str]:
        """Every repository this node holds content for, sorted."""
        rows = await self._run(self._sql, "SELECT DISTINCT repo FROM links ORDER BY repo")
        return [row[0] for row in rows]

    # -- objects ------------------------------------------------------------

    async def get_object(self, digest: Digest) -> ObjectRecord | None:
        """The recorded size and media type of a stored object."""
        key = str(digest)
        seen = self._heed()
        record = self._objects.recall(key)
        if record is None:
            rows = await self._run(self._sql, "SELECT size, media_type FROM objects WHERE digest=?", (key,))
            if not rows:
                return None
            record = ObjectRecord(rows[0][0], rows[0][1])
            if self._still(seen):
                self._objects.remember(key, record)
        return record

    async def put_object(self, digest: Digest, size: int, media_type: str | None) -> None:
        """Record a newly published object."""
        key = str(digest)
        known = self._objects.recall(key)
        self._objects.remember(key, ObjectRecord(size, media_type or (known.media_type if known else None)))
        now = time.time()
        await self._run(
            self._sql,
            "INSERT INTO objects VALUES (?, ?, ?, ?, ?, "
            "(SELECT count(*) FROM pin_objects WHERE digest=?)) ON CONFLICT(digest) DO UPDATE SET "
            "size=excluded.size, media_type=coalesce(excluded.media_type, media_type)",
            (key, size, media_type, now, now, key),
        )

    async def forget_object(self, digest: Digest) -> None:
        """Drop an object's record and links (it left the store)."""
        key = str(digest)
        self._objects.pop(key, None)
        for link_key in [k for k in self._links if k[1] == key]:
            self._links.pop(link_key, None)
        self._writes += 1
        await self._run(self._forget_sync, key)
        self._publish("object", key)

    def _forget_sync(self, key: str) -> None:
        self._sql("DELETE FROM objects WHERE digest=?", (key,))
        self._sql("DELETE FROM links WHERE digest=?", (key,))

    async def pinned(self, digest: Digest) -> bool:
        """True when at least one pin holds the object (`objects.pinned` counts the pins)."""
        rows = await self._run(self._sql, "SELECT pinned FROM objects WHERE digest=?", (str(digest),))
        return bool(rows and rows[0][0])

    def touch(self, digest: Digest) -> None:
        """Note an access in memory; written in batches by :meth:`flush_access`."""
        self._accessed[str(digest)] = time.time()

    async def flush_access(self) -> None:
        """Write the batched access times in one transaction."""
        if not self._accessed or self._db is None:
            return
        batch, self._accessed = self._accessed, {}
        await self._run(self._flush_sync, [(t, d) for d, t in batch.items()])

    def _flush_sync(self, rows: list[tuple[float, str]]) -> None:
        assert self._db is not None
        self._db.execute("BEGIN")
        try:
            self._db.executemany("UPDATE objects SET last_access=? WHERE digest=?", rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def totals(self) -> tuple[int, int]:
        """(object count, total bytes) of the store, for gauges and `du`."""
        rows = await self._run(self._sql, "SELECT count(*), coalesce(sum(size), 0) FROM objects")
        return int(rows[0][0]), int(rows[0][1])

    async def all_objects(self) -> list[tuple[str, int]]:
        """(digest, size) of every recorded object (start-up repair)."""
        return await self._run(self._sql, "SELECT digest, size FROM objects")

    # -- counters -----------------------------------------------------------

    async def counters(self) -> dict[str, float]:
        """Lifetime totals (`mirror stats`), as every process has added them."""
        return dict(await self._run(self._sql, "SELECT name, value FROM counters"))

    async def add_counters(self, deltas: dict[str, float]) -> None:
        """Add to lifetime totals in one transaction; processes add, never overwrite."""
        rows = [(name, value) for name, value in deltas.items() if value]
        if rows:
            await self.transact(lambda db: db.executemany(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", rows))

    async def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the worker thread, in one transaction.

        For the store tools' own queries (eviction order, purge, du); they keep
        the in-process maps right through the methods above.
        """
        return await self._run(self._transact_sync, fn)

    def _transact_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None, "metadata not open"
        self._db.execute("BEGIN")
        try:
            result = fn(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result
