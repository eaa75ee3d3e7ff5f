"""Coalesce concurrent identical work into one task whose result all share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """At most one running task per key; every caller awaits the same one.

    The task is shielded: a caller that goes away (a client disconnect
    cancelling its handler) never cancels the work others are waiting for.
    """

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}

    def running(self, key: Hashable) -> bool:
        """True while work for `key` is in flight."""
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        """Join the task for `key`, starting `work()` if none is running."""
        return await asyncio.shield(self.start(key, work))

    def start(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The task for `key`, `work()` started now (synchronously) if none is running.

        Await it through `asyncio.shield`, as :meth:`run` does.
        """
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda t, k=key: self._done(k, t))
        return task

    def _done(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def cancel_all(self) -> None:
        """Stop every task (shutdown)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
