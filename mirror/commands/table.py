"""Aligned tables and terminal colour for the commands' human output.

Colour is used only when the output is a terminal and `NO_COLOR` is unset
(https://no-color.org): piped output and files stay plain text, and scripts
should read `--json` anyway.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

STYLES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33"}


def colour_wanted(stream: TextIO | None = None) -> bool:
    """True when `stream` (stdout by default) is a terminal and NO_COLOR is not set."""
    stream = stream or sys.stdout
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def paint(text: str, style: str | None, colour: bool) -> str:
    """`text` in `style` (a key of STYLES) when colour is on; unchanged otherwise."""
    if not colour or not style:
        return text
    return f"\x1b[{STYLES[style]}m{text}\x1b[0m"


def ratio_style(ratio: float | None) -> str | None:
    """Green from 80 %, yellow from 50 %, red below: how a hit ratio should look."""
    if ratio is None:
        return None
    return "green" if ratio >= 0.8 else "yellow" if ratio >= 0.5 else "red"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = (),
          styles: Sequence[Sequence[str | None]] | None = None, colour: bool = False) -> str:
    """Columns padded to their widest cell (two spaces apart); `right` columns right-aligned.

    Widths are measured on the plain text, and colour (`styles[row][column]`,
    bold headers) is added after padding, so the columns line up either way.
    An empty `headers` prints the rows only.
    """
    columns = max([len(headers), *(len(r) for r in rows)])
    widths = [max([len(headers[i]) if i < len(headers) else 0, *(len(r[i]) for r in rows if i < len(r))])
              for i in range(columns)]

    def line(cells: Sequence[str], cell_styles: Sequence[str | None]) -> str:
        out = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - len(cell))
            painted = paint(cell, cell_styles[i] if i < len(cell_styles) else None, colour)
            if i in right:
                out.append(pad + painted)
            else:
                out.append(painted if i == len(cells) - 1 else painted + pad)
        return "  ".join(out)

    lines = [line(headers, ["bold"] * len(headers))] if headers else []
    for index, row in enumerate(rows):
        lines.append(line(row, styles[index] if styles else ()))
    return "\n".join(lines)
