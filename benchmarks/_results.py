"""What every benchmark does around its measurement: its command line, a scratch
directory, then its results."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

T = TypeVar("T")

#: Where results are kept by default: ``benchmarks/results``.
RESULTS = Path(__file__).resolve().parent / "results"


def parser(name: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.NAME``, described by the first line of
    its docstring; add its own options, then :func:`parse_args`."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=(doc or "").split("\n")[0])


def parse_args(p: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """``argv`` parsed, after the options every benchmark takes: ``--dir`` (the disk
    measured) and ``--out`` (where :func:`publish` keeps the results)."""
    p.add_argument("--dir", default=".", help="where to write (default: current directory)")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    _RUN.update(command=" ".join([p.prog] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
                uptime_before=uptime())
    return args


#: The command line and ``uptime`` of this run, written beside its results by :func:`publish`.
_RUN: Dict[str, str] = {}


def uptime() -> str:
    """``uptime``'s line (the machine's load: figures from a loaded machine say so)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
    report = {**report, **_RUN, "uptime_after": uptime()}
    text += "".join(f"\n\n{label}: `{report[key]}`" for key, label in
                    (("command", "Command"), ("uptime_before", "uptime before"), ("uptime_after", "uptime after"))
                    if key in report)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / f"{name}.md").write_text(text + "\n")
    print(text)
