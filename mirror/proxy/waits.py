"""A client's wait on upstream is bounded; the work it waits for is not.

Each retry of an upstream call restarts `mirror.upstream.read_timeout`, so a
client that waited for the work itself could hang for retries x timeout. A
client waits at most `read_timeout` for upstream's answer (its headers): then
it gets 503 UNAVAILABLE with the spec's body, while the shared work (a fill,
a revalidation, shielded by :class:`~mirror.proxy.singleflight.SingleFlight`
or run as the fetcher's own task) goes on retrying in the background for the
next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from mirror import errors

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
