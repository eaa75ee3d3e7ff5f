"""The content-addressed object store: verified, atomic, shareable between processes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.registry.digest import Digest
from mirror.storage import blobstore as blobstore_module
from mirror.storage.blobstore import (
    LAYOUT_VERSION,
    BlobStore,
    DigestMismatch,
    StoreLayoutError,
    path_for,
)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def temp_parts(root: Path) -> list[Path]:
    return sorted((root / "tmp").glob("*.part"))


def objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlobStore]:
    s = BlobStore(tmp_path / "store")
    s.open()
    yield s
    s.close()


# --------------------------------------------------------------------------- write, commit, read


@pytest.mark.parametrize(
    ("data", "algorithm", "chunk"),
    [(b"", "sha256", 1), (b"hello world", "sha256", 3), (os.urandom(300_000), "sha256", 65_536),
     (b"x" * 1000, "sha512", 7)],
    ids=["empty", "small-chunked", "300k", "sha512"],
)
def test_write_commit_read(store: BlobStore, data: bytes, algorithm: str, chunk: int) -> None:
    digest = digest_of(data, algorithm)
    assert store.size(digest) is None
    assert store.read(digest) is None
    writer = store.writer(digest, len(data))
    assert writer.temp_path.exists()
    for part in chunks(data, chunk):
        writer.write(part)
    assert writer.written == len(data)
    final = writer.commit()
    assert final == store.path(digest) == path_for(store.root, "object", digest)
    assert final == store.root / "objects" / algorithm / digest.hex[:2] / digest.hex
    assert final.read_bytes() == data
    assert not writer.temp_path.exists()
    assert temp_parts(store.root) == []
    assert store.size(digest) == len(data)
    assert store.read(digest) == data
    assert store.read(digest, len(data)) == data
    assert list(store.iter_objects()) == [(digest, len(data))]


def test_write_without_expected_size(store: BlobStore) -> None:
    data = b"unknown length"
    writer = store.writer(digest_of(data), None)
    writer.write(data[:5])
    writer.write(data[5:])
    writer.commit()
    assert store.read(digest_of(data)) == data


def test_put_bytes(store: BlobStore) -> None:
    data = b'{"schemaVersion": 2}'
    digest = digest_of(data)
    store.put_bytes(digest, data)
    assert store.read(digest) == data


def test_put_bytes_is_idempotent(store: BlobStore) -> None:
    data = b"same"
    digest = digest_of(data)
    store.put_bytes(digest, data)
    store.put_bytes(digest, data)
    assert store.read(digest) == data
    assert len(objects(store.root)) == 1


def test_open_object_returns_fd_and_size(store: BlobStore) -> None:
    data = b"0123456789"
    digest = digest_of(data)
    store.put_bytes(digest, data)
    opened = store.open_object(digest, len(data))
    assert opened is not None
    fd, size = opened
    try:
        assert size == 10
        assert os.pread(fd, 4, 3) == b"3456"
    finally:
        os.close(fd)
    opened = store.open_object(digest, None)
    assert opened is not None
    os.close(opened[0])


def test_absent_objects(store: BlobStore) -> None:
    digest = digest_of(b"absent")
    assert store.open_object(digest, 5) is None
    assert store.read(digest) is None
    assert store.size(digest) is None
    assert store.delete(digest) == 0
    assert store.quarantine(digest) is False


def test_delete(store: BlobStore) -> None:
    data = b"to be deleted"
    digest = digest_of(data)
    store.put_bytes(digest, data)
    assert store.delete(digest) == len(data)
    assert store.size(digest) is None
    assert store.delete(digest) == 0


# --------------------------------------------------------------------------- verification


def test_digest_mismatch_publishes_nothing(store: BlobStore) -> None:
    digest = digest_of(b"expected content")
    writer = store.writer(digest, len(b"expected content"))
    writer.write(b"tampered content")
    with pytest.raises(DigestMismatch):
        writer.commit()
    assert store.size(digest) is None
    assert objects(store.root) == []
    assert not writer.temp_path.exists()
    assert temp_parts(store.root) == []


@pytest.mark.parametrize(
    ("written", "expected_size"),
    [(b"short", 10), (b"", 1), (b"exactly-too-long", 5), (b"one-more", 7)],
    ids=["fewer", "nothing-written", "more", "one-more"],
)
def test_size_mismatch_publishes_nothing(store: BlobStore, written: bytes, expected_size: int) -> None:
    # The digest even matches the bytes written: only the size is wrong.
    digest = digest_of(written)
    writer = store.writer(digest, expected_size)
    with pytest.raises(DigestMismatch):
        writer.write(written)
        writer.commit()
    writer.abort()
    writer.abort()  # safe twice
    assert store.size(digest) is None
    assert objects(store.root) == []
    assert temp_parts(store.root) == []


def test_overlong_write_is_refused_before_it_reaches_disk(store: BlobStore) -> None:
    writer = store.writer(digest_of(b"abc"), 3)
    writer.write(b"ab")
    with pytest.raises(DigestMismatch):
        writer.write(b"cd")
    assert writer.written == 2
    assert writer.temp_path.read_bytes() == b"ab"
    writer.abort()
    assert not writer.temp_path.exists()


def test_abort_drops_temp(store: BlobStore) -> None:
    writer = store.writer(digest_of(b"data"), 4)
    writer.write(b"da")
    writer.abort()
    assert not writer.temp_path.exists()
    assert objects(store.root) == []


def test_temp_names_are_unique(store: BlobStore) -> None:
    names = {store.new_temp_path() for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.parent == store.root / "tmp"
        assert name.name.startswith(f"{store.owner}-")
        assert name.suffix == ".part"


def test_wrong_expected_size_quarantines(store: BlobStore) -> None:
    data = b"recorded with another size"
    digest = digest_of(data)
    store.put_bytes(digest, data)
    assert store.open_object(digest, len(data) + 1) is None
    assert store.size(digest) is None
    assert objects(store.root) == []
    quarantined = list((store.root / "quarantine").iterdir())
    assert len(quarantined) == 1
    assert quarantined[0].name.startswith(f"{digest.algorithm}-{digest.hex}.")
    assert quarantined[0].read_bytes() == data
    # Reported absent from then on, and can be fetched and stored again.
    assert store.read(digest) is None
    store.put_bytes(digest, data)
    assert store.read(digest, len(data)) == data


def test_read_with_wrong_expected_size_quarantines(store: BlobStore) -> None:
    data = b"abc"
    digest = digest_of(data)
    store.put_bytes(digest, data)
    assert store.read(digest, 2) is None
    assert store.size(digest) is None


def test_explicit_quarantine(store: BlobStore) -> None:
    data = b"bit rot"
    digest = digest_of(data)
    store.put_bytes(digest, data)
    assert store.quarantine(digest) is True
    assert store.read(digest) is None


# --------------------------------------------------------------------------- layout


def test_layout_file_written(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    s.open()
    try:
        layout = tmp_path / "mirror-store.json"
        assert layout == path_for(tmp_path, "layout")
        assert json.loads(layout.read_text()) == {"layout": LAYOUT_VERSION}
        for sub in ("objects", "tmp", "quarantine"):
            assert (tmp_path / sub).is_dir()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    finally:
        s.close()
    # Reopening a store of the same layout works and keeps its objects.
    s2 = BlobStore(tmp_path)
    s2.open()
    s2.put_bytes(digest_of(b"kept"), b"kept")
    s2.close()
    s3 = BlobStore(tmp_path)
    s3.open()
    assert s3.read(digest_of(b"kept")) == b"kept"
    s3.close()


@pytest.mark.parametrize("version", [0, 2, "1", None], ids=["older", "newer", "string", "missing"])
def test_incompatible_layout_refused(tmp_path: Path, version: object) -> None:
    content = {"layout": version} if version is not None else {}
    (tmp_path / "mirror-store.json").write_text(json.dumps(content))
    with pytest.raises(StoreLayoutError):
        BlobStore(tmp_path).open()


def test_path_for_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        path_for(tmp_path, "bogus")


# --------------------------------------------------------------------------- owner locks and sweep


def test_lock_file_held_and_removed_on_close(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    s.open()
    lock = tmp_path / "tmp" / f"{s.owner}.lock"
    assert lock.exists()
    assert BlobStore._is_locked(lock)
    s.close()
    assert not lock.exists()
    s.close()  # idempotent


def test_dead_owner_temp_is_swept(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir(parents=True)
    dead = "999999-deadbeef0000"
    (tmp_path / "tmp" / f"{dead}.lock").touch()  # a lock file nobody holds
    part = tmp_path / "tmp" / f"{dead}-0123456789abcdef.part"
    part.write_bytes(b"half a layer")
    orphan = tmp_path / "tmp" / "888888-cafe00000000-0011223344556677.part"  # no lock file at all
    orphan.write_bytes(b"x")
    s = BlobStore(tmp_path)
    s.open()
    try:
        assert not part.exists()
        assert not orphan.exists()
        assert not (tmp_path / "tmp" / f"{dead}.lock").exists()
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [f"{s.owner}.lock"]
    finally:
        s.close()


def test_sweep_returns_count(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    s.open()
    try:
        for i in range(3):
            (tmp_path / "tmp" / f"1-dead-{i:016x}.part").write_bytes(b"x")
        assert s.sweep_temp() == 3
        assert s.sweep_temp() == 0
    finally:
        s.close()


def test_live_owner_temp_is_not_swept(tmp_path: Path) -> None:
    a = BlobStore(tmp_path)
    a.open()
    data = os.urandom(10_000)
    digest = digest_of(data)
    writer = a.writer(digest, len(data))
    writer.write(data[:5000])
    b = BlobStore(tmp_path)
    b.open()  # sweeps, but `a` holds its lock
    try:
        assert writer.temp_path.exists()
        assert (tmp_path / "tmp" / f"{a.owner}.lock").exists()
        assert b.sweep_temp() == 0
        writer.write(data[5000:])
        writer.commit()
        assert b.read(digest, len(data)) == data
    finally:
        b.close()
        a.close()


def test_closed_owner_temp_is_swept(tmp_path: Path) -> None:
    a = BlobStore(tmp_path)
    a.open()
    writer = a.writer(digest_of(b"abandoned"), 9)
    writer.write(b"aban")
    a.close()
    b = BlobStore(tmp_path)
    b.open()
    try:
        assert not writer.temp_path.exists()
    finally:
        b.close()


def _close_quietly(store: BlobStore) -> None:
    """Close a store even when its lock file was (wrongly) removed by someone else."""
    try:
        store.close()
    except FileNotFoundError:
        if store._lock_fd is not None:
            os.close(store._lock_fd)
            store._lock_fd = None


def _flock_racing(monkeypatch: pytest.MonkeyPatch, lock_name: str, before: object) -> None:
    """Run `before()` just before the first flock of the lock file called `lock_name`."""
    real_flock = fcntl.flock
    state = {"raced": False}

    def flock(fd: int, operation: int) -> None:
        if not state["raced"] and os.readlink(f"/proc/self/fd/{fd}").endswith(lock_name):
            state["raced"] = True
            before()  # type: ignore[operator]
        return real_flock(fd, operation)

    monkeypatch.setattr(blobstore_module.fcntl, "flock", flock)


def test_starting_owner_survives_concurrent_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = BlobStore(tmp_path)
    a.open()
    b = BlobStore(tmp_path)
    _flock_racing(monkeypatch, f"{b.owner}.lock", a.sweep_temp)
    b.open()  # `a` sweeps while `b` has created, but not yet locked, its lock file
    monkeypatch.undo()
    data = b"a layer being written by b"
    digest = digest_of(data)
    writer = b.writer(digest, len(data))
    writer.write(data[:5])
    c = BlobStore(tmp_path)
    c.open()  # a third process starts and sweeps
    try:
        assert writer.temp_path.exists(), "the live owner's temp file was swept"
        writer.write(data[5:])
        writer.commit()
        assert c.read(digest) == data
    finally:
        writer.abort()
        for s in (c, b, a):
            _close_quietly(s)


def test_open_survives_concurrent_lock_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = BlobStore(tmp_path)
    lock_path = tmp_path / "tmp" / f"{b.owner}.lock"

    def probe() -> None:
        # What another process's `_is_locked` does: take the free lock for an instant.
        fd = os.open(lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        threading.Timer(0.05, os.close, (fd,)).start()

    _flock_racing(monkeypatch, f"{b.owner}.lock", probe)
    try:
        b.open()
    finally:
        _close_quietly(b)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_writers_same_digest_threads(store: BlobStore) -> None:
    data = os.urandom(512 * 1024)
    digest = digest_of(data)
    writers = 6
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            writer = store.writer(digest, len(data))
            barrier.wait()
            for part in chunks(data, 32 * 1024):
                writer.write(part)
            writer.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []
    assert store.read(digest, len(data)) == data
    assert objects(store.root) == [store.path(digest)]
    assert temp_parts(store.root) == []


def test_concurrent_good_and_bad_writers_threads(store: BlobStore) -> None:
    data = os.urandom(200_000)
    digest = digest_of(data)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def write(label: str, payload: bytes) -> None:
        writer = store.writer(digest, len(payload))
        barrier.wait()
        try:
            for part in chunks(payload, 10_000):
                writer.write(part)
            writer.commit()
            results[label] = "ok"
        except DigestMismatch as exc:
            results[label] = exc

    bad = bytearray(data)
    bad[-1] ^= 0xFF
    threads = [threading.Thread(target=write, args=("good", data)),
               threading.Thread(target=write, args=("bad", bytes(bad)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results["good"] == "ok"
    assert isinstance(results["bad"], DigestMismatch)
    assert store.read(digest, len(data)) == data
    assert temp_parts(store.root) == []


def _child_writer(root: str, shared: bytes, own: bytes, ready: object, go: object) -> None:
    """Runs in another process: open the same store, then write two objects."""
    store = BlobStore(Path(root))
    store.open()  # sweeps while the parent's temp file is in progress
    ready.set()  # type: ignore[attr-defined]
    go.wait(10)  # type: ignore[attr-defined]
    try:
        for data in (shared, own):
            writer = store.writer(digest_of(data), len(data))
            for part in chunks(data, 16 * 1024):
                writer.write(part)
            writer.commit()
    finally:
        store.close()


def test_second_process_writes_concurrently(tmp_path: Path) -> None:
    shared = os.urandom(1_000_000)
    own_parent = os.urandom(700_000)
    own_child = os.urandom(600_000)
    parent = BlobStore(tmp_path)
    parent.open()
    try:
        in_progress = parent.writer(digest_of(own_parent), len(own_parent))
        in_progress.write(own_parent[:100_000])

        ctx = multiprocessing.get_context("spawn")
        ready, go = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_child_writer, args=(str(tmp_path), shared, own_child, ready, go))
        child.start()
        assert ready.wait(15), "child did not open the store"
        assert in_progress.temp_path.exists(), "the child's sweep removed a live owner's temp file"
        go.set()
        shared_writer = parent.writer(digest_of(shared), len(shared))
        for part in chunks(shared, 16 * 1024):
            shared_writer.write(part)
        shared_writer.commit()
        for part in chunks(own_parent[100_000:], 16 * 1024):
            in_progress.write(part)
        in_progress.commit()
        child.join(20)
        assert child.exitcode == 0

        for data in (shared, own_parent, own_child):
            assert parent.read(digest_of(data), len(data)) == data
        assert {d for d, _ in parent.iter_objects()} == {digest_of(d) for d in (shared, own_parent, own_child)}
        assert temp_parts(tmp_path) == []
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [f"{parent.owner}.lock"]
    finally:
        parent.close()


# --------------------------------------------------------------------------- paths


@given(st.one_of(st.binary(min_size=32, max_size=32).map(lambda b: f"sha256:{b.hex()}"),
                st.binary(min_size=64, max_size=64).map(lambda b: f"sha512:{b.hex()}")))
def test_path_for_never_escapes_root(value: str) -> None:
    root = Path("/srv/mirror/store")
    digest = Digest.parse(value)
    for kind in ("object", "quarantine"):
        path = path_for(root, kind, digest)
        resolved = Path(os.path.normpath(path))
        assert resolved == path
        assert resolved.is_relative_to(root)
        assert ".." not in path.parts
    assert path_for(root, "object", digest).relative_to(root).parts == (
        "objects", digest.algorithm, digest.hex[:2], digest.hex)
