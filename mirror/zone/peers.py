"""The client side of the peer interface: a peer as one more blob source.

A peer looks to the fetcher as the central registry does: `stream_blob`
yields a :class:`~mirror.upstream.client.BlobStream` (from an offset, with a
Range), errors map through the same table (404 is BLOB_UNKNOWN, 401 is
UNAUTHORIZED...). What differs is only the transport's judgement of the
peer: one that does not accept a connection within `connect_timeout`, or
breaks a stream, or refuses our signature, is marked down
(:class:`PeerUnavailable`) and the caller moves to the next peer.

Requests carry the HMAC (:mod:`mirror.zone.signing`) and say whose
credential the peer is to use upstream on the client's behalf
(`X-Mirror-Zone-Credential`: client, node or anonymous, plus the client's
header for "client"): the owner never guesses whose it is.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from mirror import errors
from mirror.registry.digest import Digest
from mirror.registry import manifest as manifests
from mirror.upstream.client import (BlobStream, UpstreamManifest, _at_minimum_pace, _blob_stream, _read_capped,
                                    _verified_digest, raise_for_status)
from mirror.upstream.credential import Credential
from mirror.upstream.tls import verify_setting
from mirror.zone import signing
from mirror.zone.membership import Membership
from mirror.zone.metrics import ZoneMetrics

log = logging.getLogger(__name__)

PREFIX = "/zone/v1"
#: Set on a 401 the peer interface itself gives (bad or missing signature), not upstream's.
REFUSED = "X-Mirror-Zone-Refused"
#: On a `held` answer: "1" when the holder links the object to the asked repository.
LINKED = "X-Mirror-Zone-Linked"


#: Seconds a holder gets to say whether it stores an object (a metadata lookup): a fill waits for it.
HELD_TIMEOUT = 2.0
#: On a manifest answer: the owner's cache outcome. "hit" means no GET upstream saw this pull,
#: so the node the client reached sends its pull event (exactly one per pull, zone-wide).
CACHE = "X-Mirror-Zone-Cache"


@dataclass(frozen=True, slots=True)
class PeerManifest(UpstreamManifest):
    """A manifest from the owner, with whether upstream saw this request."""

    cache: str = "miss"


class PeerUnavailable(errors.Unavailable):  # type: ignore[misc,valid-type]
    """The peer did not answer, broke the stream, or refused us: it is marked down."""


def blob_path(digest: Digest, repo: str) -> str:
    """A blob by digest, fetched by the peer if it must (the owner's path)."""
    return f"{PREFIX}/blobs/{digest}?repo={quote(repo, safe='/')}"


def held_path(digest: Digest, repo: str) -> str:
    """A blob by digest only if the peer already stores it (never fetched for this)."""
    return f"{PREFIX}/held/{digest}?repo={quote(repo, safe='/')}"


def manifest_path(digest: Digest, repo: str) -> str:
    """A manifest by digest, as the owner serves it to a client of `repo`."""
    return f"{PREFIX}/manifests/{digest}?repo={quote(repo, safe='/')}"


def credential_headers(credential: Credential) -> dict[str, str]:
    headers = {signing.CREDENTIAL: credential.kind}
    if credential.header is not None:
        headers[signing.CLIENT_AUTHORIZATION] = credential.header
    return headers


@dataclass(slots=True)
class PeerStream(BlobStream):
    """A peer's blob response: a broken body is PeerUnavailable (the caller resumes, with a Range)."""

    peer: str = ""
    peers: Peers | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        return self._counted(_at_minimum_pace(self.response.aiter_raw(), self.peers_read_timeout()))

    def peers_read_timeout(self) -> float | None:
        return None if self.peers is None else self.peers.membership.settings.read_timeout

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                if self.peers is not None:
                    self.peers.metrics.peer_bytes.inc(len(chunk))
                yield chunk
        except errors.Unavailable as exc:
            # Not marked down here: a live owner also cuts its readers when its own upstream
            # stalls. The caller asks the same owner again first; a dead one then refuses the
            # connection and is marked down, and the next owner is asked.
            raise PeerUnavailable(f"peer {self.peer} broke the stream: {exc.message}") from exc


class Peers:
    """Signed requests to the other nodes of the zone, sharing one connection pool."""

    def __init__(self, membership: Membership, metrics: ZoneMetrics,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        settings = membership.settings
        self.membership = membership
        self.metrics = metrics
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout,
                                pool=settings.read_timeout)
        self._client = httpx.AsyncClient(timeout=timeout, trust_env=False, verify=verify_setting(),
                                         limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                                         transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self, method: str, path_qs: str, credential: Credential,
                 extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = credential_headers(credential)
        headers.update(signing.sign(self.membership.settings.secret, method, path_qs, headers))
        headers["X-Mirror-Zone-Node"] = self.membership.self_url
        headers.update(extra or {})
        return headers

    @asynccontextmanager
    async def stream_blob(self, peer: str, path_qs: str, digest: Digest, offset: int,
                          credential: Credential) -> AsyncIterator[BlobStream]:
        """GET a blob from `peer` (from `offset`), as the upstream client's `stream_blob` does.

        Raises:
            PeerUnavailable: the peer is down (now marked so).
            RegistryError: the peer's own answer (BLOB_UNKNOWN, UNAUTHORIZED...).
        """
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        request = self._client.build_request("GET", f"{peer}{path_qs}",
                                             headers=self._headers("GET", path_qs, credential, extra))
        response = await self._send(peer, request)
        try:
            await self._raise_for_status(peer, response)
            stream = _blob_stream(response, offset)
            self.metrics.peer_fetches.labels("ok").inc()
            yield PeerStream(response, stream.start, stream.total, peer=peer, peers=self)
        finally:
            await response.aclose()

    @asynccontextmanager
    async def ranged(self, owners: list[str], path_qs: str, credential: Credential,
                     client_range: str) -> AsyncIterator[httpx.Response]:
        """A client's Range asked of the first live owner; its 206 (or 416...) as it is."""
        for peer in owners:
            request = self._client.build_request(
                "GET", f"{peer}{path_qs}",
                headers=self._headers("GET", path_qs, credential, {"Range": client_range[:200]}))
            try:
                response = await self._send(peer, request)
            except PeerUnavailable:
                continue
            try:
                await self._raise_for_status(peer, response)
                yield response
            finally:
                await response.aclose()
            return
        raise errors.Unavailable("no owner of this blob answered; retry")

    async def get_manifest(self, peer: str, repo: str, digest: Digest, max_size: int,
                           credential: Credential) -> UpstreamManifest:
        """A manifest by digest from `peer`, verified here as one from upstream is.

        Raises:
            PeerUnavailable: the peer is down (now marked so).
            RegistryError: its answer (MANIFEST_UNKNOWN, UNAUTHORIZED...); 502 on wrong bytes.
        """
        path_qs = manifest_path(digest, repo)
        request = self._client.build_request("GET", f"{peer}{path_qs}",
                                             headers=self._headers("GET", path_qs, credential))
        response = await self._send(peer, request)
        try:
            await self._raise_for_status(peer, response, errors.ManifestUnknown)
            try:
                raw = await _read_capped(response, max_size)
            except httpx.HTTPError as exc:
                self.membership.mark_down(peer, f"manifest body broke: {type(exc).__name__}")
                raise PeerUnavailable(f"peer {peer} broke the stream") from exc
        finally:
            await response.aclose()
        media_type = manifests.detect_media_type(raw, response.headers.get("content-type"))
        answered = "hit" if response.headers.get(CACHE) == "hit" else "miss"
        return PeerManifest(raw, media_type, _verified_digest(raw, str(digest), None), cache=answered)

    async def head_blob(self, peer: str, path_qs: str, credential: Credential) -> int | None:
        """HEAD a blob at its owner: its size (BLOB_UNKNOWN, UNAUTHORIZED... as upstream's)."""
        request = self._client.build_request("HEAD", f"{peer}{path_qs}",
                                             headers=self._headers("HEAD", path_qs, credential))
        response = await self._send(peer, request)
        await response.aclose()
        await self._raise_for_status(peer, response)
        length = response.headers.get("content-length", "")
        return int(length) if length.isdigit() else None

    async def held(self, peer: str, digest: Digest, repo: str, credential: Credential) -> tuple[int, bool] | None:
        """(size, linked to `repo`) when `peer` stores `digest`; None when it does not or is down."""
        path_qs = held_path(digest, repo)
        timeout = httpx.Timeout(HELD_TIMEOUT, connect=self.membership.settings.connect_timeout)
        request = self._client.build_request("HEAD", f"{peer}{path_qs}", timeout=timeout,
                                             headers=self._headers("HEAD", path_qs, credential))
        try:
            response = await self._send(peer, request)
        except PeerUnavailable:
            return None
        await response.aclose()
        length = response.headers.get("content-length", "")
        if response.status_code != 200 or not length.isdigit():
            if response.headers.get(REFUSED):
                self.membership.mark_down(peer, "it refused our signature (mirror.zone.secret differs?)")
            return None
        return int(length), response.headers.get(LINKED) == "1"

    async def _send(self, peer: str, request: httpx.Request) -> httpx.Response:
        try:
            return await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self.metrics.peer_fetches.labels("down").inc()
            self.membership.mark_down(peer, type(exc).__name__)
            raise PeerUnavailable(f"peer {peer} unavailable") from exc

    async def _raise_for_status(self, peer: str, response: httpx.Response,
                                not_found: type[errors.RegistryError] = errors.BlobUnknown) -> None:
        if response.status_code == 401 and response.headers.get(REFUSED):
            await response.aread()
            self.metrics.peer_fetches.labels("refused").inc()
            log.error("zone: peer %s refused our signature: is mirror.zone.secret the same on every "
                      "node, and are the clocks within mirror.zone.max_skew?", peer)
            self.membership.mark_down(peer, "refused our signature")
            raise PeerUnavailable(f"peer {peer} refused this node")
        await raise_for_status(response, not_found)
