"""Large reads of upstream bodies: httpcore's HTTP/1.1 connection reads 64 KiB at a time.

A 64 MiB blob then crosses httpx/httpcore/h11/anyio as 1,024 chunks, each
through several async generators, and that per-chunk cost, not the link,
bounded a cold fetch on a fast link (the issue 12 profile). Asking for up
to 1 MiB per read lets each read take whatever the socket holds (asyncio
hands over up to 256 KiB at a time): on loopback, 64 MiB streamed at 383
MiB/s with 64 KiB reads and 661 MiB/s with 1 MiB reads, with a third less
CPU, on a par with aiohttp's client (505 MiB/s) in the same run, while the
upstream client keeps httpx's auth flows and transport hooks.

The knob is a class attribute of httpcore (pinned through httpx); when a
release renames it, this does nothing and says so once.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Bytes asked for per socket read of an upstream response.
READ_SIZE = 1024 * 1024


def use_large_reads(size: int = READ_SIZE) -> bool:
    """Make httpcore's HTTP/1.1 connections read up to `size` bytes at a time; True if it could."""
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:
        AsyncHTTP11Connection = None  # type: ignore[assignment,misc]  # noqa: N806
    current = getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", None)
    if not isinstance(current, int):
        log.warning("httpcore has no READ_NUM_BYTES: upstream bodies are read in its default pieces")
        return False
    if current < size:
        AsyncHTTP11Connection.READ_NUM_BYTES = size  # type: ignore[union-attr]
    return True
