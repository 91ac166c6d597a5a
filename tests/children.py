"""The child processes of this pytest process, read from /proc (no psutil), for the
check in conftest.py that no test leaves one behind alive or unreaped.

Session-long children are not a test's: the moto server of the session (its fixture
adds its PID to :data:`SESSION`), and multiprocessing's forkserver and resource tracker
(started once, on first use, and kept for the session by design).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Set

#: PIDs of children that live for the whole session (added by the fixtures that start them).
SESSION: Set[int] = set()

_MULTIPROCESSING_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
_GRACE = 10.0  # seconds a child that is on its way out gets before it counts as left behind


def _pids() -> Set[int]:
    """This process's children, from every thread's ``children`` list (or a scan of /proc)."""
    tasks = list(Path("/proc/self/task").glob("*/children"))
    if tasks:
        pids: Set[int] = set()
        for f in tasks:
            try:
                pids.update(int(p) for p in f.read_text().split())
            except OSError:  # the thread ended meanwhile
                continue
        return pids
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.add(int(stat.parent.name))
    return found


def _describe(pid: int) -> str:
    """``"PID STATE command line"`` (STATE Z: exited, never reaped), or "" once it is gone."""
    try:
        state = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() or ["?"])[0]
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
    return f"{pid} {state} {cmd[:300]}"


def of_pytest() -> Dict[int, str]:
    """Every live or unreaped child of this process: PID -> description."""
    described = {pid: _describe(pid) for pid in _pids()}
    return {pid: text for pid, text in described.items() if text}


def _foreign(before: Dict[int, str]) -> Dict[int, str]:
    now = of_pytest()
    return {pid: text for pid, text in now.items()
            if pid not in before and pid not in SESSION and not any(h in text for h in _MULTIPROCESSING_HELPERS)}


def left_behind(before: Dict[int, str]) -> List[str]:
    """The children started since ``before`` that are still there: alive, or exited and
    never waited for. Those on their way out get a few seconds (polled, no fixed wait):
    a data loader's workers go once their iterator is collected."""
    left = _foreign(before)
    if not left:
        return []
    gc.collect()
    multiprocessing.active_children()  # reaps the multiprocessing children that ended
    deadline = time.monotonic() + _GRACE
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _foreign(before)
    return sorted(left.values())


def kill(descriptions: List[str]) -> None:
    """SIGKILL and reap the children :func:`left_behind` named, so that the next test starts clean."""
    for text in descriptions:
        pid = int(text.split()[0])
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            continue
