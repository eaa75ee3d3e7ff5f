"""Operator subcommands of `mirror` other than `serve`.

Each module exposes `register(subparsers)` which adds its parser and sets
`func=run` on it; commands acting on a running node talk to its admin API
through :mod:`mirror.admin.client`.
"""

from __future__ import annotations

from types import ModuleType

ALL: list[ModuleType] = []
