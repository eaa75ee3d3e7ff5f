"""Operator subcommands of `mirror` other than `serve`.

Each module exposes `register(subparsers)` which adds its parser and sets
`func=run` on it; commands acting on a running node talk to its admin API
through :mod:`mirror.admin.client`. The list itself is :data:`ALL` in
:mod:`mirror.commands.registry` (kept apart so importing a command module
never imports its siblings).
"""
