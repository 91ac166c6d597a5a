"""The command line on real run directories: every command as a user runs it (a
subprocess: exit status, stdout, stderr), plus in-process calls of ``main`` for the
cases that need no fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.catalog import Catalog, history
from ckpt.cli import main, parser
from ckpt.cli.listing import reasons, settled
from ckpt.policy import RetentionPolicy
from ckpt.storage.local import LocalStore
from ckpt.verdicts import Detail

ROOT = Path(__file__).resolve().parent.parent
VALS = [0.9, 0.5, 0.2, 0.6, 0.7, 0.4, 0.8, 0.75]  # best: epoch 2; milestones (keep_every=4): 3, 7
KEPT = ["ckpt-e000002-s000000030.pt", "ckpt-e000003-s000000040.pt", "ckpt-e000006-s000000070.pt",
        "ckpt-e000007-s000000080.pt"]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> Tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def make_run(directory: Path, epochs: int = len(VALS)) -> CheckpointManager:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, keep_last=2, keep_best=1,
                            monitor="val_loss", keep_every=4)
    for epoch in range(epochs):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        mgr.save(epoch=epoch, step=10 * (epoch + 1), metrics={"val_loss": VALS[epoch], "acc": 1 - VALS[epoch]},
                 extra={"note": "hello"})
    return mgr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run, shared read-only by the tests that do not change it."""
    directory = tmp_path_factory.mktemp("run")
    make_run(directory).close()
    return directory


def assert_clean_error(out: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """One line `ckpt: error: ...` with a hint, no traceback, no warning text."""
    assert_one_line(out.returncode, out.stderr, code, *words)


def fails(capsys: pytest.CaptureFixture[str], code: int, args: List[str], *words: str) -> None:
    """:func:`assert_clean_error` of an in-process run."""
    try:
        got = main(args)
    except SystemExit as e:  # argparse's errors
        got = int(e.code or 0)
    assert_one_line(got, capsys.readouterr().err, code, *words)


def assert_one_line(got: int, stderr: str, code: int, *words: str) -> None:
    assert got == code, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: ") and "hint" in lines[0], stderr
    assert "Traceback" not in stderr and "Warning" not in stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- ls ------------------------------------------------------------------------------

def test_ls_is_an_aligned_table_that_says_why_each_is_kept(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli("ls", str(run_dir))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["file", "epoch", "step", "metrics", "size", "age", "kept", "because", "status"]
    assert set(lines[1]) <= {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:2 + len(KEPT)]}
    assert list(rows) == KEPT
    starts = {line.index("KiB") for line in rows.values()}  # the size column lines up
    assert len(starts) == 1
    assert "best" in rows[KEPT[0]] and "milestone" in rows[KEPT[1]] and "last-2" in rows[KEPT[2]]
    assert "latest" in rows[KEPT[3]] and "milestone" in rows[KEPT[3]]
    assert "val_loss=0.2 " in rows[KEPT[0]]
    assert "keep_last=2, keep_best=1 (val_loss, min), keep_every=4 (recorded by the manager)" in out.stdout
    ages = re.compile(r" +[0-9]+[smhd] ")
    assert ages.sub(" ", run_main(capsys, "list", str(run_dir))[1]) == ages.sub(" ", out.stdout)  # the alias


def test_ls_json_and_a_policy_given_on_the_command_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "ls", "--json", str(run_dir))
    data = json.loads(out)
    assert code == 0 and data["policy_source"] == "recorded by the manager"
    assert [c["file"] for c in data["checkpoints"]] == KEPT
    assert data["checkpoints"][0]["kept_because"] == ["best"]
    assert data["checkpoints"][3]["kept_because"] == ["latest", "last-2", "milestone"]
    assert {c["status"] for c in data["checkpoints"]} == {"ok"} and data["problems"] == []
    code, out, _ = run_main(capsys, "ls", str(run_dir), "--keep-last", "1")
    assert "prune would delete" in out and "(command line)" in out


