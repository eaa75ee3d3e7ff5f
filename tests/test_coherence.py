"""Invalidations across processes: two Metadata over one database, as two workers.

Two `Metadata` instances on one path have separate in-process maps and
separate mappings of the invalidations file, exactly as two worker processes
do (the mapping is the page cache either way). Whole-node tests with real
worker processes are R-WK-13..15 in tests/test_workers.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.storage import coherence
from mirror.storage.coherence import Invalidations
from mirror.storage.metadata import Metadata, TagRecord
from mirror.registry.digest import Digest

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def dg(seed: str) -> Digest:
    return Digest("sha256", hashlib.sha256(seed.encode()).hexdigest())


class CountingSQL:
    """Counts one Metadata's SQL statements (a warm lookup must issue none)."""

    def __init__(self, meta: Metadata) -> None:
        self.count = 0
        original = meta._sql

        def counted(*args):  # type: ignore[no-untyped-def]
            self.count += 1
            return original(*args)

        meta._sql = counted  # type: ignore[method-assign]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Metadata, Metadata]]:
    path = tmp_path / "metadata" / "metadata.sqlite"
    a, b = Metadata(path), Metadata(path)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


async def warm(meta: Metadata, repo: str, tag: str, digest: Digest) -> None:
    assert (await meta.get_tag(repo, tag)).digest == digest
    assert await meta.get_object(digest) is not None
    assert await meta.is_linked(repo, digest)


async def stored(meta: Metadata, repo: str, tag: str, digest: Digest) -> None:
    await meta.put_object(digest, 10, DOCKER)
    await meta.link(repo, digest)
    await meta.put_tag(repo, tag, TagRecord(digest, DOCKER, 1.0e9))


async def test_a_warm_lookup_issues_no_sql_and_sees_others_deletes_at_once(pair) -> None:
    a, b = pair
    digest = dg("one")
    await stored(b, "lib/app", "v1", digest)
    await warm(a, "lib/app", "v1", digest)
    sql = CountingSQL(a)
    await warm(a, "lib/app", "v1", digest)
    assert sql.count == 0
    await b.delete_tag("lib/app", "v1")
    assert await a.get_tag("lib/app", "v1") is None
    await b.unlink("lib/app", digest)
    assert not await a.is_linked("lib/app", digest)
    await b.forget_object(digest)
    assert await a.get_object(digest) is None


async def test_forget_takes_every_cached_link_of_the_object(pair) -> None:
    a, b = pair
    digest = dg("two")
    await stored(b, "lib/app", "v1", digest)
    await b.link("lib/other", digest)
    await warm(a, "lib/app", "v1", digest)
    assert await a.is_linked("lib/other", digest)
    await b.forget_object(digest)
    assert not await a.is_linked("lib/app", digest) and not await a.is_linked("lib/other", digest)


async def test_tags_to_a_digest_and_a_moved_tag_are_heard(pair) -> None:
    a, b = pair
    old, new = dg("old"), dg("new")
    await stored(b, "lib/app", "v1", old)
    await b.put_tag("lib/app", "latest", TagRecord(old, DOCKER, 1.0e9))
    await stored(b, "lib/app", "v2", new)
    await warm(a, "lib/app", "v1", old)
    assert (await a.get_tag("lib/app", "latest")).digest == old
    assert (await a.get_tag("lib/app", "v2")).digest == new
    await b.delete_tags_to("lib/app", old)
    assert await a.get_tag("lib/app", "v1") is None and await a.get_tag("lib/app", "latest") is None
    assert (await a.get_tag("lib/app", "v2")).digest == new
    await b.put_tag("lib/app", "v2", TagRecord(old, DOCKER, 2.0e9))  # a push moved it
    assert await a.get_tag("lib/app", "v2") == TagRecord(old, DOCKER, 2.0e9)


async def test_a_writer_keeps_its_own_maps_warm(pair) -> None:
    a, _b = pair
    digest = dg("own")
    await stored(a, "lib/app", "v1", digest)
    sql = CountingSQL(a)
    await warm(a, "lib/app", "v1", digest)
    await a.put_tag("lib/app", "v1", TagRecord(digest, DOCKER, 3.0e9))
    assert (await a.get_tag("lib/app", "v1")).fetched_at == 3.0e9
    assert sql.count == 1  # the put's own statement; no reread


async def test_a_reader_lapped_by_the_ring_drops_everything(tmp_path) -> None:
    path = tmp_path / "metadata.sqlite"
    a, b = Metadata(path), Metadata(path)
    for meta in (a, b):
        meta.invalidations = Invalidations(meta.invalidations.path, slots=8)
        await meta.open()
    try:
        digest = dg("lapped")
        await stored(b, "lib/app", "v1", digest)
        await warm(a, "lib/app", "v1", digest)
        for number in range(20):
            await b.delete_tag("lib/app", f"other-{number}")
        await b.forget_object(digest)
        assert await a.get_object(digest) is None
        assert not a._tags and not a._links  # dropped whole: 21 invalidations, 8 slots
        assert a._seen == b.invalidations.generation()
    finally:
        await a.close()
        await b.close()


async def test_a_read_racing_a_delete_is_not_kept(pair) -> None:
    """A row read before another process's delete, returned after it, is served once, never cached."""
    a, b = pair
    digest = dg("race")
    await stored(b, "lib/app", "v1", digest)
    gate = asyncio.Event()
    released = asyncio.Event()
    original = a._sql

    def slow(*args):  # type: ignore[no-untyped-def]
        rows = original(*args)
        asyncio.run_coroutine_threadsafe(_signal(released), loop)
        while not gate.is_set():
            pass
        return rows

    async def _signal(event: asyncio.Event) -> None:
        event.set()

    loop = asyncio.get_running_loop()
    a._sql = slow  # type: ignore[method-assign]
    lookup = asyncio.create_task(a.get_tag("lib/app", "v1"))
    await released.wait()  # a has read the row
    a._sql = original  # type: ignore[method-assign]
    await b.delete_tag("lib/app", "v1")
    gate.set()
    assert (await lookup).digest == digest  # it was there when read
    assert await a.get_tag("lib/app", "v1") is None


def test_a_foreign_or_short_file_is_laid_out_anew(tmp_path) -> None:
    path = tmp_path / "metadata.invalidations"
    path.write_bytes(b"not ours")
    journal = Invalidations(path, slots=16)
    journal.open()
    try:
        assert journal.generation() == 0
        assert journal.publish(["tag\nlib/app\nv1"]) == (0, 1)
        assert journal.since(0) == (["tag\nlib/app\nv1"], 1)
        assert journal.publish(["x" * 1000]) == (1, 2)  # too long for a slot: "drop everything"
        assert journal.since(1) == ([coherence.EVERYTHING], 2)
    finally:
        journal.close()
