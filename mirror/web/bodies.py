"""Small request bodies read whole, up to a cap: never just what is buffered.

`request.content.read(n)` returns what has arrived so far (at most `n`
bytes), not the whole body: a 100 KB manifest sent in two TCP pieces would
be cut at the first. These bodies (manifests, notification envelopes) are
read to their end and refused, never truncated, beyond the cap.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from mirror import errors


async def read_capped(request: web.Request, cap: int,
                      too_large: Callable[[], errors.RegistryError]) -> bytes:
    """The whole body of `request`, at most `cap` bytes.

    Raises:
        RegistryError: `too_large()` when `Content-Length` or the bytes that
            arrive pass `cap` (refused before reading when announced).
    """
    if request.content_length is not None and request.content_length > cap:
        raise too_large()
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > cap:
            raise too_large()
    return bytes(body)
