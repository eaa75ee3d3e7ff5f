"""Several registries behind one node: which upstream a request's repository belongs to.

The node keeps one repository namespace. The default upstream
(`proxy.remoteurl`) keeps its repositories' own names, so a store written
before `mirror.upstreams` existed stays valid; a repository of another
registry is keyed `<prefix>/<repository>`, where the prefix is the first of
that registry's names that can lead a repository path (`ghcr.io`,
`docker.io`). That one key is what tags, repository links, the negative
cache, pull counts, prewarm jobs, pins, pull events, and the token scope the
node checks are kept under; content by digest stays one shared store, and a
digest is served under a repository only when that repository links it (the
existing cross-repository rule, now also across registries).

A request names its registry in one of two ways:

* containerd's `?ns=<registry>`: `/v2/org/app/manifests/v1?ns=ghcr.io` is
  `ghcr.io/org/app`. An `ns` naming no registry is answered 404 at once
  (:meth:`Node.serves_namespace`), so containerd moves to its next host.
* a path prefix, for clients that send no `ns` (docker, skopeo, crane):
  `/v2/ghcr.io/org/app/manifests/v1` is `org/app` on the registry named
  `ghcr.io`. A first component naming no other registry leaves the name on
  the default upstream, as it always was.

On a Docker Hub upstream a one-component name means `library/<name>`, as
docker itself writes it.

:class:`Registries` stands where the node used to hold its one
:class:`Upstream`: every repository-scoped call is sent to the owning
registry's own client (its credentials, token cache, budget, health and
retries) with the registry's own repository name; calls with no repository
(the `/v2/` challenge, relayed writes, readiness) belong to the default
upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from mirror.registry.digest import Digest
from mirror.registry.reference import DOCKER_HUB_HOSTS
from mirror.upstream.auth import Challenge
from mirror.upstream.client import BlobStream, ManifestHead, Upstream, UpstreamManifest
from mirror.upstream.credential import Credential


@dataclass(frozen=True, slots=True)
class Registry:
    """One upstream registry: the names that mean it and its own client.

    `prefix` is None for the default upstream (its repositories keep their names).
    """

    prefix: str | None
    names: frozenset[str]
    client: Upstream
    tag_ttl: float
    tag_max_stale: float

    @property
    def label(self) -> str:
        """How metrics, `mirror top` and logs name it: the prefix, or the default's host."""
        return self.prefix or self.client.host.lower()

    @property
    def is_docker_hub(self) -> bool:
        return bool(self.names & DOCKER_HUB_HOSTS)

    def key(self, repo: str) -> str:
        """The node's name for `repo` of this registry (library/ implied on Docker Hub)."""
        if self.prefix is None:
            return repo
        if self.is_docker_hub and "/" not in repo:
            repo = f"library/{repo}"
        return f"{self.prefix}/{repo}"


def default_names(remote_url: str, extra: Iterable[str]) -> frozenset[str]:
    """The names of the default upstream: its host (with and without a default port),
    `mirror.names`, and every Docker Hub name when it is Docker Hub."""
    host = urlsplit(remote_url).netloc.lower()
    names = {host, host.split(":")[0] if host.endswith((":443", ":80")) else host, *extra}
    if names & DOCKER_HUB_HOSTS:
        names |= DOCKER_HUB_HOSTS
    return frozenset(names)


