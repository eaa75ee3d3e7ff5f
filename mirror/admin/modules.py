"""The admin modules mounted on the debug listener (one concern each)."""

from __future__ import annotations

from types import ModuleType

from mirror.admin import jobs, notify, status, store

#: prewarm, jobs, pins and top; notifications in; verify, gc, purge, du and stats; the status page.
ALL: list[ModuleType] = [jobs, notify, store, status]
