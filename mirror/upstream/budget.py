"""A budget for the upstream link: how many requests at once, how many bytes a second.

`mirror.upstream.max_concurrency` caps simultaneous upstream exchanges (a
request holds its slot from sending until its response body is read or
closed); `mirror.upstream.max_bandwidth` caps response bytes per second with
one token bucket shared by every request. Both are enforced in one place, an
httpx transport wrapper (:class:`BudgetTransport`) that `Upstream` installs
when either is set, so every upstream call (manifests, HEADs, blob streams,
token-free or not) is counted.

On-demand work always goes first. Background work (prewarm, keep-fresh,
notification prefetch) runs under :func:`background`, a context variable
that tasks inherit, and:

* waits behind every on-demand request queued for a slot;
* may hold at most `max_concurrency - 1` slots for blob downloads, so an
  on-demand request never waits for a long background download to end
  (with `max_concurrency: 1` they share the one slot, on-demand first);
* reads blob bytes only when no on-demand stream wants the bandwidth (it
  yields at every chunk, so a client pull takes the link at once).

A background blob download that a client joins is promoted
(:func:`promote`): its remaining bytes go at on-demand priority.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import httpx

BURST_SECONDS = 0.05  # the bucket holds this much of a second's bytes...
MIN_BURST = 64 * 1024  # ...and at least one read's worth


@dataclass(slots=True)
class Work:
    """The priority of one piece of work; mutable so a joined fetch can be promoted."""

    background: bool = False


FOREGROUND = Work(False)
WORK: contextvars.ContextVar[Work] = contextvars.ContextVar("mirror_upstream_work", default=FOREGROUND)


def is_background() -> bool:
    """True when the current task does background work."""
    return WORK.get().background


@contextmanager
def background() -> Iterator[Work]:
    """Run the enclosed code (and the tasks it starts) as background work."""
    work = Work(True)
    token = WORK.set(work)
    try:
        yield work
    finally:
        WORK.reset(token)


def context_for_task() -> tuple[Work, contextvars.Context]:
    """A context for a task started on behalf of the current one, with its own Work.

    The task (a blob fetch) gets a Work object of its own, so that promoting
    it when a client joins changes that task alone.
    """
    work = Work(is_background())
    context = contextvars.copy_context()
    context.run(WORK.set, work)
    return work, context


def promote(work: Work | None) -> None:
    """Raise `work` to on-demand priority when the caller is on-demand."""
    if work is not None and work.background and not is_background():
        work.background = False


class _Slots:
    """A counting semaphore that serves on-demand waiters first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.background_heavy = 0
        self.peak = 0
        self._waiters: deque[tuple[Work, bool, asyncio.Future[bool]]] = deque()

    def _fits(self, work: Work, heavy: bool) -> bool:
        if self.in_use >= self.limit:
            return False
        reserve = self.limit > 1 and work.background and heavy
        return not (reserve and self.background_heavy >= self.limit - 1)

    def _take(self, work: Work, heavy: bool) -> bool:
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)
        counted = work.background and heavy
        if counted:
            self.background_heavy += 1
        return counted

    async def acquire(self, work: Work, heavy: bool) -> bool:
        """Wait for a slot; True when it counts against the background reserve."""
        queued_ahead = any(not w.background or work.background for w, _, _ in self._waiters)
        if not queued_ahead and self._fits(work, heavy):
            return self._take(work, heavy)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (work, heavy, future)
        self._waiters.append(entry)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            else:
                self._waiters.remove(entry)
            raise

    def release(self, counted: bool) -> None:
        self.in_use -= 1
        if counted:
            self.background_heavy -= 1
        self._wake()

    def _wake(self) -> None:
        for want_background in (False, True):
            for entry in list(self._waiters):
                work, heavy, future = entry
                if work.background != want_background:
                    continue
                if future.done():
                    self._waiters.remove(entry)
                    continue
                if not self._fits(work, heavy):
                    if not work.background:
                        return  # strict order among on-demand waiters
                    continue
                self._waiters.remove(entry)
                future.set_result(self._take(work, heavy))


class _Bucket:
    """A token bucket; background readers take only what on-demand ones leave.

    On-demand readers take their bytes at once and, when that puts the
    bucket in debt, sleep it off; background readers wait until the bucket
    holds their chunk and no on-demand debt (plus a short grace) is pending.
    """

    GRACE = 0.02  # seconds background keeps off after on-demand bytes went into debt

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.burst = max(MIN_BURST, self.rate * BURST_SECONDS)
        self.tokens = self.burst
        self.last = time.monotonic()
        self.foreground_until = 0.0

    def _refill(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return now

    async def consume(self, n: int, work: Work) -> None:
        need = min(n, self.burst)
        while work.background:
            now = self._refill()
            if now < self.foreground_until:
                await asyncio.sleep(self.foreground_until - now)
            elif self.tokens >= need:
                self.tokens -= n
                return
            else:
                await asyncio.sleep((need - self.tokens) / self.rate)
        now = self._refill()
        self.tokens -= n
        if self.tokens < 0:
            delay = -self.tokens / self.rate
            self.foreground_until = max(self.foreground_until, now + delay + self.GRACE)
            await asyncio.sleep(delay)


class Budget:
    """The link budget of one upstream (`max_concurrency`, `max_bandwidth`; 0 = unlimited)."""

    def __init__(self, max_concurrency: int = 0, max_bandwidth: int = 0) -> None:
        self.slots = _Slots(max_concurrency) if max_concurrency > 0 else None
        self.bucket = _Bucket(max_bandwidth) if max_bandwidth > 0 else None

    @property
    def enabled(self) -> bool:
        return self.slots is not None or self.bucket is not None

    @classmethod
    def from_settings(cls, settings: object) -> Budget:
        return cls(int(getattr(settings, "max_concurrency", 0) or 0),
                   int(getattr(settings, "max_bandwidth", 0) or 0))

    async def acquire(self, work: Work, heavy: bool) -> bool | None:
        """A slot (None when concurrency is not capped)."""
        if self.slots is None:
            return None
        return await self.slots.acquire(work, heavy)

    def release(self, slot: bool | None) -> None:
        if self.slots is not None and slot is not None:
            self.slots.release(slot)

    async def consume(self, n: int, work: Work) -> None:
        if self.bucket is not None:
            await self.bucket.consume(n, work)


class _BudgetedStream(httpx.AsyncByteStream):
    """A response body that pays for its bytes and gives its slot back once."""

    def __init__(self, inner: httpx.AsyncByteStream, budget: Budget, slot: bool | None,
                 work: Work) -> None:
        self._inner = inner
        self._budget = budget
        self._slot = slot
        self._work = work
        self._released = False

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._budget.release(self._slot)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                await self._budget.consume(len(chunk), self._work)
                yield chunk
        finally:
            self._release()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()


class BudgetTransport(httpx.AsyncBaseTransport):
    """Wraps the real transport: every upstream exchange goes through the budget.

    Only blob GETs are "heavy": they alone count against the background
    reserve and yield bandwidth to on-demand streams. Background manifest and
    HEAD requests still queue behind on-demand ones for a slot, but their few
    bytes are never held back (a client may be waiting on the same
    coalesced manifest fetch).
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, budget: Budget) -> None:
        self.inner = inner
        self.budget = budget

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        work = WORK.get()
        heavy = request.method == "GET" and "/blobs/" in request.url.path
        slot = await self.budget.acquire(work, heavy)
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            self.budget.release(slot)
            raise
        stream_work = work if heavy else FOREGROUND
        response.stream = _BudgetedStream(cast(httpx.AsyncByteStream, response.stream), self.budget,
                                          slot, stream_work)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
