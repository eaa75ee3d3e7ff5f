"""The async SQLite metadata: tags, links, objects, batched access times, sharing."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirror.registry.digest import Digest
from mirror.storage.metadata import Metadata, ObjectRecord, TagRecord

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def dg(seed: str) -> Digest:
    return Digest("sha256", hashlib.sha256(seed.encode()).hexdigest())


def db_rows(path: Path, query: str, params: tuple = ()) -> list[tuple]:
    """Read the database directly, as another process would."""
    db = sqlite3.connect(path)
    try:
        return db.execute(query, params).fetchall()
    finally:
        db.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta" / "sub" / "metadata.db"


@pytest.fixture
async def meta(db_path: Path) -> AsyncIterator[Metadata]:
    m = Metadata(db_path)
    await m.open()
    yield m
    await m.close()


async def reopened(path: Path, **kwargs: int) -> Metadata:
    m = Metadata(path, **kwargs)
    await m.open()
    return m


# --------------------------------------------------------------------------- tags


async def test_open_creates_parent_directories(meta: Metadata, db_path: Path) -> None:
    assert db_path.exists()
    tables = {row[0] for row in db_rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"objects", "links", "tags", "tag_lists"} <= tables


async def test_tags_put_get_delete(meta: Metadata) -> None:
    assert await meta.get_tag("library/alpine", "latest") is None
    record = TagRecord(dg("m1"), DOCKER, 1000.5)
    await meta.put_tag("library/alpine", "latest", record)
    assert await meta.get_tag("library/alpine", "latest") == record
    assert await meta.get_tag("library/alpine", "3.19") is None
    assert await meta.get_tag("library/other", "latest") is None

    newer = TagRecord(dg("m2"), OCI_INDEX, 2000.0)
    await meta.put_tag("library/alpine", "latest", newer)
    assert await meta.get_tag("library/alpine", "latest") == newer

    await meta.delete_tag("library/alpine", "latest")
    assert await meta.get_tag("library/alpine", "latest") is None
    await meta.delete_tag("library/alpine", "latest")  # absent: no error


async def test_tags_are_in_the_database(meta: Metadata, db_path: Path) -> None:
    await meta.put_tag("a/b", "v1", TagRecord(dg("x"), DOCKER, 42.0))
    assert db_rows(db_path, "SELECT repo, tag, digest, media_type, fetched_at FROM tags") == [
        ("a/b", "v1", str(dg("x")), DOCKER, 42.0)]
    await meta.delete_tag("a/b", "v1")
    assert db_rows(db_path, "SELECT * FROM tags") == []


@pytest.mark.parametrize("tags", [[], ["latest"], ["1.0", "1.1", "latest"]], ids=["empty", "one", "several"])
async def test_tag_lists(meta: Metadata, tags: list[str]) -> None:
    assert await meta.get_tag_list("library/alpine") is None
    before = time.time()
    await meta.put_tag_list("library/alpine", tags)
    result = await meta.get_tag_list("library/alpine")
    assert result is not None
    assert result[0] == tags
    assert before <= result[1] <= time.time()


# --------------------------------------------------------------------------- links


async def test_links_and_repositories(meta: Metadata) -> None:
    d1, d2 = dg("1"), dg("2")
    assert await meta.repositories() == []
    assert await meta.is_linked("library/alpine", d1) is False
    await meta.link("library/alpine", d1)
    await meta.link("library/alpine", d1)  # idempotent
    await meta.link("library/alpine", d2)
    await meta.link("a/first", d2)
    assert await meta.is_linked("library/alpine", d1) is True
    assert await meta.is_linked("library/alpine", d2) is True
    assert await meta.is_linked("a/first", d1) is False
    assert await meta.repositories() == ["a/first", "library/alpine"]


# --------------------------------------------------------------------------- objects


async def test_objects_put_get(meta: Metadata) -> None:
    d = dg("obj")
    assert await meta.get_object(d) is None
    await meta.put_object(d, 123, DOCKER)
    assert await meta.get_object(d) == ObjectRecord(123, DOCKER)
    await meta.put_object(dg("blob"), 5, None)
    assert await meta.get_object(dg("blob")) == ObjectRecord(5, None)
    assert sorted(await meta.all_objects()) == sorted([(str(d), 123), (str(dg("blob")), 5)])


async def test_put_object_updates_size(meta: Metadata, db_path: Path) -> None:
    d = dg("obj")
    await meta.put_object(d, 1, None)
    await meta.put_object(d, 2, None)
    assert await meta.get_object(d) == ObjectRecord(2, None)
    assert db_rows(db_path, "SELECT size FROM objects WHERE digest=?", (str(d),)) == [(2,)]


async def test_put_object_without_media_type_keeps_known_type(meta: Metadata, db_path: Path) -> None:
    d = dg("manifest fetched as a blob too")
    await meta.put_object(d, 10, DOCKER)
    await meta.put_object(d, 10, None)  # e.g. the same digest committed by the blob fetcher
    assert db_rows(db_path, "SELECT media_type FROM objects WHERE digest=?", (str(d),)) == [(DOCKER,)]
    assert await meta.get_object(d) == ObjectRecord(10, DOCKER)


async def test_forget_object_removes_record_and_links(meta: Metadata, db_path: Path) -> None:
    d, other = dg("gone"), dg("kept")
    await meta.put_object(d, 10, None)
    await meta.put_object(other, 20, None)
    await meta.link("r/one", d)
    await meta.link("r/two", d)
    await meta.link("r/two", other)
    assert await meta.is_linked("r/one", d)

    await meta.forget_object(d)
    assert await meta.get_object(d) is None
    assert await meta.is_linked("r/one", d) is False
    assert await meta.is_linked("r/two", d) is False
    assert await meta.is_linked("r/two", other) is True
    assert await meta.get_object(other) == ObjectRecord(20, None)
    assert await meta.repositories() == ["r/two"]
    assert db_rows(db_path, "SELECT repo, digest FROM links") == [("r/two", str(other))]
    # Linking again after a forget reaches the database.
    await meta.link("r/one", d)
    assert db_rows(db_path, "SELECT repo FROM links WHERE digest=?", (str(d),)) == [("r/one",)]


# --------------------------------------------------------------------------- access times


async def test_touch_is_batched_until_flush(meta: Metadata, db_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    d, untouched = dg("hot"), dg("cold")
    await meta.put_object(d, 1, None)
    await meta.put_object(untouched, 1, None)
    created = dict(db_rows(db_path, "SELECT digest, last_access FROM objects"))

    monkeypatch.setattr(time, "time", lambda: created[str(d)] + 1000.0)
    meta.touch(d)
    meta.touch(dg("never stored"))  # flushing an unknown digest is harmless
    monkeypatch.undo()

    assert dict(db_rows(db_path, "SELECT digest, last_access FROM objects")) == created
    await meta.flush_access()
    after = dict(db_rows(db_path, "SELECT digest, last_access FROM objects"))
    assert after[str(d)] == created[str(d)] + 1000.0
    assert after[str(untouched)] == created[str(untouched)]
    assert db_rows(db_path, "SELECT created FROM objects WHERE digest=?", (str(d),))[0][0] == created[str(d)]

    await meta.flush_access()  # nothing pending: no-op
    assert dict(db_rows(db_path, "SELECT digest, last_access FROM objects")) == after


async def test_latest_touch_wins(meta: Metadata, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = dg("x")
    await meta.put_object(d, 1, None)
    for t in (5000.0, 7000.0, 6000.0):
        monkeypatch.setattr(time, "time", lambda t=t: t)
        meta.touch(d)
    monkeypatch.undo()
    await meta.flush_access()
    assert db_rows(db_path, "SELECT last_access FROM objects") == [(6000.0,)]


async def test_close_flushes_access(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = await reopened(db_path)
    d = dg("x")
    await m.put_object(d, 1, None)
    monkeypatch.setattr(time, "time", lambda: 12345.0)
    m.touch(d)
    monkeypatch.undo()
    await m.close()
    assert db_rows(db_path, "SELECT last_access FROM objects") == [(12345.0,)]


# --------------------------------------------------------------------------- restart and sharing


async def test_reopen_keeps_data(db_path: Path) -> None:
    m = await reopened(db_path)
    d = dg("persist")
    await m.put_tag("lib/a", "latest", TagRecord(d, DOCKER, 1.0))
    await m.put_tag_list("lib/a", ["latest"])
    await m.put_object(d, 99, DOCKER)
    await m.link("lib/a", d)
    await m.close()

    m2 = await reopened(db_path)
    try:
        assert await m2.get_tag("lib/a", "latest") == TagRecord(d, DOCKER, 1.0)
        assert (await m2.get_tag_list("lib/a") or ([], 0))[0] == ["latest"]
        assert await m2.get_object(d) == ObjectRecord(99, DOCKER)
        assert await m2.is_linked("lib/a", d)
        assert await m2.repositories() == ["lib/a"]
    finally:
        await m2.close()


async def test_two_instances_see_each_others_writes(db_path: Path) -> None:
    a = await reopened(db_path)
    b = await reopened(db_path)
    try:
        d1, d2 = dg("from a"), dg("from b")
        await a.put_tag("r", "t", TagRecord(d1, DOCKER, 3.0))
        await a.put_object(d1, 10, DOCKER)
        await a.link("r", d1)
        assert await b.get_tag("r", "t") == TagRecord(d1, DOCKER, 3.0)
        assert await b.get_object(d1) == ObjectRecord(10, DOCKER)
        assert await b.is_linked("r", d1)

        await b.put_object(d2, 20, None)
        await b.link("s", d2)
        assert await a.get_object(d2) == ObjectRecord(20, None)
        assert await a.is_linked("s", d2)
        assert await a.repositories() == ["r", "s"]

        await b.forget_object(d2)
        # `a` remembered d2 in memory; a fresh instance reads the truth.
        c = await reopened(db_path)
        try:
            assert await c.get_object(d2) is None
            assert await c.is_linked("s", d2) is False
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


async def test_bounded_memory_falls_back_to_database(db_path: Path) -> None:
    m = await reopened(db_path, memory_entries=2)
    try:
        digests = [dg(str(i)) for i in range(10)]
        for i, d in enumerate(digests):
            await m.put_object(d, i, None)
            await m.put_tag("r", f"t{i}", TagRecord(d, DOCKER, float(i)))
            await m.link("r", d)
        assert len(m._objects) <= 2 and len(m._tags) <= 2 and len(m._links) <= 2
        for i, d in enumerate(digests):
            assert await m.get_object(d) == ObjectRecord(i, None)
            assert await m.get_tag("r", f"t{i}") == TagRecord(d, DOCKER, float(i))
            assert await m.is_linked("r", d)
    finally:
        await m.close()


async def test_link_after_other_instance_forgot_reaches_database(db_path: Path) -> None:
    a = await reopened(db_path)
    b = await reopened(db_path)
    try:
        d = dg("quarantined by b, refetched by a")
        await a.put_object(d, 1, None)
        await a.link("r", d)
        await b.forget_object(d)  # another process drops the object and its links
        await a.put_object(d, 1, None)  # `a` fetches it again...
        await a.link("r", d)  # ...and records the link
        assert db_rows(db_path, "SELECT repo FROM links WHERE digest=?", (str(d),)) == [("r",)]
    finally:
        await a.close()
        await b.close()