def test_ls_flags_damaged_missing_and_unindexed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path).close()
    truncated, flipped, gone = (tmp_path / KEPT[0], tmp_path / KEPT[1], tmp_path / KEPT[2])
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    gone.unlink()
    (tmp_path / "ckpt-e000009-s000000100.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.txt").write_text("a foreign file")
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")  # foreign files are no business of ls
    out = cli("ls", str(tmp_path))
    assert out.returncode == 1 and out.stderr == "", out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:] if line.startswith("ckpt-")}
    assert "DAMAGED: 1000 bytes on disk" in rows[KEPT[0]]
    assert "MISSING" in rows[KEPT[2]]
    assert "DAMAGED: not in the index" in rows["ckpt-e000009-s000000100.pt"]
    assert "notes.txt" not in out.stdout and "model.pt" not in out.stdout
    assert "DAMAGED" not in rows[KEPT[1]]  # a flipped byte needs the checksum: --verify
    code, verified, _ = run_main(capsys, "ls", "--verify", str(tmp_path))
    assert code == 1 and "DAMAGED: checksum mismatch" in verified
    assert "verified" in verified  # the intact latest one


def test_ls_shows_the_verdicts_own_short_detail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The status column is the verdict's short form (the error's summary), never its text
    cut apart: a checksum mismatch's detail holds " (" before the words that matter."""
    make_run(tmp_path).close()
    flipped = tmp_path / KEPT[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    code, out, _ = run_main(capsys, "ls", "--verify", "--json", str(tmp_path))
    detail = {c["file"]: c["detail"] for c in json.loads(out)["checkpoints"]}[KEPT[1]]
    assert code == 1 and detail.startswith("checksum mismatch (recorded ") and "hint" not in detail, detail
    verdict = settled(Catalog(LocalStore(tmp_path)), True).status[KEPT[1]]
    assert verdict.detail == detail and isinstance(verdict.detail, Detail)
    assert verdict.detail.short(flipped) == "checksum mismatch: the file is damaged"
    code, out, _ = run_main(capsys, "ls", "--verify", str(tmp_path))
    rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.startswith("ckpt-")}
    assert code == 1 and rows[KEPT[1]].endswith("DAMAGED: checksum mismatch: the file is damaged"), out


def test_ls_notes_an_unreadable_index_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path, epochs=2).close()
    (tmp_path / "ckpt-index.json").write_text("{ torn")
    code, out, err = run_main(capsys, "ls", str(tmp_path))
    assert code == 0 and "ckpt-e000001-s000000020.pt" in out
    assert err.startswith("ckpt: note: ") and "index unreadable" in err and len(err.splitlines()) == 1, err
    assert "Warning" not in err


def test_ls_empty_and_missing_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "ls", str(tmp_path))[:2] == (0, f"{tmp_path}: no checkpoints\n")
    assert not any(tmp_path.iterdir())  # a reader creates nothing
    fails(capsys, 2, ["ls", str(tmp_path / "nope")], "no such directory")
    (tmp_path / "f.pt").write_text("x")
    fails(capsys, 2, ["ls", str(tmp_path / "f.pt")], "not a run directory", "ckpt show")


def test_reasons_follow_the_policy_rules() -> None:
    class R:
        def __init__(self, epoch: int, value: float) -> None:
            self.epoch, self.step, self.mid_epoch = epoch, epoch * 10, False
            self.metrics = {"loss": value}
            self.key = (self.epoch, self.step)

    records = [R(0, 3.0), R(1, 1.0), R(2, 2.0), R(3, 0.5), R(4, 4.0)]
    pol = RetentionPolicy(keep_last=1, keep_best=2, monitor="loss", keep_every=2)
    why = reasons(records, pol, protected=((2, 20),))  # type: ignore[arg-type]
    assert why[(4, 40)] == ["latest", "last-1"]
    assert why[(3, 30)] == ["best", "milestone"] and why[(1, 10)] == ["best-2", "milestone"]
    assert why[(2, 20)] == ["resume source"] and why[(0, 0)] == []
    assert reasons(records, None, ())[(0, 0)] == ["no retention"]  # type: ignore[arg-type]


# -- show ----------------------------------------------------------------------------