class Registries:
    """The routing table, and the upstream client surface routed by repository.

    Args:
        default: the `proxy.remoteurl` registry (prefix None).
        others: the `mirror.upstreams`, each with its prefix.
    """

    def __init__(self, default: Registry, others: Iterable[Registry] = ()) -> None:
        self.default = default
        self.others = tuple(others)
        self._by_name: dict[str, Registry] = {name: default for name in default.names}
        self._by_prefix: dict[str, Registry] = {}
        for registry in self.others:
            assert registry.prefix is not None
            self._by_name.update(dict.fromkeys(registry.names, registry))
            self._by_prefix.update({name: registry for name in registry.names if ":" not in name})
        # The default upstream's own client attributes, for what has no repository.
        self.base_url = default.client.base_url
        self.host = default.client.host
        self.read_timeout = default.client.read_timeout
        self.retries = default.client.retries
        self.health = default.client.health
        self.budget = default.client.budget

    @property
    def all(self) -> tuple[Registry, ...]:
        return (self.default, *self.others)

    # -- naming ---------------------------------------------------------------------------

    def named(self, name: str) -> Registry | None:
        """The registry a host name (`?ns=`, an image reference's host) means, if any."""
        return self._by_name.get(name.lower())

    def resolve(self, name: str, ns: str | None = None) -> str | None:
        """The node's repository key for a request's `name` and `?ns=`.

        Returns:
            None when `ns` names no registry of this node.
        """
        if ns is not None:
            registry = self.named(ns)
            return None if registry is None else registry.key(name)
        first, sep, rest = name.partition("/")
        registry = self._by_prefix.get(first) if sep else None
        return name if registry is None else registry.key(rest)

    def owner(self, key: str) -> tuple[Registry, str]:
        """The registry a repository key belongs to, and its name there."""
        first, sep, rest = key.partition("/")
        registry = self._by_prefix.get(first) if sep else None
        if registry is None:
            return self.default, key
        return registry, rest

    def display(self, key: str) -> tuple[str, str]:
        """(registry label, repository there) of a key, for `mirror top` and metrics."""
        registry, repo = self.owner(key)
        return registry.label, repo

    def read_timeout_of(self, key: str) -> float:
        """The `read_timeout` of the registry owning `key`: how long its clients wait on it."""
        return self.owner(key)[0].client.read_timeout

    def retries_of(self, key: str) -> int:
        """The `retries` of the registry owning `key` (a broken blob stream's resumptions)."""
        return self.owner(key)[0].client.retries

    def tag_policy(self, key: str) -> tuple[float, float]:
        """(tag_ttl, tag_max_stale) of the registry owning `key`."""
        registry = self.owner(key)[0]
        return registry.tag_ttl, registry.tag_max_stale

    # -- the Upstream surface, routed -------------------------------------------------------

    async def get_manifest(self, repo: str, reference: str, max_size: int,
                           credential: Credential) -> UpstreamManifest:
        registry, name = self.owner(repo)
        return await registry.client.get_manifest(name, reference, max_size, credential)

    async def head_manifest(self, repo: str, reference: str, credential: Credential) -> ManifestHead:
        registry, name = self.owner(repo)
        return await registry.client.head_manifest(name, reference, credential)

    async def head_blob(self, repo: str, digest: Digest, credential: Credential) -> int | None:
        registry, name = self.owner(repo)
        return await registry.client.head_blob(name, digest, credential)

    @asynccontextmanager
    async def stream_blob(self, repo: str, digest: Digest, offset: int,
                          credential: Credential) -> AsyncIterator[BlobStream]:
        registry, name = self.owner(repo)
        async with registry.client.stream_blob(name, digest, offset, credential) as stream:
            yield stream

    async def list_tags(self, repo: str, credential: Credential) -> list[str]:
        registry, name = self.owner(repo)
        return await registry.client.list_tags(name, credential)

    # -- no repository: the default upstream -----------------------------------------------

    async def challenge(self) -> Challenge | None:
        return await self.default.client.challenge()

    async def probe(self, path_qs: str, credential: Credential) -> int:
        return await self.default.client.probe(path_qs, credential)

    def forward(self, method: str, path_qs: str, headers: dict[str, str],
                content: bytes | AsyncIterator[bytes] | None) -> AbstractAsyncContextManager[httpx.Response]:
        """Pushes (`passthrough_writes`) go to the default upstream only."""
        return self.default.client.forward(method, path_qs, headers, content)

    async def aclose(self) -> None:
        for registry in self.all:
            await registry.client.aclose()
