"""Nothing grows with the number of saves (issue 28, item 6): open files
(``/proc/self/fd``), threads (``/proc/self/task``) and resident memory after many async
saves and after many checkpoints with a small ``keep_last``; and managers under a
process group that save sharded and resume free what they open.

The measurements run in a child interpreter (the test process's own allocations would
blur the RSS), each mode after its own warm-up, so the first save's one-time costs (the
staging buffers, the writer thread) are not counted. The default versions share one
child for the three modes (one torch import, not three) and make 100 saves each: a
copy of the model's state kept per save (411 KiB with AdamW's moments) would grow the
RSS by 40 MiB, over the 16 MiB allowed; a file or a thread per save shows after two.
The ``stress`` ones run the counts of the issue (1,000 async saves, 10,000 checkpoints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd and task")

ROOT = Path(__file__).resolve().parent.parent

LOOP = textwrap.dedent("""
    import gc, json, os, sys, torch
    from ckpt import CheckpointManager

    def counts():
        gc.collect()
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task")),
                "rss_kib": rss}

    def measure(directory, mode, n):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 8))  # 128 KiB: a pack
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mgr = CheckpointManager(directory, model=model, optimizer=opt, keep_last=3, progress=False,
                                async_save=mode == "async", differential=mode == "differential")
        step = 0

        def saves(k):
            nonlocal step
            for _ in range(k):
                step += 1
                with torch.no_grad():
                    model[1].weight.add_(1.0)
                mgr.save(epoch=0, step=step, mid_epoch=True, metrics={"loss": 1.0 / step})

        saves(50)  # warm-up: buffers, the writer thread, the index's first journal fold
        mgr.wait()
        before = counts()
        saves(n)
        mgr.wait()
        after = counts()
        files = sorted(os.listdir(directory))
        mgr.close()
        fresh = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 8))
        with CheckpointManager(directory, model=fresh) as again:
            again.resume()
            steps = [r.step for r in again.checkpoints]
        return {"before": before, "after": after, "files": files, "steps": steps,
                "restored": torch.equal(fresh[1].weight, model[1].weight)}

    root, n = sys.argv[1], int(sys.argv[3])
    for mode in sys.argv[2].split(","):  # one mode after the other, each its own line
        print(json.dumps({"mode": mode, **measure(os.path.join(root, mode), mode, n)}), flush=True)
""")


def _loop(directory: Path, modes: List[str], n: int, timeout: float) -> Dict[str, Dict[str, Any]]:
    """Each mode's figures, measured one after the other in one child interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOOP, str(directory), ",".join(modes), str(n)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    outs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [out["mode"] for out in outs] == modes, done.stdout
    for out in outs:
        print(out["mode"], n, out["before"], out["after"])  # the figures, with -s
    return {out["mode"]: out for out in outs}


def _check(out: Dict[str, Any], n: int, rss_mib: int) -> None:
    before, after = out["before"], out["after"]
    assert after["fds"] <= before["fds"] + 1, out  # not one per save
    assert after["threads"] <= before["threads"] + 1, out
    assert after["rss_kib"] - before["rss_kib"] <= rss_mib << 10, out
    assert out["steps"] == [48 + n, 49 + n, 50 + n], out["steps"]  # keep_last=3 held
    assert out["restored"]
    checkpoints = [f for f in out["files"] if f.startswith("ckpt-e")]
    assert len(checkpoints) == 3 and not [f for f in out["files"] if f.startswith(".ckpt-tmp")], out["files"]


MODES = ["async", "sync", "differential"]


@pytest.fixture(scope="module")
def hundred_saves(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, Any]]:
    """100 saves in each mode, measured in one child (a torch import, not one per mode)."""
    return _loop(tmp_path_factory.mktemp("leaks"), MODES, 100, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_hundred_saves_leak_no_file_thread_or_memory(hundred_saves: Dict[str, Dict[str, Any]],
                                                       mode: str) -> None:
    _check(hundred_saves[mode], 100, rss_mib=16)


@pytest.mark.stress
@pytest.mark.parametrize(("mode", "n"), [("async", 1000), ("sync", 10_000), ("differential", 1000)])
def test_thousands_of_saves_leak_no_file_thread_or_memory(tmp_path: Path, mode: str, n: int) -> None:
    out = _loop(tmp_path / "run", [mode], n, timeout=3600)[mode]
    _check(out, n, rss_mib=32)


# -- managers under a process group ----------------------------------------------------


def _counts() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _sharded_managers(rank: int, world: int, directory: str, n: int) -> list[tuple[int, int]]:
    from helpers import fsdp_mlp

    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    seen = []
    for i in range(n):
        with CheckpointManager(directory, model=model, optimizer=opt, keep_last=2, collective_timeout=30) as mgr:
            mgr.resume()
            mgr.save(epoch=i)
        seen.append(_counts())
    return seen


@pytest.mark.slow
def test_managers_saving_sharded_and_resuming_under_a_process_group_leak_nothing(tmp_path: Path) -> None:
    from dist_harness import run

    for seen in run(_sharded_managers, 2, str(tmp_path / "run"), 12, timeout=180):
        (fds0, threads0), (fds, threads) = seen[3], seen[-1]
        assert fds <= fds0 + 1 and threads <= threads0 + 1, seen
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("ckpt-e")) == [
        "ckpt-e000010-s000000000.dcp", "ckpt-e000011-s000000000.dcp"]

