"""Who is in the zone and who is down, as this process sees it.

The configured peers are base URLs; a host that is a DNS name may resolve to
several addresses (a Kubernetes headless Service), each one a member, and is
re-resolved every `resolve_interval`. SIGHUP re-reads the list from the
config file (:meth:`Membership.reconfigure`). A peer that failed to answer
within `connect_timeout` (or broke a stream) is *down* for `down_for`
seconds: skipped, so the next peer in rendezvous order takes its keys.

The state is per process: each worker (`mirror.workers`) resolves and marks
peers down on its own. That costs a few DNS lookups and lets each worker
find a dead peer once by itself; it needs no shared memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from mirror.zone.rendezvous import ranked
from mirror.config.zone import ZoneSettings, normalized

log = logging.getLogger(__name__)

#: (host, port) -> the host's addresses; injectable for tests.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every address of `host` (A and AAAA), in the resolver's order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_host(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port is not None else ""
    return normalized(f"{parts.scheme}://{host}{port}")


class Membership:
    """The zone's members (resolved URLs), the down marks, and each key's owner order."""

    def __init__(self, settings: ZoneSettings, resolver: Resolver = resolve_dns,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self.self_url = settings.self_url
        self.members: tuple[str, ...] = tuple(p for p in settings.peers if _is_address(_host(p)))
        self._resolved: dict[str, tuple[str, ...]] = {}  # configured name URL -> its last addresses
        self._down: dict[str, float] = {}  # member -> monotonic time it may be tried again
        self._warned_self = False
        self._task: asyncio.Task[None] | None = None
        self.on_change: Callable[[Membership], None] | None = None  # metrics

    # -- the list -----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Resolve the configured peers again; a name that fails keeps its last addresses."""
        members: list[str] = []
        for peer in self.settings.peers:
            host = _host(peer)
            if _is_address(host):
                members.append(peer)
                continue
            port = urlsplit(peer).port or (443 if peer.startswith("https") else 80)
            try:
                addresses = await self.resolver(host, port)
                self._resolved[peer] = tuple(_with_host(peer, a) for a in addresses)
            except (OSError, UnicodeError) as exc:
                log.warning("zone: cannot resolve peer %s (%s); keeping its last %d address(es)",
                            peer, exc, len(self._resolved.get(peer, ())))
            members.extend(self._resolved.get(peer, ()))
        await self._resolve_self(members)
        changed = tuple(dict.fromkeys(members)) != self.members
        self.members = tuple(dict.fromkeys(members))
        if self.self_url not in self.members and not self._warned_self:
            self._warned_self = True
            log.warning("zone: mirror.zone.self %s is not among the peers after resolution (%s): "
                        "this node owns no keys and sends every miss to its peers",
                        self.self_url, ", ".join(self.members) or "none")
        if changed:
            log.info("zone: members %s", ", ".join(self.members))
            if self.on_change is not None:
                self.on_change(self)

    async def _resolve_self(self, members: list[str]) -> None:
        """`self` given by name (a StatefulSet pod's DNS name): the member its address makes."""
        configured = self.settings.self_url
        host = _host(configured)
        if _is_address(host) or configured in members:
            self.self_url = configured
            return
        port = urlsplit(configured).port or (443 if configured.startswith("https") else 80)
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError):
            return
        found = [url for url in (_with_host(configured, a) for a in addresses) if url in members]
        if found:
            self.self_url = found[0]

    async def reconfigure(self, settings: ZoneSettings) -> None:
        """A new peer list (SIGHUP): resolve it, forget the down marks of peers that left."""
        self.settings = settings
        self.self_url = settings.self_url
        self._warned_self = False
        self._resolved = {k: v for k, v in self._resolved.items() if k in settings.peers}
        await self.refresh()
        self._down = {m: t for m, t in self._down.items() if m in self.members}

    def start(self) -> None:
        """Re-resolve every `resolve_interval` in the background (names only matter)."""
        self._task = asyncio.create_task(self._resolve_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _resolve_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.settings.resolve_interval)

    # -- liveness -----------------------------------------------------------------------------

    def is_down(self, member: str) -> bool:
        until = self._down.get(member)
        if until is None:
            return False
        if self.clock() >= until:
            del self._down[member]
            if self.on_change is not None:
                self.on_change(self)
            return False
        return True

    def mark_down(self, member: str, why: str) -> None:
        """Skip `member` for `down_for` seconds (never this node itself)."""
        if member == self.self_url:
            return
        if not self.is_down(member):
            log.warning("zone: peer %s marked down for %.0fs: %s", member, self.settings.down_for, why)
        self._down[member] = self.clock() + self.settings.down_for
        if self.on_change is not None:
            self.on_change(self)

    def down(self) -> list[str]:
        """The members marked down now (read only: no expiry bookkeeping, no callbacks)."""
        now = self.clock()
        return [m for m in self.members if self._down.get(m, now) > now]

    def live(self) -> list[str]:
        return [m for m in self.members if not self.is_down(m)]

    def owners(self, key: str) -> list[str]:
        """The live members in owner order for `key`; this node alone when none is live."""
        order = ranked(self.live(), key)
        return order or [self.self_url]

    def owner(self, key: str) -> str:
        return self.owners(key)[0]

    def others(self) -> list[str]:
        """The live members other than this node (asked whether they hold an object)."""
        return [m for m in self.live() if m != self.self_url]


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""
