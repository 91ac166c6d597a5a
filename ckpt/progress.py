"""Byte progress bars for long saves and loads (tqdm)."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

#: Below this many bytes no bar is shown, even on a terminal.
THRESHOLD = 256 << 20


class Progress:
    """A tqdm byte bar, or nothing.

    ``enabled``: True always shows a bar, False never, None (default) shows one only on
    a terminal and only for at least :data:`THRESHOLD` bytes.
    """

    def __init__(self, desc: str, total: int, enabled: Optional[bool]) -> None:
        show = enabled if enabled is not None else (total >= THRESHOLD and sys.stderr.isatty())
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         leave=False, dynamic_ncols=True) if show else None

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
