"""The admin modules mounted on the debug listener (one concern each)."""

from __future__ import annotations

from types import ModuleType

ALL: list[ModuleType] = []
