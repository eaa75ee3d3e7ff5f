"""Metadata: tags, repository links, object sizes and access times, in SQLite.

SQLite is on local disk only (it is unsafe on NFS even when the object store
is not), one connection per process, used from one dedicated worker thread so
the event loop never blocks on it. Hot reads are answered from small
in-process maps that mirror what this process wrote or read; they are an
optimisation only, the database stays the truth shared between processes.
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

    async def close(self) -> None:
        """Flush access times and close the connection."""
        await self.flush_access()
        await self._run(self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._db is not None, "metadata not open"
        return self._db.execute(query, params).fetchall()

    # -- tags ---------------------------------------------------------------

    async def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        """The cached tag record, or None."""
        key = (repo, tag)
        record = self._tags.recall(key)
        if record is None:
            rows = await self._run(
                self._sql, "SELECT digest, media_type, fetched_at FROM tags WHERE repo=? AND tag=?", key
            )
            if not rows:
                return None
            record = TagRecord(Digest.parse(rows[0][0]), rows[0][1], rows[0][2])
            self._tags.remember(key, record)
        return record

    async def reload_tag(self, repo: str, tag: str) -> TagRecord | None:
        """The tag's row as stored now (another worker may have revalidated it)."""
        self._tags.pop((repo, tag), None)
        return await self.get_tag(repo, tag)

    async def put_tag(self, repo: str, tag: str, record: TagRecord) -> None:
        """Record what upstream said a tag points at, and when."""
        self._tags.remember((repo, tag), record)
        await self._run(
            self._sql,
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
            (repo, tag, str(record.digest), record.media_type, record.fetched_at),
        )

    async def delete_tag(self, repo: str, tag: str) -> None:
        """Forget a tag (upstream said it is gone or denied)."""
        self._tags.pop((repo, tag), None)
        await self._run(self._sql, "DELETE FROM tags WHERE repo=? AND tag=?", (repo, tag))

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
        if self._links.recall(key):
            return True
        rows = await self._run(self._sql, "SELECT 1 FROM links WHERE repo=? AND digest=?", key)
        if rows:
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
        await self._run(self._sql, "DELETE FROM links WHERE repo=? AND digest=?", key)

    async def delete_tags_to(self, repo: str, digest: Digest) -> None:
        """Forget every tag of `repo` that points at `digest`."""
        for key in [k for k, v in self._tags.items() if k[0] == repo and v.digest == digest]:
            self._tags.pop(key, None)
        await self._run(self._sql, "DELETE FROM tags WHERE repo=? AND digest=?", (repo, str(digest)))

    async def repositories(self) -> list[str]:
        """Every repository this node holds content for, sorted."""
        rows = await self._run(self._sql, "SELECT DISTINCT repo FROM links ORDER BY repo")
        return [row[0] for row in rows]

    # -- objects ------------------------------------------------------------

    async def get_object(self, digest: Digest) -> ObjectRecord | None:
        """The recorded size and media type of a stored object."""
        key = str(digest)
        record = self._objects.recall(key)
        if record is None:
            rows = await self._run(self._sql, "SELECT size, media_type FROM objects WHERE digest=?", (key,))
            if not rows:
                return None
            record = ObjectRecord(rows[0][0], rows[0][1])
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
        await self._run(self._forget_sync, key)

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
