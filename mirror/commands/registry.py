"""Every operator command, in the order `mirror --help` lists them."""

from __future__ import annotations

from types import ModuleType

from mirror.commands import pins, prewarm, store, top, users

#: prewarm and unpin; pins; top; verify, gc, purge, du and stats; learned users.
ALL: list[ModuleType] = [prewarm, pins, top, store, users]
