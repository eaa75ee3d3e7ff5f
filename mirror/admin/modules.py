"""The admin modules mounted on the debug listener (one concern each)."""

from __future__ import annotations

from types import ModuleType

from mirror.admin import jobs, notify, status, store, users

#: prewarm, jobs, pins and top; notifications in; verify, gc, purge, du and stats; the status page;
#: learned users.
ALL: list[ModuleType] = [jobs, notify, store, status, users]
