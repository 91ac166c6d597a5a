"""Aligned plain-text tables for the terminal."""

from __future__ import annotations

from typing import List, Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> List[str]:
    """Lines of a table: a header, a rule, then the rows; columns in ``right`` are
    right-aligned (numbers), the others left-aligned. Trailing spaces are dropped."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def size(n: int) -> str:
    """Bytes for a person: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable


def age(seconds: float) -> str:
    """How long ago: ``45s``, ``12m``, ``3h``, ``2d``."""
    s = max(0.0, seconds)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{int(s // span)}{unit}"
    return f"{int(s)}s"


def number(value: float) -> str:
    return f"{value:.6g}"
