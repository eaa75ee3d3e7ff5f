"""A wall clock a test moves forward, so a TTL expires without sleeping it out.

The nodes of ``make_mirror`` run in the test's process and take every
freshness decision (tag TTLs, stale limits, negative caching, ``Age``) from
``time.time()``.  A test that gives a tag a long TTL and then moves this clock
past it tests the TTL itself; a 1 s TTL and a 1.2 s sleep also assumed that
the steps in between (a push, a fetch) took no time, which a loaded machine
does not grant.  Monotonic time (asyncio, timeouts) is left alone.
"""

from __future__ import annotations

from collections.abc import Callable


class WallClock:
    """``time.time`` plus however far the test has moved it forward."""

    def __init__(self, real: Callable[[], float]) -> None:
        self._real = real
        self.ahead = 0.0

    def __call__(self) -> float:
        return self._real() + self.ahead

    def advance(self, seconds: float) -> None:
        """Move the clock forward (never back: stored times stay in the past)."""
        if seconds < 0:
            raise ValueError("the wall clock only moves forward")
        self.ahead += seconds
