"""A short memory of upstream 404s, so back-off loops do not hammer the link."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable

from mirror import errors


class NegativeCache:
    """Remembers "not found" answers for `ttl` seconds (bounded in size)."""

    def __init__(self, ttl: float, limit: int = 50_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[Hashable, tuple[float, errors.RegistryError]] = OrderedDict()

    def check(self, key: Hashable) -> None:
        """Raise the remembered error for `key`, if it is still fresh."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry[0] < time.monotonic():
            del self._entries[key]
            return
        raise type(entry[1])(entry[1].message)

    def remember(self, key: Hashable, error: errors.RegistryError) -> None:
        """Note that upstream said `key` does not exist."""
        if self.ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl, error)
        self._entries.move_to_end(key)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def forget(self, key: Hashable) -> None:
        """Drop a remembered miss (content was pushed or announced)."""
        self._entries.pop(key, None)


NOT_FOUND = (errors.BlobUnknown, errors.ManifestUnknown, errors.NameUnknown)
