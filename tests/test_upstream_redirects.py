"""Upstream redirects (307 to object storage or a CDN) are followed, credentials stay home."""

from __future__ import annotations

import socket
import uuid

from aiohttp import web

from mirror.config import UpstreamSettings
from mirror.registry.digest import Digest
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential
from tests.support import images


async def start_redirector(target: str) -> tuple[web.AppRunner, str]:
    """A front that answers every blob GET with a 307 to `target` (another origin), for faults only."""
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target + request.rel_url.path_qs)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_redirect_is_followed_without_the_authorization_header(relay, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, f"redir/app-{uuid.uuid4().hex[:6]}", "v1")
    digest, data = image.layers[0]
    runner, front = await start_redirector(relay.url)  # the relay stands for the CDN: another origin
    client = Upstream(front, None, None, UpstreamSettings())
    try:
        received = bytearray()
        async with client.stream_blob(image.repo, Digest.parse(digest), 0,
                                      Credential.client("Bearer client-secret")) as stream:
            async for chunk in stream.chunks():
                received += chunk
    finally:
        await client.aclose()
        await runner.cleanup()
    assert bytes(received) == data
    followed = [r for r in relay.records if "/blobs/" in r.path_qs]
    assert len(followed) == 1
    headers = {k.lower() for k in (followed[0].request_headers or {})}
    assert "authorization" not in headers
