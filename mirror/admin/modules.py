"""The admin modules mounted on the debug listener (one concern each)."""

from __future__ import annotations

from types import ModuleType

ALL: list[ModuleType] = []

from mirror.admin import jobs, notify  # noqa: E402  (prewarm/jobs/pins/top; notifications in)

ALL += [jobs, notify]

from mirror.admin import store  # (verify, gc, purge, du, stats)

ALL += [store]
