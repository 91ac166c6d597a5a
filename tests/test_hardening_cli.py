"""The CLI's destructive commands under the mistakes users make (issue 28, item 4):
``ckpt prune`` with typos, wrong values and a wrong metric (dry run and ``--yes``),
``ckpt export --to`` and ``ckpt plot -o`` onto files they must not replace, and prune
on a directory a real writer process is saving into.

Every refused command exits 2 with one ``ckpt: error:`` line and leaves the run
directory byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from helpers import read_line

import ckpt
from ckpt import CheckpointManager
from ckpt.cli import main as _main

ROOT = Path(__file__).resolve().parent.parent


def main(argv: List[str]) -> int:
    """``ckpt ARGV``'s exit status (argparse's own errors exit through SystemExit)."""
    try:
        return _main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def tree(directory: Path) -> Dict[str, str]:
    """Every file under ``directory`` (but the lock) -> a digest of its bytes."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".ckpt.lock"}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    with CheckpointManager(directory, model=torch.nn.Linear(2, 2)) as mgr:
        for epoch in range(5):
            mgr.save(epoch=epoch, metrics={"val_loss": 0.1 if epoch == 2 else 5.0 - epoch, "acc": epoch / 10})
    return directory


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), err
    assert "Traceback" not in err and "bug in ckpt" not in err, err
    return lines[0]


PRUNE_MISTAKES = [
    (["--keep-lats", "2"], "unrecognized arguments: --keep-lats 2"),
    (["--keep-last", "two"], "invalid int value: 'two'"),
    (["--keep-last", "-1"], "keep_last must be 0 or more, got -1"),
    (["--keep-last", "1.5"], "invalid int value: '1.5'"),
    (["--keep-best", "1"], "keep_best needs monitor"),
    (["--keep-best", "1", "--monitor", "val_loss", "--mode", "mni"], "invalid choice: 'mni'"),
    (["--keep-best", "1", "--monitor", "Val_loss"], "did you mean --monitor val_loss?"),
    (["--keep-best", "1", "--monitor", "val_los"], "did you mean --monitor val_loss?"),
    (["--keep-best", "1", "--monitor", "loss"], "no checkpoint of the run records the monitored metric 'loss'"),
    (["--keep-best", "1", "--monitor", ""], "keep_best needs monitor"),
    (["--keep-every", "0"], "keep_every must be 1 or more, got 0"),
    ([], "say what to keep"),
]


@pytest.mark.parametrize("yes", [False, True], ids=["dry-run", "yes"])
@pytest.mark.parametrize(("args", "message"), PRUNE_MISTAKES, ids=[" ".join(a) or "nothing" for a, _ in PRUNE_MISTAKES])
def test_prune_mistakes_are_refused_and_delete_nothing(run: Path, capsys: pytest.CaptureFixture[str],
                                                       args: List[str], message: str, yes: bool) -> None:
    before = tree(run)
    assert main(["prune", str(run), *args, *(["--yes"] if yes else [])]) == 2
    assert message in _error(capsys)
    assert tree(run) == before


@pytest.mark.parametrize("where", ["a typo of the directory", "a checkpoint file", "the index file"])
def test_prune_on_the_wrong_path_is_refused_and_creates_nothing(run: Path, capsys: pytest.CaptureFixture[str],
                                                                where: str) -> None:
    target = {"a typo of the directory": run.parent / "rnu", "a checkpoint file": run / "ckpt-e000004-s000000000.pt",
              "the index file": run / "ckpt-index.json"}[where]
    before = tree(run.parent)
    assert main(["prune", str(target), "--keep-last", "1", "--yes"]) == 2
    assert str(target) in _error(capsys)
    assert tree(run.parent) == before and sorted(os.listdir(run.parent)) == ["run"]


