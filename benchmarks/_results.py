"""What every benchmark does around its measurement: a scratch directory, then its results."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, TypeVar

T = TypeVar("T")


def in_scratch(parent: str, prefix: str, measure: Callable[[Path], T]) -> T:
    """``measure`` run in a fresh directory under ``parent`` (the disk measured), deleted after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        return measure(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def publish(out: str, name: str, report: Dict[str, Any], text: str) -> None:
    """Print the table and keep it, with the raw figures, in ``out/name.md`` and ``.json``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / f"{name}.md").write_text(text + "\n")
    print(text)
