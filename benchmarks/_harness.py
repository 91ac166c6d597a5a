"""Benchmark plumbing: the machine's description, cold caches, peak memory, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch


def describe_machine(directory: Path) -> Dict[str, Any]:
    """What the figures depend on: CPU, memory, the filesystem written to, versions, load."""
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": round(_meminfo("MemTotal") / 2**30, 1),
        "filesystem": _filesystem(directory), "kernel": platform.release(),
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _filesystem(directory: Path) -> str:
    """Mount point, type and device of the filesystem holding ``directory``."""
    best = ("?", "?", "?")
    try:
        target = str(directory.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (device, mount, kind)
    except OSError:
        pass
    return f"{best[2]} on {best[0]} (mounted at {best[1]})"


def cold(paths: Iterable[Path]) -> str:
    """Evict ``paths`` from the page cache: drop_caches where permitted, else fadvise.
    Returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return "echo 3 > /proc/sys/vm/drop_caches"
    except OSError:
        pass
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "posix_fadvise(DONTNEED) on each file"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- peak memory -------------------------------------------------------------------------

def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_during(fn: Callable[[], Any]) -> Dict[str, Any]:
    """Resident bytes ``fn`` added at its peak: all of them (VmHWM, mapped file pages
    included) and anonymous memory alone (RssAnon, sampled every millisecond)."""
    exact = reset_peak()
    base, base_anon = status_bytes("VmRSS"), status_bytes("RssAnon")
    hwm_before = status_bytes("VmHWM")
    anon = [base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            anon.append(status_bytes("RssAnon"))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    hwm = status_bytes("VmHWM")
    anon.append(status_bytes("RssAnon"))
    found: Dict[str, Any] = {"extra_anon_bytes": max(0, max(anon) - base_anon)}
    if not exact and hwm <= hwm_before:
        found.update(extra_bytes=None, note="peak hidden by setup (VmHWM not resettable)")
    else:
        found["extra_bytes"] = max(0, hwm - base)
    return found


def run_child(module: str, args: List[str], timeout: float = 1800) -> Dict[str, Any]:
    """Run ``python -m module args`` and parse the JSON object on its last stdout line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# -- tables --------------------------------------------------------------------------

def fmt_seconds(value: Optional[float]) -> str:
    return "—" if value is None or value != value else f"{value:.3f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None or value != value else f"{value:.2f}×"


def fmt_bytes(value: Optional[float], state: int) -> str:
    if value is None:
        return "—"
    return f"{value / state:.2f}× ({value / 2**20:.0f} MiB)"


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
