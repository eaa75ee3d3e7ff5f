"""The cold path: a client's last bytes go out once the digest verified, not after the fsync."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid

import pytest

from mirror.registry.digest import Digest
from mirror.storage import blobstore
from tests.support import images

MiB = 1024 * 1024


async def test_client_gets_the_verified_tail_before_the_object_is_fsynced(make_mirror, relay, upstream,
                                                                          upstream_client,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """While the publish's fsync is held, a cold client still receives the whole verified blob."""
    node = await make_mirror(relay.url)
    repo = f"cold/app-{uuid.uuid4().hex[:8]}"
    data = os.urandom(3 * MiB)
    digest = await images.push_blob(upstream_client, upstream.url, repo, data)
    release = threading.Event()
    held: list[int] = []
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:  # the object's fsync (the store's other fsyncs are not on this path)
        held.append(fd)
        release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(blobstore.os, "fsync", held_fsync)
    try:
        async with node.client() as client:
            response = await asyncio.wait_for(client.get(f"/v2/{repo}/blobs/{digest}"), 25)
        assert held and not release.is_set()  # the publish is still waiting on its fsync
        assert response.status_code == 200 and response.content == data
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest
    finally:
        release.set()
    for _ in range(200):  # published once the fsync returns
        if node.node.store.size(Digest.parse(digest)) == len(data):
            break
        await asyncio.sleep(0.05)
    assert node.node.store.size(Digest.parse(digest)) == len(data)
