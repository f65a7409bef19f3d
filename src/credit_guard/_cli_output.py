"""How the CLI prints: JSON, aligned tables, and text made safe for a terminal."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def shown(value: object) -> str:
    """Text safe to put on a terminal: control and format characters (an ANSI escape, a
    newline that would forge a table row, a right-to-left override) are shown escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Collection[int] = ()) -> str:
    cells = [list(headers), *[[shown(value) for value in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    )