def test_show_header_objects_extra_and_tensors(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli("show", "--tensors", str(run_dir / KEPT[3]))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    text = out.stdout
    assert "ckpt checkpoint" in text and "epoch       7 (complete)" in text and "step        80" in text
    assert "val_loss=0.75" in text and "note  'hello'" in text
    objects = {line.split()[0]: line.split() for line in text.split("objects:")[1].split("extra:")[0].splitlines()
               if line.strip().startswith(("model", "optimizer"))}
    assert objects["model"][1:5] == ["state", "dict", "4", "104"]  # 12+4+8+2 floats
    assert objects["optimizer"][1:4] == ["optimizer", "4", "104"]
    tensors = text.split("tensors:")[1]
    assert "model.0.weight" in tensors and "(4, 3)" in tensors and "float32" in tensors
    assert "optimizer.state.0.momentum_buffer" in tensors
    code, alias, _ = run_main(capsys, "inspect", str(run_dir / KEPT[3]))
    assert code == 0 and alias.split("created")[0] == text.split("created")[0]


def test_show_plain_files_damage_and_directories(tmp_path: Path, run_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"model_state_dict": torch.nn.Linear(2, 3).state_dict(), "epoch": 4, "loss": 0.5}, plain)
    code, out, _ = run_main(capsys, "show", str(plain))
    assert code == 0 and "plain torch.save file" in out and "loss=0.5" in out
    assert "model_state_dict  state dict        2   36 B" in out
    code, out, _ = run_main(capsys, "show", "--json", "--tensors", str(plain))
    info = json.loads(out)
    assert info["tensors"][0] == {"name": "model_state_dict.weight", "shape": [3, 2], "dtype": "float32", "bytes": 24}
    damaged = tmp_path / KEPT[0]
    damaged.write_bytes((run_dir / KEPT[0]).read_bytes()[:-200])
    fails(capsys, 1, ["show", str(damaged)], str(damaged))
    fails(capsys, 2, ["show", str(run_dir)], "is a directory", "ckpt ls")


def test_show_refuses_a_malicious_pickle_without_running_it(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self) -> Tuple[object, Tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"w": torch.ones(2)}, "payload": Evil()}, evil)
    assert not marker.exists()
    out = cli("show", str(evil))
    assert_clean_error(out, 1, "refused to load", "system")
    assert not marker.exists()
    code, out_text, _ = run_main(capsys, "verify", str(evil))
    assert code == 1 and "unsafe" in out_text and not marker.exists()


# -- verify --------------------------------------------------------------------------

def test_verify_directory_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path).close()
    code, ok, err = run_main(capsys, "verify", str(tmp_path))
    assert code == 0 and ok.endswith("4 ok, 0 bad\n") and err == ""
    victim = tmp_path / KEPT[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / "ckpt-e000009-s000000100.pt").write_bytes(b"junk")
    bad = cli("verify", str(tmp_path))
    assert bad.returncode == 1 and bad.stderr == "", bad.stderr
    assert f"{KEPT[1]}: damaged (checksum mismatch" in bad.stdout and "3 ok, 2 bad" in bad.stdout
    assert "ckpt-e000009-s000000100.pt: damaged (not in the index" in bad.stdout
    code, out, _ = run_main(capsys, "verify", "--json", str(tmp_path))
    report = json.loads(out)
    assert code == 1 and report[KEPT[1]]["status"] == "damaged" and report[KEPT[0]] == {"status": "ok", "detail": ""}
    assert run_main(capsys, "verify", str(victim))[0] == 1
    assert run_main(capsys, "verify", str(tmp_path / KEPT[0]))[0] == 0
    fails(capsys, 2, ["verify", str(tmp_path / "nope")], "no such file")


WRITER = """
import sys, time, torch
from pathlib import Path
from ckpt import CheckpointManager
directory, stop = Path(sys.argv[1]), Path(sys.argv[2])
model = torch.nn.Linear(64, 64)
mgr = CheckpointManager(directory, model=model, keep_last=1)
step = 0
while not stop.exists() and step < 5000:
    step += 1
    mgr.save(epoch=0, step=step, mid_epoch=True, metrics={"loss": 1.0 / step})
mgr.close()
"""


