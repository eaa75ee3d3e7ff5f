"""Rendezvous (highest random weight) hashing: the owner of a digest among the live peers.

Every node ranks the peers for a key the same way without talking to the
others: a peer's weight for a key is a hash of (peer, key), and the owner is
the heaviest live peer. When a peer leaves, only its keys move (each to the
next peer in its own ranking); when one joins, it takes about 1/n of the
keys from each of the others, and nothing else moves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(peer: str, key: str) -> int:
    """The peer's weight for `key`: 64 bits of SHA-256 over both (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"{peer}\n{key}".encode()).digest()[:8], "big")


def ranked(peers: Iterable[str], key: str) -> list[str]:
    """The peers in owner order for `key`: the first is the owner, the next takes over from it."""
    return sorted(set(peers), key=lambda peer: (weight(peer, key), peer), reverse=True)
