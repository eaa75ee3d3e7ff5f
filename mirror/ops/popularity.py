"""Popular images: pulls counted per `repository:tag`, the top kept warm.

Every manifest GET or HEAD by tag counts as one pull of that tag (containerd
resolves a tag with a HEAD, docker with a GET). Counts live in memory, are
bounded (:data:`LIMIT` tags; when full the least pulled half is forgotten),
and are saved to `<metadata_dir>/popularity.json` at shutdown and after
each keep-fresh round, so a restart does not forget what is popular.

With worker processes (`mirror.workers`) the leader holds the node's counts;
every other worker hands its new pulls to it through a process-safe queue on
disk (`<metadata_dir>/popularity-inbox`, a `diskcache.Deque`) every
`HAND_OFF_INTERVAL` seconds and at shutdown, and the leader takes them in
before it ranks or saves. A worker killed with SIGKILL loses at most its last
interval's counts.

`mirror.prefetch.keep_fresh: N` re-resolves the N most pulled tags every
`mirror.prefetch.interval` with a HEAD upstream, as background work (see
:mod:`mirror.upstream.budget`); a tag whose digest moved has its new
manifest and blobs fetched before the tag is pointed at it, so the first pull
of a popular tag's new version is already a hit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mirror.errors import RegistryError
from mirror.upstream.budget import background

log = logging.getLogger(__name__)

LIMIT = 100_000
HAND_OFF_INTERVAL = 5.0


class Popularity:
    """Pull counts per (repository, tag)."""

    def __init__(self, path: Path | None = None, limit: int = LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._counts: dict[tuple[str, str], list[float]] = {}  # -> [pulls, last pull time]
        self._inbox: Any = None  # diskcache.Deque shared by the workers; None: a lone process
        self._forwarding = False  # a non-leader worker: counts go to the leader
        self._new: dict[tuple[str, str], list[float]] = {}  # pulls not yet handed to the leader

    def share(self, inbox: Path, leader: bool) -> None:
        """Worker processes: count node-wide through the queue at `inbox`."""
        from diskcache import Deque

        self._inbox = Deque(directory=str(inbox))
        self._forwarding = not leader

    def hand_off(self) -> None:
        """A non-leader worker: queue the pulls counted since the last hand-off (blocking)."""
        if not self._forwarding or not self._new:
            return
        batch, self._new = self._new, {}
        self._inbox.append([[repo, tag, pulls, last] for (repo, tag), (pulls, last) in batch.items()])

    def take_in(self) -> None:
        """The leader: add the other workers' queued pulls to the node's counts (blocking)."""
        if self._inbox is None or self._forwarding:
            return
        while True:
            try:
                batch = self._inbox.popleft()
            except IndexError:
                return
            for repo, tag, pulls, last in batch:
                entry = self._counts.setdefault((str(repo), str(tag)), [0, 0.0])
                entry[0] += int(pulls)
                entry[1] = max(entry[1], float(last))

    def record(self, repo: str, tag: str) -> None:
        if self._forwarding:
            pending = self._new.setdefault((repo, tag), [0, 0.0])
            pending[0] += 1
            pending[1] = time.time()
        entry = self._counts.get((repo, tag))
        if entry is None:
            if len(self._counts) >= self.limit:
                self._trim()
            self._counts[(repo, tag)] = [1, time.time()]
        else:
            entry[0] += 1
            entry[1] = time.time()

    def _trim(self) -> None:
        keep = sorted(self._counts.items(), key=lambda kv: kv[1][0], reverse=True)[: self.limit // 2]
        self._counts = dict(keep)

    def top(self, n: int) -> list[dict[str, Any]]:
        """The `n` most pulled tags, most pulled first (ties: most recent first)."""
        self.take_in()
        ranked = sorted(self._counts.items(), key=lambda kv: (kv[1][0], kv[1][1]), reverse=True)
        return [{"repository": repo, "tag": tag, "pulls": int(pulls), "last_pull": last}
                for (repo, tag), (pulls, last) in ranked[: max(n, 0)]]

    def load(self) -> None:
        if self.path is None or self._forwarding:
            return
        try:
            entries = json.loads(self.path.read_text())
            for item in entries:
                self._counts[(str(item["repository"]), str(item["tag"]))] = [
                    int(item["pulls"]), float(item.get("last_pull", 0))]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)

    def save(self) -> None:
        if self._forwarding:
            self.hand_off()  # the leader saves the node's counts
            return
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_suffix(".tmp")
            temp.write_text(json.dumps(self.top(len(self._counts))))
            os.replace(temp, self.path)
        except OSError as exc:
            log.warning("could not save %s: %s", self.path, exc)


Refresh = Callable[[str, str], Awaitable[Any]]


class KeepFresh:
    """Every `interval`, re-resolve the `count` most pulled tags (background work)."""

    def __init__(self, popularity: Popularity, count: int, interval: float, refresh: Refresh) -> None:
        self.popularity = popularity
        self.count = count
        self.interval = interval
        self.refresh = refresh
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.count > 0 and self._task is None:
            with background():
                self._task = asyncio.create_task(self._loop(), name="keep-fresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except Exception:
                log.exception("keep-fresh round failed")
            await asyncio.get_running_loop().run_in_executor(None, self.popularity.save)

    async def run_once(self) -> list[dict[str, Any]]:
        """One round: each of the top tags re-resolved, one at a time."""
        results = []
        with background():
            for entry in self.popularity.top(self.count):
                try:
                    outcome = await self.refresh(entry["repository"], entry["tag"])
                except RegistryError as exc:  # one bad tag does not end the round
                    log.warning("keep-fresh %s:%s failed: %s", entry["repository"], entry["tag"], exc)
                    outcome = {"error": str(exc)}
                except Exception as exc:
                    log.exception("keep-fresh %s:%s failed", entry["repository"], entry["tag"])
                    outcome = {"error": str(exc)}
                results.append({**entry, "outcome": outcome})
        self.rounds += 1
        return results
