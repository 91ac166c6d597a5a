"""``ckpt ls`` (plain, ``--json``, ``--verify``) on a healthy directory that a real
writer process rotates meanwhile: a file the writer's retention deleted, or committed,
between the listing and the reading is not damage (hardening round)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from ckpt.catalog import history
from ckpt.cli import main
from ckpt.storage.local import LocalStore

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import sys, torch
from pathlib import Path
from ckpt import CheckpointManager
directory, stop = Path(sys.argv[1]), Path(sys.argv[2])
model = torch.nn.Linear(64, 64)
mgr = CheckpointManager(directory, model=model, keep_last=2)
step = 0
while not stop.exists() and step < 5000:
    step += 1
    mgr.save(epoch=step // 10, step=step, mid_epoch=step % 10 != 0, metrics={"loss": 1.0 / step})
mgr.close()
"""


@pytest.mark.slow
def test_ls_never_reports_damage_while_a_writer_rotates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, stop = tmp_path / "run", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(stop)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    bad: List[Tuple[List[str], str]] = []
    runs: Dict[str, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not (run / "ckpt-history.jsonl").exists() or len(history.read(LocalStore(run, create=False))) < 3:
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start saving"
            time.sleep(0.05)
        store = LocalStore(run, create=False)
        start = len(history.read(store))
        variants = [["ls", str(run)], ["ls", str(run), "--json"], ["ls", str(run), "--verify"],
                    ["ls", str(run), "--json", "--verify"]]
        i = 0
        while len(history.read(store)) < start + 150 or i < 60:
            assert writer.poll() is None and time.monotonic() < deadline, (i, writer.returncode)
            args = variants[i % len(variants)]
            code = main(args)
            out = capsys.readouterr()
            runs[" ".join(args[2:])] = runs.get(" ".join(args[2:]), 0) + 1
            if code != 0 or "DAMAGED" in out.out or "MISSING" in out.out or '"damaged"' in out.out \
                    or '"missing"' in out.out:
                bad.append((args, out.out + out.err))
            i += 1
    finally:
        stop.touch()
        try:
            _, err = writer.communicate(timeout=120)
        finally:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    assert not bad, f"{len(bad)} of {i} runs reported damage; first: {bad[0]}"
    assert all(n >= 10 for n in runs.values()), runs
