"""Operator subcommands of `mirror` other than `serve`.

Each module exposes `register(subparsers)` which adds its parser and sets
`func=run` on it; commands acting on a running node talk to its admin API
through :mod:`mirror.admin.client`.
"""

from __future__ import annotations

from types import ModuleType

ALL: list[ModuleType] = []

from mirror.commands import prewarm, top  # noqa: E402  (prewarm + unpin; top)

ALL += [prewarm, top]

from mirror.commands import store  # (verify, gc, purge, du, stats)

ALL += [store]
