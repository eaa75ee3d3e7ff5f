"""Shared fixtures: the real upstream (CNCF distribution), a counting relay, the node."""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from mirror.api.server import MirrorRunner
from mirror.app import create_app
from mirror.config import Settings, load_settings
from mirror.node import Node
from mirror.web.keys import NODE
from tests.support.clock import WallClock
from tests.support.registry import Registry, run_registry
from tests.support.relay import Relay


@pytest.fixture(autouse=True)
def _collect_garbage_at_teardown() -> Iterator[None]:
    """Run finalizers at a safe point, between tests.

    A ResourceWarning (made an error by filterwarnings) raised by the garbage
    collector in the middle of an import trips CPython 3.11.7's "AST
    constructor recursion depth mismatch" (gh-106905).
    """
    yield
    gc.collect()


@pytest.fixture(scope="session")
def session_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mirror-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real distribution 2.8 registry on loopback, shared by a test module."""
    with run_registry(tmp_path_factory.mktemp("upstream")) as registry:
        yield registry


@pytest.fixture
def own_upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own, for tests that stop or restart it."""
    with run_registry(tmp_path / "own-upstream") as registry:
        yield registry


@pytest.fixture
def relay(upstream: Registry) -> Iterator[Relay]:
    """A counting, shapeable link between the node and the upstream."""
    with Relay(upstream.url) as link:
        yield link


class MirrorNode:
    """A mirror node served in-process on a loopback port."""

    def __init__(self, config: dict[str, Any], config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path, {})

    @property
    def node(self) -> Node:
        assert self.runner is not None
        return self.runner.app[NODE]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> MirrorNode:
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.runner = MirrorRunner(create_app(self.settings), handler_cancellation=True)  # as `mirror serve`
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def restart(self) -> MirrorNode:
        await self.stop()
        return await self.start()

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=60, **kwargs)


def mirror_config(root: Path, remote_url: str, **mirror: Any) -> dict[str, Any]:
    """A distribution config.yml (as a dict) for a node in front of `remote_url`."""
    return {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(root / "store")}},
        "http": {"addr": "127.0.0.1:0"},
        "proxy": {"remoteurl": remote_url},
        "mirror": {"negative_ttl": "0s", **mirror},
    }


@pytest.fixture
async def make_mirror(tmp_path: Path) -> AsyncIterator[Any]:
    """Factory: `await make_mirror(remote_url, **mirror_settings)` -> a started node."""
    nodes: list[MirrorNode] = []

    async def make(remote_url: str, config: dict[str, Any] | None = None, **mirror: Any) -> MirrorNode:
        root = tmp_path / f"node{len(nodes)}"
        root.mkdir()
        node = MirrorNode(config or mirror_config(root, remote_url, **mirror), root / "config.yml")
        nodes.append(node)
        return await node.start()

    yield make
    for node in nodes:
        await node.stop()


@pytest.fixture
async def mirror(make_mirror: Any, relay: Relay) -> MirrorNode:
    """A node in front of the shared upstream, through the counting relay."""
    node: MirrorNode = await make_mirror(relay.url)
    return node


@pytest.fixture
async def upstream_client(upstream: Registry) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as client:
        yield client


@pytest.fixture
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    """``time.time`` for this test's in-process nodes, moved on with ``advance``.

    Ask for it before ``make_mirror`` so the nodes stop under the same clock.
    """
    clock = WallClock(time.time)
    monkeypatch.setattr(time, "time", clock)
    return clock
