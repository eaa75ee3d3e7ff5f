"""Every operator command, in the order `mirror --help` lists them."""

from __future__ import annotations

from types import ModuleType

from mirror.commands import prewarm, store, top, users

#: prewarm and unpin; top; verify, gc, purge, du and stats; learned users.
ALL: list[ModuleType] = [prewarm, top, store, users]
