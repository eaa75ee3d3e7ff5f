"""A client's wait on upstream is bounded; the work it waits for is not.

Two rules, both so that retries never multiply a client's wait:

Each retry of an upstream call restarts `mirror.upstream.read_timeout`, so a
client that waited for the work itself could hang for retries x timeout. A
client waits at most `read_timeout` for upstream's answer (its headers): then
it gets 503 UNAVAILABLE with the spec's body, while the shared work (a fill,
a revalidation, shielded by :class:`~mirror.proxy.singleflight.SingleFlight`
or run as the fetcher's own task) goes on retrying in the background for the
next request. And a client holding a cached answer (a stale tag) waits only
for a refresh's first attempt (:class:`Refreshes`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from mirror import errors
from mirror.proxy.singleflight import SingleFlight
from mirror.upstream.client import retry_observer

T = TypeVar("T")


async def within(work: Awaitable[T], seconds: float | None) -> T:
    """Await `work` for at most `seconds` (None: no bound).

    Raises:
        Unavailable: upstream did not answer in time (the client's wait ends;
            a shielded `work` goes on).
    """
    if seconds is None:
        return await work
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if not deadline.expired():
            raise
        raise errors.Unavailable(
            f"upstream did not answer within {seconds:g}s; the mirror keeps trying",
            headers={"Retry-After": str(max(1, round(seconds)))}) from None


class Refreshes(Generic[T]):
    """Coalesced refreshes of cached answers (a tag's revalidation, a tag list).

    One shared task per key (:class:`SingleFlight`). A caller holding a cached
    answer waits for the refresh's first attempt only: upstream's retry
    observer marks the refresh failing as that attempt fails, the caller
    serves its cached answer at once, and the retries run on in the
    background (later callers fall back at once too, without a refresh of
    their own). A caller with nothing to fall back on waits for the retries,
    up to its bound.
    """

    def __init__(self) -> None:
        self._flight: SingleFlight[T] = SingleFlight()
        self._failing: dict[Hashable, asyncio.Event] = {}

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]], *, fallback: bool,
                  patience: float, bound: float | None) -> T:
        """Join (or start) the refresh of `key`.

        Args:
            fallback: the caller has a cached answer to serve instead.
            patience: with a fallback, how long a refresh that neither
                answers nor fails is waited for (a slow upstream).
            bound: without one, the longest wait (:func:`within`).

        Raises:
            RegistryError: the refresh failed; with a fallback, UNAVAILABLE as
                soon as its first attempt failed.
            TimeoutError: with a fallback, no outcome within `patience`.
        """
        task = self._flight.start(key, lambda: self._begin(key, work))
        if not fallback:
            return await within(asyncio.shield(task), bound)
        return await _first_outcome(task, self._failing.get(key), patience)

    async def close(self) -> None:
        """Stop refreshes still retrying in the background (shutdown)."""
        await self._flight.cancel_all()

    def _begin(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        failed = self._failing[key] = asyncio.Event()  # registered before any caller waits
        return self._observed(key, work, failed)

    async def _observed(self, key: Hashable, work: Callable[[], Awaitable[T]], failed: asyncio.Event) -> T:
        observing = retry_observer.set(lambda _exc: failed.set())  # this task's own context only
        try:
            return await work()
        finally:
            retry_observer.reset(observing)
            if self._failing.get(key) is failed:
                del self._failing[key]


async def _first_outcome(task: asyncio.Future[T], failed: asyncio.Event | None, patience: float) -> T:
    joined = asyncio.shield(task)  # cancelling the join leaves the work running
    signal = asyncio.ensure_future(failed.wait()) if failed is not None else None
    try:
        waits = {joined} if signal is None else {joined, signal}
        done, _ = await asyncio.wait(waits, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        if joined in done:
            return joined.result()
        if signal is not None and signal in done:
            raise errors.Unavailable("upstream failed; the refresh retries in the background")
        raise TimeoutError
    finally:
        for waiter in (joined, signal):
            if waiter is not None and not waiter.done():
                waiter.cancel()
