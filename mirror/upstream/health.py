"""What the node knows of its link to upstream, for readiness, never waited on.

Every upstream exchange reports here through :class:`HealthTransport` (an
answer of any status: the link works; a transport failure or timeout: it does
not). Readiness reads that state and starts at most one background probe of
`/v2/` with a short timeout, waiting for it only briefly: a link that silently
drops packets would otherwise hold the readiness answer past the platform's
probe timeout and take every node out of service exactly when the link is
down, when the cache matters most.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

PROBE_TIMEOUT = 5.0  # a background probe of `/v2/` gives up after this long


class LinkHealth:
    """The latest observation of the link, and the background probe that refreshes it.

    Args:
        probe: one request to upstream (its outcome is recorded by the transport).
    """

    def __init__(self, probe: Callable[[], Awaitable[object]]) -> None:
        self._probe_call = probe
        self.reachable: bool | None = None  # None: nothing observed yet
        self.error: str | None = None
        self.observed_at: float | None = None  # monotonic
        self.last_ok_at: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._probe_started = 0.0

    def answered(self) -> None:
        """Upstream answered a request (any status)."""
        self.reachable, self.error = True, None
        self.observed_at = self.last_ok_at = time.monotonic()

    def failed(self, reason: str) -> None:
        """A request to upstream failed before any answer (refused, reset, timed out)."""
        self.reachable, self.error = False, reason
        self.observed_at = time.monotonic()

    async def report(self, wait: float) -> dict[str, Any]:
        """The link's state after waiting at most `wait` for a fresh probe."""
        if self._probe is None or self._probe.done():
            self._probe_started = time.monotonic()
            self._probe = asyncio.create_task(self._run_probe())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._probe), wait)
        now = time.monotonic()
        report: dict[str, Any] = {"reachable": self.reachable}
        if self.observed_at is not None:
            report["observed_seconds_ago"] = round(now - self.observed_at, 1)
        if self.last_ok_at is not None:
            report["last_answer_seconds_ago"] = round(now - self.last_ok_at, 1)
        if self.error is not None:
            report["error"] = self.error
        if not self._probe.done():
            report["probe_pending_seconds"] = round(now - self._probe_started, 1)
        return report

    async def _run_probe(self) -> None:
        with contextlib.suppress(Exception):  # recorded by the transport; nothing to raise to
            await self._probe_call()

    async def close(self) -> None:
        """Stop a probe in progress (shutdown)."""
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


class HealthTransport(httpx.AsyncBaseTransport):
    """Wraps the real transport: every exchange tells :class:`LinkHealth` how the link is."""

    def __init__(self, inner: httpx.AsyncBaseTransport, health: LinkHealth) -> None:
        self.inner = inner
        self.health = health

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.PoolTimeout:
            raise  # the node's own connection pool was busy: says nothing of the link
        except httpx.TransportError as exc:
            self.health.failed(f"{type(exc).__name__} on {request.method} {request.url.path}")
            raise
        self.health.answered()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