def test_a_dry_run_deletes_nothing_and_yes_deletes_exactly_what_it_listed(run: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(run)
    policy = ["--keep-last", "1", "--keep-best", "1", "--monitor", "val_loss"]
    assert main(["prune", str(run), *policy]) == 0
    plan = capsys.readouterr().out
    assert tree(run) == before and "nothing deleted: add --yes" in plan
    listed = {name for name in before if name.startswith("ckpt-e") and name in plan}
    assert listed == {"ckpt-e000000-s000000000.pt", "ckpt-e000001-s000000000.pt", "ckpt-e000003-s000000000.pt"}
    assert main(["prune", str(run), *policy, "--yes"]) == 0
    left = {name for name in tree(run) if name.startswith("ckpt-e")}
    assert left == {"ckpt-e000002-s000000000.pt", "ckpt-e000004-s000000000.pt"}  # the best and the newest
    assert main(["prune", str(run), *policy, "--yes"]) == 0  # again: nothing more to delete
    assert "nothing to delete" in capsys.readouterr().out


# -- outputs that would replace what they must not --------------------------------------


def test_export_onto_its_own_source_is_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 28: `ckpt export model.pt --to model.pt` replaced a save_model file (the
    # architecture load_model rebuilds from) by its bare weights
    model_file = ckpt.save_model(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    plain = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    for source in (model_file, plain):
        before = source.read_bytes()
        assert main(["export", str(source), "--to", str(source)]) == 2
        assert "is the file being exported" in _error(capsys)
        assert source.read_bytes() == before
    assert ckpt.load_model(model_file).in_features == 2


@pytest.mark.parametrize("kind", ["a model file", "a copy of a checkpoint"])
def test_export_onto_a_checkpoint_or_model_file_outside_a_run_is_refused(run: Path, tmp_path: Path, kind: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "keep.pt"
    if kind == "a model file":
        ckpt.save_model(torch.nn.Linear(2, 2), target)
    else:
        target.write_bytes((run / "ckpt-e000001-s000000000.pt").read_bytes())  # a backup, outside the run
    before = target.read_bytes()
    assert main(["export", str(run / "ckpt-e000004-s000000000.pt"), "--to", str(target)]) == 2
    assert "holds a ckpt checkpoint or model file" in _error(capsys)
    assert target.read_bytes() == before


def test_export_replaces_a_previous_export(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights.pt"
    for epoch in (3, 4):
        assert main(["export", str(run / f"ckpt-e{epoch:06d}-s000000000.pt"), "--to", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)) == {"weight", "bias"}


@pytest.mark.parametrize("name", ["ckpt-e000004-s000000000.pt", "model.pt", "curve.jpeg2000"])
def test_plot_to_a_format_matplotlib_cannot_write_is_a_usage_error(run: Path, tmp_path: Path, name: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    # was "unexpected ValueError: Format 'pt' is not supported ... this is a bug in ckpt"
    out = (run if name.startswith("ckpt-e") else tmp_path) / name
    before = tree(run)
    assert main(["plot", str(run), "--metric", "val_loss", "-o", str(out)]) == 2
    assert "matplotlib cannot write" in _error(capsys)
    assert tree(run) == before and (name.startswith("ckpt-e") or not out.exists())


# -- prune while a real writer saves ----------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from ckpt import CheckpointManager
    model = torch.nn.Linear(64, 64)
    frozen = torch.nn.Linear(256, 256)  # 256 KiB: a pack every checkpoint shares when differential
    with CheckpointManager(sys.argv[1], model=model, frozen=frozen, progress=False,
                           differential=sys.argv[3] == "differential") as mgr:  # keeps everything itself
        start = mgr.resume()
        for epoch in range(start, start + int(sys.argv[2])):
            torch.nn.init.constant_(model.weight, float(epoch))
            mgr.save(epoch=epoch, metrics={"val_loss": float(epoch % 7)})
            print(epoch, flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "differential"])
def test_prune_yes_while_a_writer_saves_never_breaks_the_writer_or_the_run(tmp_path: Path, kind: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), "150", kind], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    prunes: List[int] = []
    try:
        assert read_line(writer) == "0"
        deadline = time.monotonic() + 90
        while writer.poll() is None and time.monotonic() < deadline:
            before = tree(directory)
            assert main(["prune", str(directory), "--keep-best", "1", "--monitor", "val_lss", "--yes"]) == 2
            capsys.readouterr()
            gone = {n for n in before if n.startswith("ckpt-e")} - set(tree(directory))
            assert not gone, gone  # the refused typo deleted nothing (the writer only adds)
            prunes.append(main(["prune", str(directory), "--keep-last", "2", "--keep-best", "1",
                                "--monitor", "val_loss", "--yes"]))
            out = capsys.readouterr()
            assert "Traceback" not in out.err, out.err
        out_, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, err[-3000:]  # the writer never saw the prunes as damage or conflict
    assert len(prunes) >= 3 and set(prunes) <= {0}, prunes
    assert main(["prune", str(directory), "--keep-last", "2", "--keep-best", "1", "--monitor", "val_loss",
                 "--yes"]) == 0
    capsys.readouterr()
    assert main(["ls", str(directory), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["checkpoints"]
    epochs = [c["epoch"] for c in listing]
    assert epochs[-2:] == [148, 149] and len(epochs) <= 4, epochs  # the newest kept; best 0.0s: the first
    assert main(["verify", str(directory)]) == 0
    assert not [p for p in directory.iterdir() if p.name.startswith(".ckpt-tmp")]
    fresh = torch.nn.Linear(64, 64)
    assert CheckpointManager(directory, model=fresh, frozen=torch.nn.Linear(256, 256)).resume() == 150
    assert torch.equal(fresh.weight, torch.full_like(fresh.weight, 149.0))
