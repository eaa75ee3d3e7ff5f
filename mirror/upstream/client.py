"""The upstream registry client: the only place that speaks httpx.

Every upstream status, error body and transport exception is translated into
:mod:`mirror.errors` here, once (the table in :func:`error_from_response`),
so the rest of the node reasons about protocol errors only. Error bodies are
read with a size cap; manifests are read with the manifest cap and refused
early when `Content-Length` or `Content-Type` already says they are not one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from mirror import errors
from mirror.observe.metrics import Metrics
from mirror.registry import manifest as manifests
from mirror.registry.digest import Digest
from mirror.registry.mediatypes import UPSTREAM_ACCEPT
from mirror.upstream.auth import Challenge, RegistryAuth
from mirror.upstream.budget import Budget, BudgetTransport
from mirror.upstream.credential import Credential
from mirror.upstream.health import PROBE_TIMEOUT, HealthTransport, LinkHealth
from mirror.upstream.tls import verify_setting

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_ERROR_BODY = 64 * 1024
MAX_TAG_LIST_BODY = 16 * 1024 * 1024
MAX_RETRY_AFTER = 30.0
MIN_BYTES_PER_WINDOW = 1024  # a blob stream slower than this per read_timeout is cut (a trickle)

#: Told each failure `_retrying` is about to retry: a caller holding a cached
#: answer serves it at once instead of waiting out the backoff (stale tags).
#: A context variable, so it reaches only the work (task) that set it.
retry_observer: ContextVar[Callable[[errors.RegistryError], None] | None] = ContextVar(
    "retry_observer", default=None)


@dataclass(frozen=True, slots=True)
class UpstreamManifest:
    """A manifest as upstream served it, verified against its digest."""

    raw: bytes
    media_type: str
    digest: Digest
    age: float = 0.0  # how old upstream says its answer already is (a mirror upstream)


@dataclass(frozen=True, slots=True)
class ManifestHead:
    """What a HEAD on a manifest tells: its digest, type and size."""

    digest: Digest
    media_type: str
    size: int
    age: float = 0.0


def response_age(headers: httpx.Headers) -> float:
    """The `Age` an upstream mirror reports for a tag answer (0 when absent).

    Honouring it keeps edge-zone TTLs from stacking: an edge node dates its
    tag record from when the middle node last confirmed the tag upstream.
    """
    value = headers.get("age", "")
    return min(float(value), 365 * 86400.0) if value.isdigit() else 0.0


@dataclass(slots=True)
class BlobStream:
    """An open upstream blob response, from `start` to the end."""

    response: httpx.Response
    start: int
    total: int | None

    def chunks(self) -> AsyncIterator[bytes]:
        """The raw body bytes (never content-decoded), at a minimum pace.

        A trickle (a byte a second) never trips the per-read timeout, so less
        than `MIN_BYTES_PER_WINDOW` within a `read_timeout` window ends the
        stream with UNAVAILABLE too; the fetcher resumes it with a Range.
        """
        window = (self.response.request.extensions.get("timeout") or {}).get("read")
        return _at_minimum_pace(self.response.aiter_raw(), window)


async def _at_minimum_pace(chunks: AsyncIterator[bytes], window: float | None) -> AsyncIterator[bytes]:
    started, received = time.monotonic(), 0
    async with _mapped():  # a broken stream is UNAVAILABLE where the fetcher reads it
        async for chunk in chunks:
            yield chunk
            received += len(chunk)
            now = time.monotonic()
            if window and now - started >= window:
                if received < MIN_BYTES_PER_WINDOW:
                    raise errors.Unavailable(f"upstream sent {received} bytes in {now - started:.0f}s")
                started, received = now, 0


class Upstream:
    """A pooled client for one upstream registry.

    Args:
        remote_url: `proxy.remoteurl`.
        username, password: `proxy.username` / `proxy.password`.
        settings: `mirror.upstream` (timeouts, pool limits, retries).
        transport: an httpx transport override (tests).
        metrics: where every upstream request is counted and timed; None: nowhere.
        label: the metrics' `upstream` label (a `mirror.upstreams` prefix); default the host.
    """

    def __init__(self, remote_url: str, username: str | None, password: str | None,
                 settings: object, transport: httpx.AsyncBaseTransport | None = None, *,
                 metrics: Metrics | None = None, label: str | None = None) -> None:
        self.base_url = remote_url.rstrip("/")
        self.host = urlsplit(self.base_url).netloc
        self.label = label or self.host.lower()
        self.retries = int(getattr(settings, "retries", 3))
        self.read_timeout = float(getattr(settings, "read_timeout", 60.0))  # bounds a client's wait
        timeout = httpx.Timeout(
            connect=getattr(settings, "connect_timeout", 10.0),
            read=getattr(settings, "read_timeout", 60.0),
            write=getattr(settings, "read_timeout", 60.0),
            pool=getattr(settings, "pool_timeout", 30.0),
        )
        limits = httpx.Limits(
            max_connections=getattr(settings, "max_connections", 64),
            max_keepalive_connections=getattr(settings, "max_keepalive", 32),
            keepalive_expiry=getattr(settings, "keepalive_expiry", 60.0),
        )
        self.auth = RegistryAuth(username, password, self.host)
        self.anonymous_auth = RegistryAuth(None, None, self.host)  # Credential.anonymous(): its own token cache
        self._challenge: Challenge | None = None
        self._challenge_known = False
        self.budget = Budget.from_settings(settings)  # max_concurrency / max_bandwidth, on-demand first
        verify = verify_setting()
        self.health = LinkHealth(self._probe_link)  # readiness reads it, never waits on the link
        transport = HealthTransport(
            transport or httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify), self.health)
        if self.budget.enabled:
            transport = BudgetTransport(transport, self.budget)
        self._client = httpx.AsyncClient(
            timeout=timeout, limits=limits, auth=self.auth, follow_redirects=True, verify=verify,
            transport=transport, headers={"User-Agent": "mirror/0.1"}, trust_env=False,
        )
        if metrics is not None:
            self._observe(metrics)

    def _observe(self, metrics: Metrics) -> None:
        """Count every upstream request and time it to its response headers."""
        async def on_request(request: httpx.Request) -> None:
            request.extensions["mirror_started"] = time.perf_counter()

        async def on_response(response: httpx.Response) -> None:
            started = response.request.extensions.get("mirror_started")
            method = response.request.method
            metrics.upstream_requests.labels(method, str(response.status_code)).inc()
            metrics.registry_requests.labels(self.label, method, str(response.status_code)).inc()
            if started is not None:
                metrics.upstream_seconds.labels(method).observe(time.perf_counter() - started)
            if response.status_code >= 500 or response.status_code == 429:
                metrics.upstream_errors.labels(str(response.status_code)).inc()

        self._client.event_hooks = {"request": [on_request], "response": [on_response]}

    def read_timeout_of(self, repo: str) -> float:
        """How long a client waits on this upstream for `repo` (one upstream: the same for all)."""
        return self.read_timeout

    def retries_of(self, repo: str) -> int:
        """Resumptions of a broken blob stream for `repo` (one upstream: the same for all)."""
        return self.retries

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.health.close()
        await self._client.aclose()

    def url(self, repo: str, kind: str, reference: str) -> str:
        """The upstream URL of a registry resource."""
        return f"{self.base_url}/v2/{repo}/{kind}/{reference}"

    async def _probe_link(self) -> None:
        """`GET /v2/` with a short timeout, for readiness (the transport records the outcome)."""
        await self._client.get(f"{self.base_url}/v2/", auth=None, timeout=PROBE_TIMEOUT)

    async def challenge(self) -> Challenge | None:
        """Upstream's own `WWW-Authenticate` challenge on `/v2/` (None: no auth).

        Learned once and kept: forward-mode auth relays it to clients, and its
        `service` tells whether upstream trusts the same tokens as this node.

        Raises:
            Unavailable: upstream was never reached, so it is not known yet.
        """
        if not self._challenge_known:
            async with _mapped():
                response = await self._client.get(f"{self.base_url}/v2/", auth=None)
            if response.status_code == 401:
                self._challenge = Challenge.parse(response.headers.get("www-authenticate", ""))
            elif response.status_code >= 500:
                raise errors.Unavailable(f"upstream answered {response.status_code}")
            self._challenge_known = True
        return self._challenge

    async def probe(self, path_qs: str, credential: Credential) -> int:
        """HEAD `path_qs` upstream with `credential` (a client's); the status code.

        Raises:
            RegistryError: UNAVAILABLE when upstream cannot be reached.
        """
        async with _mapped():
            response = await self._client.head(f"{self.base_url}{path_qs}", auth=self._auth(credential),
                                               headers=_headers(credential, Accept=UPSTREAM_ACCEPT))
        return response.status_code

    async def get_manifest(self, repo: str, reference: str, max_size: int,
                           credential: Credential) -> UpstreamManifest:
        """GET a manifest with every media type accepted; verify its digest.

        Raises:
            RegistryError: upstream's answer mapped (MANIFEST_UNKNOWN, ...);
                MANIFEST_INVALID when it is too big or not a manifest; 502
                MANIFEST_INVALID when its bytes do not match the digest named
                by reference or header (upstream's fault, not the client's).
        """
        return await self._retrying(lambda: self._get_manifest(repo, reference, max_size, credential))

    async def _get_manifest(self, repo: str, reference: str, max_size: int,
                            credential: Credential) -> UpstreamManifest:
        headers = _headers(credential, Accept=UPSTREAM_ACCEPT)
        async with _mapped(), self._client.stream("GET", self.url(repo, "manifests", reference),
                                                  headers=headers, auth=self._auth(credential)) as response:
            await raise_for_status(response, errors.ManifestUnknown)
            _refuse_non_manifest(response, max_size)
            raw = await _read_capped(response, max_size)
        media_type = manifests.detect_media_type(raw, response.headers.get("content-type"))
        digest = _verified_digest(raw, reference, response.headers.get("docker-content-digest"))
        return UpstreamManifest(raw, media_type, digest, response_age(response.headers))

    async def head_manifest(self, repo: str, reference: str, credential: Credential) -> ManifestHead:
        """HEAD a manifest: digest and type without the body (free on Docker Hub)."""
        async def head() -> ManifestHead:
            async with _mapped():
                response = await self._client.head(self.url(repo, "manifests", reference),
                                                   headers=_headers(credential, Accept=UPSTREAM_ACCEPT),
                                                   auth=self._auth(credential))
            await raise_for_status(response, errors.ManifestUnknown)
            digest_header = response.headers.get("docker-content-digest")
            if not digest_header:
                raise errors.Unavailable("upstream HEAD carried no Docker-Content-Digest")
            media_type = manifests.detect_media_type(b"{}", response.headers.get("content-type"))
            return ManifestHead(Digest.parse(digest_header), media_type,
                                int(response.headers.get("content-length", 0)), response_age(response.headers))
        return await self._retrying(head)

    async def head_blob(self, repo: str, digest: Digest, credential: Credential) -> int | None:
        """HEAD a blob in `repo`: its size, confirming upstream has it there."""
        async def head() -> int | None:
            async with _mapped():
                response = await self._client.head(self.url(repo, "blobs", str(digest)),
                                                   headers=_headers(credential), auth=self._auth(credential))
            await raise_for_status(response, errors.BlobUnknown)
            length = response.headers.get("content-length")
            return int(length) if length and length.isdigit() else None
        return await self._retrying(head)

    @asynccontextmanager
    async def stream_blob(self, repo: str, digest: Digest, offset: int,
                          credential: Credential) -> AsyncIterator[BlobStream]:
        """Open a blob GET (from `offset` with a Range) and yield its stream.

        Raises:
            RegistryError: upstream refused; BLOB_UNKNOWN on 404.
        """
        headers = _headers(credential)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        async with _mapped(), self._client.stream("GET", self.url(repo, "blobs", str(digest)),
                                                  headers=headers, auth=self._auth(credential)) as response:
            await raise_for_status(response, errors.BlobUnknown)
            yield _blob_stream(response, offset)

    @asynccontextmanager
    async def forward(self, method: str, path_qs: str, headers: dict[str, str],
                      content: bytes | AsyncIterator[bytes] | None) -> AsyncIterator[httpx.Response]:
        """Relay a client's write as it is: its own credentials, no retries, no redirects.

        The node's credentials are never added (`auth=None`): a push is the
        client's, and upstream must judge it as such.

        Raises:
            RegistryError: UNAVAILABLE when upstream cannot be reached.
        """
        request = self._client.build_request(method, f"{self.base_url}{path_qs}", headers=headers,
                                             content=content)
        async with _mapped():
            response = await self._client.send(request, auth=None, stream=True, follow_redirects=False)
        try:
            yield response
        finally:
            await response.aclose()

    async def list_tags(self, repo: str, credential: Credential) -> list[str]:
        """Every tag of `repo`, following upstream's pagination `Link`s."""
        tags: list[str] = []
        url: str | None = f"{self.base_url}/v2/{repo}/tags/list"
        for _ in range(100):
            if url is None:
                break
            page, url = await self._retrying(lambda u=url: self._tags_page(u, credential))  # type: ignore[misc]
            tags.extend(page)
        return tags

    async def _tags_page(self, url: str, credential: Credential) -> tuple[list[str], str | None]:
        async with _mapped(), self._client.stream("GET", url, headers=_headers(credential),
                                                  auth=self._auth(credential)) as response:
            await raise_for_status(response, errors.NameUnknown)
            body = await _read_capped(response, MAX_TAG_LIST_BODY)
        try:
            page = json.loads(body).get("tags") or []
        except (ValueError, AttributeError) as exc:
            raise errors.Unavailable("upstream tag list is not JSON") from exc
        next_url = response.links.get("next", {}).get("url")
        return [t for t in page if isinstance(t, str)], (
            str(httpx.URL(url).join(next_url)) if next_url else None)

    def _auth(self, credential: Credential) -> httpx.Auth | None:
        """The auth flow for `credential`: never the node's account for a client's token."""
        if credential.kind == "node":
            return self.auth
        return self.anonymous_auth if credential.kind == "anonymous" else None

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry idempotent calls on UNAVAILABLE and 429, with jittered backoff."""
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except (errors.Unavailable, errors.TooManyRequests) as exc:
                delay = retry_delay(exc, attempt)
                if attempt == self.retries or delay is None:
                    raise
                observer = retry_observer.get()
                if observer is not None:
                    observer(exc)
                log.info("upstream %s; retry %d in %.1fs", exc.code, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def retry_delay(exc: errors.RegistryError, attempt: int) -> float | None:
    """Backoff for the next attempt; None when Retry-After asks too much."""
    retry_after = exc.headers.get("Retry-After")
    if retry_after is not None:
        seconds = float(retry_after) if retry_after.isdigit() else MAX_RETRY_AFTER + 1
        return seconds if seconds <= MAX_RETRY_AFTER / 3 else None
    return min(0.2 * 2**attempt, 5.0) * (0.5 + random.random())


def _headers(credential: Credential, **extra: str) -> dict[str, str]:
    headers = dict(extra)
    if credential.header is not None:  # a client's own header, sent as it is
        headers["Authorization"] = credential.header
    return headers


def _blob_stream(response: httpx.Response, offset: int) -> BlobStream:
    if offset and response.status_code != 206:
        raise errors.Unavailable("upstream ignored the Range of a resumed fetch")
    length = response.headers.get("content-length")
    size = int(length) if length and length.isdigit() else None
    return BlobStream(response, offset, offset + size if size is not None else None)


def _refuse_non_manifest(response: httpx.Response, max_size: int) -> None:
    """Refuse before reading: too large, or plainly a blob or an HTML page."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_size:
        raise errors.ManifestInvalid(f"manifest larger than {max_size} bytes")
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/octet-stream", "text/html", "application/x-gzip", "application/gzip"):
        raise errors.ManifestInvalid(f"upstream answered {content_type!r}, not a manifest")


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    """Read a body, refusing (not truncating) one longer than `cap`."""
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer += chunk
        if len(buffer) > cap:
            raise errors.ManifestInvalid(f"upstream body larger than {cap} bytes")
    return bytes(buffer)


def _verified_digest(raw: bytes, reference: str, header: str | None) -> Digest:
    """The manifest's digest, checked against what was asked and announced."""
    for named in (reference if ":" in reference else None, header):
        if named:
            expected = Digest.parse(named)
            if Digest.of(raw, expected.algorithm) != expected:
                raise errors.UpstreamManifestInvalid("upstream manifest does not match its digest",
                                                     detail={"digest": named})
    return Digest.of(raw)


async def raise_for_status(response: httpx.Response, not_found: type[errors.RegistryError]) -> None:
    """Map a non-success upstream answer to one of our errors (the one table).

    | upstream               | client sees                                  |
    | 2xx                    | (no error)                                   |
    | 404                    | `not_found` (MANIFEST/BLOB/NAME_UNKNOWN)     |
    | 401 / 403              | UNAUTHORIZED / DENIED                        |
    | 429                    | TOOMANYREQUESTS, Retry-After passed on       |
    | 5xx, other             | UNAVAILABLE (503)                            |
    """
    status = response.status_code
    if status < 300:
        return
    message = await _error_message(response)
    headers = {}
    if "retry-after" in response.headers:
        headers["Retry-After"] = response.headers["retry-after"][:32]
    if status == 404:
        raise not_found(message)
    if status == 401:
        raise errors.Unauthorized(message)
    if status == 403:
        raise errors.Denied(message)
    if status == 429:
        raise errors.TooManyRequests(message, headers=headers)
    raise errors.Unavailable(f"upstream answered {status}", headers=headers)


async def _error_message(response: httpx.Response) -> str | None:
    """The first error message of upstream's body, read with a size cap."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= MAX_ERROR_BODY:
                break
        first = json.loads(bytes(body[:MAX_ERROR_BODY]))["errors"][0]
        message = first.get("message")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, httpx.HTTPError):
        return None
    return str(message)[:500] if message else None


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    """Translate httpx transport failures into UNAVAILABLE."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise errors.Unavailable("upstream timed out", detail=None) from exc
    except httpx.HTTPError as exc:
        log.debug("upstream unreachable: %r", exc)
        raise errors.Unavailable("upstream unreachable") from exc