@pytest.mark.slow
def test_verify_is_not_fooled_by_a_concurrent_writers_retention(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A writer saving with keep_last=1 deletes the previous file on every save; verify,
    run over and over meanwhile, must never report damage (exit 1)."""
    run, stop = tmp_path / "run", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(stop)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    store = LocalStore(run, create=False)
    try:
        deadline = time.monotonic() + 120
        while len(history.read(store) if run.is_dir() else []) < 3:
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start saving"
            time.sleep(0.05)
        start = len(history.read(store))
        codes: List[int] = []
        outs: Dict[int, str] = {}
        while len(history.read(store)) < start + 100 or len(codes) < 30:  # verify runs across many saves
            assert writer.poll() is None and time.monotonic() < deadline, (len(codes), writer.returncode)
            code, out, err = run_main(capsys, "verify", str(run))
            codes.append(code)
            outs[code] = out + err
        in_a_process = cli("verify", str(run))
        assert in_a_process.returncode == 0, in_a_process.stdout + in_a_process.stderr
        saves = len(history.read(store)) - start
    finally:
        stop.touch()
        try:
            _, err = writer.communicate(timeout=120)
        finally:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    assert set(codes) == {0}, outs
    assert saves >= 100 and len(codes) >= 30


# -- prune ---------------------------------------------------------------------------

def test_prune_prints_then_deletes_with_yes_under_the_lock(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path).close()
    code, out, err = run_main(capsys, "prune", str(tmp_path), "--keep-last", "1")
    assert code == 0 and err == "", err
    assert "would delete 3 of 4 checkpoints" in out and "nothing deleted: add --yes" in out
    assert sorted(p.name for p in tmp_path.glob("ckpt-e*.pt")) == KEPT
    done = cli("prune", str(tmp_path), "--keep-best", "1", "--monitor", "acc", "--mode", "max", "--yes")
    assert done.returncode == 0 and "deleted 2 checkpoints" in done.stdout, done.stdout + done.stderr
    left = [KEPT[0], KEPT[3]]  # best acc (epoch 2) and the newest, always kept
    assert sorted(p.name for p in tmp_path.glob("ckpt-e*.pt")) == left
    index = json.loads((tmp_path / "ckpt-index.json").read_text())
    assert [c["file"] for c in index["checkpoints"]] == left
    assert len(history.read(LocalStore(tmp_path, create=False))) == len(VALS)  # the history keeps every save
    fails(capsys, 2, ["prune", str(tmp_path)], "--keep-last")
    fails(capsys, 2, ["prune", str(tmp_path), "--keep-best", "1"], "monitor")


def test_prune_waits_for_a_writer_holding_the_lock(tmp_path: Path) -> None:
    make_run(tmp_path).close()
    lock = LocalStore(tmp_path, create=False).lock(commit=True)
    with lock:  # a writer committing
        prune = subprocess.Popen([sys.executable, "-m", "ckpt", "prune", str(tmp_path), "--keep-last", "1", "--yes"],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert prune.stderr is not None
            first = prune.stderr.readline()  # printed once it found the lock taken
            assert "waiting up to 60s for the directory's lock" in first, first
            assert sorted(p.name for p in tmp_path.glob("ckpt-e*.pt")) == KEPT  # nothing deleted meanwhile
        except BaseException:
            prune.kill()
            prune.wait()
            raise
    out, err = prune.communicate(timeout=120)
    assert prune.returncode == 0 and "deleted 3 checkpoints" in out, err
    assert [p.name for p in tmp_path.glob("ckpt-e*.pt")] == [KEPT[3]]


# -- diff ----------------------------------------------------------------------------

def test_diff_tensor_by_tensor(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli("diff", str(run_dir / KEPT[2]), str(run_dir / KEPT[3]))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "8 changed" in out.stdout and "max|diff|=" in out.stdout and "norm " in out.stdout
    assert "val_loss  0.8  0.75" in out.stdout and "step   70  80" in out.stdout
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"same": torch.ones(3), "changed": torch.tensor([1.0, 2.0]), "gone": torch.zeros(1),
                "reshaped": torch.zeros(2, 2), "cast": torch.zeros(2),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}, a)
    torch.save({"same": torch.ones(3), "changed": torch.tensor([1.0, 2.5]), "new": torch.zeros(1),
                "reshaped": torch.zeros(4), "cast": torch.zeros(2, dtype=torch.float16),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]}}, b)
    code, text, _ = run_main(capsys, "diff", str(a), str(b))
    assert code == 0
    assert "1 added, 1 changed, 1 dtype, 1 removed, 1 same, 1 shape" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line and not line.startswith(("A:", "B:"))}
    assert "max|diff|=0.5  norm +20.4" in rows["changed"]  # |(1,2.5)| / |(1,2)| = 1.2042
    assert "(2, 2) -> (4)" in rows["reshaped"] and "float32 -> float16" in rows["cast"]
    assert "added" in rows["new"] and "removed" in rows["gone"] and "same" not in rows
    assert "optimizer.param_groups.0.lr  0.1  0.01" in text
    code, text, _ = run_main(capsys, "diff", "--all", str(a), str(a))
    assert code == 0 and "5 same" in text


# -- export --------------------------------------------------------------------------

def test_export_safetensors_and_plain_state_dict(tmp_path: Path, run_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    source = run_dir / KEPT[3]
    model = torch.load(source, weights_only=True)["model"]
    st = cli("export", str(source), "--to", str(tmp_path / "w.safetensors"))
    assert st.returncode == 0 and "4 tensors" in st.stdout, st.stderr
    got = load_file(str(tmp_path / "w.safetensors"))
    assert got.keys() == model.keys() and all(torch.equal(got[k], model[k]) for k in model)
    assert run_main(capsys, "export", str(source), "--to", str(tmp_path / "w.pt"))[0] == 0
    plain = torch.load(tmp_path / "w.pt", weights_only=True)
    assert plain.keys() == model.keys() and all(torch.equal(plain[k], model[k]) for k in model)
    fails(capsys, 2, ["export", str(run_dir), "--to", str(tmp_path / "x.pt")], "is a directory", "not a checkpoint")
    fails(capsys, 2, ["export", str(source), "--to", str(tmp_path / "x.bin")], "unknown output format")
    fails(capsys, 2, ["export", str(source), "--to", str(tmp_path / "x.pt"), "--object", "nope"], "which module")


# -- plot ----------------------------------------------------------------------------

def test_plot_png_is_read_back(tmp_path: Path, run_dir: Path) -> None:
    from matplotlib.image import imread

    png = tmp_path / "curve.png"
    out = cli("plot", str(run_dir), "--metric", "val_loss", "-o", str(png))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert f"{len(VALS)} saves of val_loss, 4 kept" in out.stdout
    pixels = imread(str(png))
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()}
    assert len(colours) > 50  # a drawing, not a blank canvas


def test_plot_in_the_terminal_and_a_missing_metric(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plot", str(run_dir), "--metric", "val_loss")
    assert code == 0
    lines = out.splitlines()
    grid = "\n".join(line.split("|", 1)[1] for line in lines if "|" in line)
    assert grid.count("B") == 1 and grid.count("L") == 1 and grid.count("M") == 1  # latest is a milestone too
    assert grid.count("o") == 1 and grid.count(".") == 4  # last-2 kept; four evicted saves
    assert lines[[i for i, line in enumerate(lines) if "|" in line][-1]].strip().startswith("0.2")  # best at bottom
    fails(capsys, 2, ["plot", str(run_dir), "--metric", "nope"], "'nope'", "acc, val_loss")
    fails(capsys, 2, ["plot", str(tmp_path), "--metric", "val_loss"], "nothing to plot")


# -- the command line as a whole -----------------------------------------------------

def test_usage_mistakes_are_one_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clean_error(cli("bogus"), 2, "invalid choice")
    fails(capsys, 2, ["ls"], "required")
    fails(capsys, 2, ["prune", str(run_dir), "--keep-last", "x"], "invalid int")
    fails(capsys, 2, ["prune", str(run_dir), "--keep-last", "-1"], "keep_last")


def test_every_command_has_help_with_an_example() -> None:
    p = parser()
    sub = next(a for a in p._actions if a.dest == "command")
    names = set(sub.choices)  # type: ignore[attr-defined]
    assert {"ls", "list", "show", "inspect", "verify", "prune", "diff", "export", "plot"} <= names
    for name, command in sub.choices.items():  # type: ignore[attr-defined]
        text = command.format_help()
        assert "example:" in text and f"ckpt {name}" in text.replace("inspect", "show").replace("list", "ls") \
            or name in ("inspect", "list"), name
