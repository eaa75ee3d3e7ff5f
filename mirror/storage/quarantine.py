"""What `verify` and the start-up repair set aside: listing and emptying `quarantine/`.

A quarantined object is never served again (the next request refetches it);
its file is kept only so an operator can look at what went wrong. Nothing
removes it by itself, so `mirror quarantine --empty` does, once looked at.
Names are `<alg>-<hex>.<unix time>.<random>` (see :func:`path_for`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One file in `quarantine/`."""

    name: str
    digest: str | None  # None for a name this code did not write
    size: int
    quarantined_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse(name: str, size: int) -> Quarantined:
    stem, _, rest = name.partition(".")
    algorithm, _, hex_ = stem.partition("-")
    when = rest.partition(".")[0]
    return Quarantined(name, f"{algorithm}:{hex_}" if algorithm and hex_ else None, size,
                       float(when) if when.isdigit() else None)


def list_quarantine(root: Path) -> list[Quarantined]:
    """Files under `<root>/quarantine`, oldest first (blocking)."""
    found = []
    try:
        entries = list(os.scandir(root / "quarantine"))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                found.append(_parse(entry.name, entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:  # emptied meanwhile
            continue
    return sorted(found, key=lambda q: (q.quarantined_at or 0, q.name))


def empty_quarantine(root: Path) -> tuple[int, int]:
    """Delete every quarantined file; (files, bytes) removed (blocking)."""
    files = size = 0
    for item in list_quarantine(root):
        try:
            os.unlink(root / "quarantine" / item.name)
        except FileNotFoundError:
            continue
        files += 1
        size += item.size
    return files, size


def report(root: Path) -> dict[str, Any]:
    """`{"objects": [...], "count", "bytes"}` for the admin API and the CLI."""
    items = list_quarantine(root)
    return {"objects": [i.as_dict() for i in items], "count": len(items), "bytes": sum(i.size for i in items)}
