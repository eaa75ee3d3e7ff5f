"""Credentials say whose they are, and no upstream call can be made without one."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from mirror.api.middleware import upstream_credential
from mirror.proxy.blobs import Blobs
from mirror.proxy.fetcher import BlobFetch, Fetcher
from mirror.proxy.manifests import Manifests
from mirror.proxy.tags import TagLists
from mirror.registry.digest import Digest
from mirror.upstream.client import Upstream
from mirror.upstream.credential import Credential

#: Every call that may reach upstream on a client's behalf.
UPSTREAM_CALLS: list[Callable[..., Any]] = [
    Upstream.probe, Upstream.get_manifest, Upstream.head_manifest, Upstream.head_blob,
    Upstream.stream_blob, Upstream.list_tags,
    Fetcher.start, Blobs.open, Blobs.stat, Blobs.ensure_linked,
    Manifests.get, Manifests.by_digest, Manifests.by_tag, TagLists.list,
]


@pytest.mark.parametrize("call", UPSTREAM_CALLS, ids=lambda c: c.__qualname__)
def test_every_upstream_call_requires_a_credential(call: Callable[..., Any]) -> None:
    parameter = inspect.signature(call).parameters["credential"]
    assert parameter.default is inspect.Parameter.empty, "a default would mean 'the node's' silently"
    assert parameter.annotation in ("Credential", Credential)


def test_kinds_and_their_headers() -> None:
    assert Credential.client("Bearer t").header == "Bearer t"
    assert Credential.node().header is None and Credential.anonymous().header is None
    assert Credential.client("Bearer t").is_client and not Credential.node().is_client
    assert Credential.client("Bearer t") == Credential.client("Bearer t") != Credential.client("Bearer u")
    with pytest.raises(ValueError):
        Credential("client")  # a client's credential without the client's header
    with pytest.raises(ValueError):
        Credential("node", "Bearer t")  # the node's account never carries a client's header


def test_a_clients_token_never_shows_in_repr() -> None:
    assert "secret" not in repr(Credential.client("Bearer secret"))
    assert repr(Credential.node()) == "Credential.node()"


def test_the_auth_layers_verdict_becomes_a_credential() -> None:
    assert upstream_credential("Bearer t") == Credential.client("Bearer t")
    assert upstream_credential(None) == Credential.node()


def test_a_refused_client_token_continues_only_with_another_clients() -> None:
    fetch = BlobFetch(Digest.of(b"x"), "team/app")
    first, second = Credential.client("Bearer a"), Credential.client("Bearer b")
    for credential in (first, Credential.node(), second, first):
        fetch.offer(credential)
    assert fetch.credentials == [first, second]  # the node's account is never offered
    assert fetch.next_credential(first) == second
    assert fetch.next_credential(second) is None  # then the fetch fails: never the node's
