"""Polling for conditions another task or process brings about.

Tests wait on outcomes, never on durations: a slow machine only makes the
wait longer, up to a generous bound that exists to turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def wait_until(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll `predicate` (sync or async) until it is truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
