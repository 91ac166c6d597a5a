"""Differential checkpoints below the tensor level: only changed chunks of rows are written.

Also the defects found by the adversarial round: a damaged pack referenced again, a
reader deleting a live save's pack on S3, checkpoint files read outside the manager
as their references, a deleted or corrupted pack, retention after many saves.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import pytest
import torch

from ckpt import CheckpointManager, CorruptCheckpointError, load_model
from ckpt.catalog import Catalog, differential
from ckpt.format import chunks
from ckpt.storage import LocalStore

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "differential-v1"


def blobs(directory: Path) -> Set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith(differential.BLOB_PREFIX)}


def added(directory: Path, before: Dict[str, int]) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.name.startswith("ckpt-") and p.is_file() and p.name not in before)


def sizes(directory: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}


def referenced(mgr: CheckpointManager) -> Set[str]:
    return {b for r in mgr.checkpoints for b, _ in r.blobs}


def touch_rows(table: torch.nn.Embedding, fraction: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = table.num_embeddings
    rows = torch.randperm(n, generator=g)[:int(n * fraction)]
    with torch.no_grad():
        table.weight[rows] += 0.5


def flip_tensor_bit(path: Path) -> None:
    """One bit of the tensor bytes flipped: torch still loads the file, the checksum fails."""
    tensor = torch.load(path, weights_only=True)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.contiguous().view(torch.uint8).reshape(-1)[:64].numpy().tobytes())
    assert at > 0
    data[at + 100] ^= 0x01
    path.write_bytes(bytes(data))


def flip_serialization_id(path: Path) -> None:
    """One bit flipped in the archive's serialization id: the tensor loads unchanged (a
    comparison of tensors calls it equal), the file fails its checksum."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(".data/serialization_id"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0x01
    path.write_bytes(bytes(data))


def run_python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_percent_of_an_embedding_adds_under_a_tenth_and_restores_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(200_000, 64)  # 51.2 MB, the table
    full = table.weight.nbytes
    mgr = CheckpointManager(tmp_path, embedding=table, differential=True, keep_last=2, progress=False)
    mgr.save(epoch=0)
    expected: List[torch.Tensor] = [table.weight.detach().clone()]
    for epoch in (1, 2, 3):
        touch_rows(table, 0.02, epoch)
        before = sizes(tmp_path)
        mgr.save(epoch=epoch)
        assert added(tmp_path, before) <= full / 10, (epoch, added(tmp_path, before))
        expected.append(table.weight.detach().clone())
    assert [r.epoch for r in mgr.checkpoints] == [2, 3]  # epoch 0 wrote the first chunks and is gone
    assert blobs(tmp_path) == referenced(mgr)
    mgr.close()
    for epoch in (2, 3):
        torch.save(expected[epoch], tmp_path.parent / f"expected{epoch}.pt")
    out = run_python("""
        import sys, torch
        from ckpt import CheckpointManager
        d = sys.argv[1]
        for epoch in (2, 3):
            t = torch.nn.Embedding(200_000, 64)
            CheckpointManager(d, embedding=t, progress=False).restore(epoch)
            want = torch.load(f"{d}/../expected{epoch}.pt")
            print(epoch, torch.equal(t.weight.view(torch.int32), want.view(torch.int32)))
    """, str(tmp_path))
    assert out.split() == ["2", "True", "3", "True"]
    assert set(CheckpointManager(tmp_path, embedding=table).verify().values()) == {"ok"}


def test_a_fully_changed_tensor_is_inline_and_a_frozen_one_referenced(tmp_path: Path) -> None:
    frozen, trained = torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 256, bias=False)
    mgr = CheckpointManager(tmp_path, frozen=frozen, trained=trained, differential=True, progress=False)
    mgr.save(epoch=0)
    first = blobs(tmp_path)
    with torch.no_grad():
        trained.weight.mul_(1.5)
    mgr.save(epoch=1)
    assert blobs(tmp_path) == first  # the trained tensor is inline, as in a full save; the frozen one referenced
    raw = torch.load(mgr.latest.path, weights_only=True)
    assert len(raw["frozen"]["weight"][chunks.KEY]["packs"]) == 1
    assert isinstance(raw["trained"]["weight"], torch.Tensor)
    assert raw["ckpt"]["differential"] == chunks.VERSION


def test_keep_last_after_many_saves_bounds_packs_and_disk(tmp_path: Path) -> None:
    torch.manual_seed(1)
    table = torch.nn.Embedding(4096, 64)  # 1 MiB
    mgr = CheckpointManager(tmp_path, embedding=table, differential=True, keep_last=3, progress=False)
    saved: Dict[int, torch.Tensor] = {}
    for epoch in range(40):
        touch_rows(table, 0.05, epoch)
        mgr.save(epoch=epoch)
        saved[epoch] = table.weight.detach().clone()
        assert blobs(tmp_path) == referenced(mgr), epoch  # nothing leaked, nothing kept is missing
    assert [r.epoch for r in mgr.checkpoints] == [37, 38, 39]
    for rec in mgr.checkpoints:
        raw = torch.load(rec.path, weights_only=True)
        assert len(raw["embedding"]["weight"][chunks.KEY]["packs"]) <= chunks.MAX_PACKS
    on_disk = sum(s for n, s in sizes(tmp_path).items() if n.startswith("ckpt-"))
    assert on_disk <= 4 * table.weight.nbytes, on_disk
    for rec in mgr.checkpoints:
        fresh = torch.nn.Embedding(4096, 64)
        CheckpointManager(tmp_path, embedding=fresh).restore(rec)
        assert torch.equal(fresh.weight, saved[rec.epoch])


@pytest.mark.parametrize("flip", [flip_serialization_id, flip_tensor_bit], ids=["same-tensor", "tensor-bit"])
def test_a_pack_that_fails_its_checksum_is_never_referenced_again(tmp_path: Path, flip: Callable[[Path], None]) -> None:
    # issue 28: the comparison read the tensor, not the checksum, so every later save
    # referenced the damaged blob; with keep_last=1 nothing restorable was left
    model = torch.nn.Linear(256, 256, bias=False)
    mgr = CheckpointManager(tmp_path, model=model, differential=True, keep_last=1, progress=False)
    mgr.save(epoch=0)
    (pack,) = blobs(tmp_path)
    flip(tmp_path / pack)
    assert torch.load(tmp_path / pack, weights_only=True).shape == (256, 256)  # torch still reads it
    mgr.save(epoch=1)
    assert pack not in referenced(mgr)
    assert set(mgr.verify().values()) == {"ok"}
    fresh = torch.nn.Linear(256, 256, bias=False)
    assert CheckpointManager(tmp_path, model=fresh).resume() == 2
    assert torch.equal(fresh.weight, model.weight)


def _three_saves(directory: Path) -> List[Dict[str, object]]:
    table = torch.nn.Embedding(2048, 64)
    mgr = CheckpointManager(directory, embedding=table, differential=True, progress=False)
    packs: List[Dict[str, object]] = []
    for epoch in range(3):
        if epoch:
            touch_rows(table, 0.1, epoch)
        mgr.save(epoch=epoch)
        raw = torch.load(mgr.latest.path, weights_only=True)
        packs.append({"packs": list(raw["embedding"]["weight"][chunks.KEY]["packs"]),
                      "weight": table.weight.detach().clone()})
    return packs


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_lost_pack_names_itself_and_resume_falls_back(tmp_path: Path, damage: str) -> None:
    saves = _three_saves(tmp_path)
    lost = next(p for p in saves[1]["packs"] if p not in saves[0]["packs"])  # type: ignore[operator]
    assert lost in saves[2]["packs"]  # type: ignore[operator]  # epoch 2 references epoch 1's chunks
    if damage == "delete":
        (tmp_path / lost).unlink()
    else:
        flip_tensor_bit(tmp_path / lost)
    table = torch.nn.Embedding(2048, 64)
    catalog = Catalog(LocalStore(tmp_path))
    with pytest.raises(CorruptCheckpointError, match=lost):
        catalog.load(catalog.scan().records[-1])
    report = CheckpointManager(tmp_path, embedding=table).verify()
    assert report["ckpt-e000000-s000000000.pt"] == "ok" and report["ckpt-e000002-s000000000.pt"] == "damaged"
    with pytest.warns(UserWarning, match=lost):
        assert CheckpointManager(tmp_path, embedding=table).resume() == 1
    assert torch.equal(table.weight, saves[0]["weight"])  # type: ignore[arg-type]


def test_format_1_checkpoints_still_restore_and_a_new_save_builds_on_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(V1, run)
    torch.manual_seed(0)  # the generator of tests/data/differential-v1 (see tests/data/README.md)
    frozen, table = torch.nn.Linear(128, 128, bias=False), torch.nn.Embedding(256, 64)
    model = torch.nn.Sequential(frozen, torch.nn.Linear(128, 2))
    expected = {0: (states(model), table.weight.detach().clone())}
    with torch.no_grad():
        table.weight[3] += 1
        model[1].weight += 1
    expected[1] = (states(model), table.weight.detach().clone())
    raw = torch.load(run / "ckpt-e000001-s000000000.pt", weights_only=True)
    assert differential.MARKER in raw["embedding"]["weight"]  # really format 1
    for epoch, (weights, rows) in expected.items():
        m2, t2 = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False), torch.nn.Linear(128, 2)), \
            torch.nn.Embedding(256, 64)
        CheckpointManager(run, model=m2, embedding=t2).restore(epoch)
        assert all(torch.equal(m2.state_dict()[k], v) for k, v in weights.items())
        assert torch.equal(t2.weight, rows)
    mgr = CheckpointManager(run, model=model, embedding=table, differential=True, progress=False)
    assert mgr.resume() == 2
    mgr.save(epoch=2)
    again = torch.nn.Embedding(256, 64)
    CheckpointManager(run, embedding=again).restore(2)
    assert torch.equal(again.weight, table.weight)


def states(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- a differential checkpoint read outside the manager (issue 28) ---------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def _four_tensor_run(directory: Path) -> Tuple[CheckpointManager, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))  # 2 large, 2 small
    mgr = CheckpointManager(directory, model=model, differential=True, progress=False)
    mgr.save(epoch=0)
    with torch.no_grad():
        model[1].weight[7] += 1  # a referenced (large) tensor changes
    mgr.save(epoch=1)
    return mgr, model


def test_cli_show_and_diff_see_referenced_tensors(tmp_path: Path) -> None:
    mgr, model = _four_tensor_run(tmp_path)
    e0, e1 = (str(r.path) for r in mgr.checkpoints)
    shown = _cli("show", e1, "--tensors", "--json")
    assert shown.returncode == 0, shown.stderr
    names = {t["name"] for t in json.loads(shown.stdout)["tensors"]}
    assert names == {"model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias"}
    diff = _cli("diff", e0, e1)
    assert diff.returncode == 0, diff.stderr
    assert "model.1.weight" in diff.stdout and "1 changed" in diff.stdout, diff.stdout


def test_verify_file_and_ls_verify_check_the_packs(tmp_path: Path) -> None:
    mgr, model = _four_tensor_run(tmp_path)
    latest = mgr.latest
    assert _cli("verify", str(latest.path)).returncode == 0
    pack = sorted(b for b, _ in latest.blobs)[0]
    (tmp_path / pack).unlink()
    done = _cli("verify", str(latest.path))
    assert done.returncode == 1 and pack in done.stdout, done.stdout
    listed = _cli("ls", str(tmp_path), "--verify")
    assert listed.returncode == 1 and "DAMAGED" in listed.stdout and pack in listed.stdout, listed.stdout


def test_restore_path_and_load_model_resolve_references(tmp_path: Path) -> None:
    mgr, model = _four_tensor_run(tmp_path)
    want = states(model)
    outside = tmp_path / "copy"
    outside.mkdir()
    for p in tmp_path.iterdir():  # the file and its packs moved elsewhere, no index
        if p.name.startswith("ckpt-e000001") or p.name.startswith(differential.BLOB_PREFIX):
            shutil.copy(p, outside / p.name)
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    CheckpointManager(tmp_path / "other", model=fresh).restore(outside / "ckpt-e000001-s000000000.pt")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    built = load_model(mgr.latest.path)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in want.items())


def test_async_differential_saves_with_keep_last_1_restore(tmp_path: Path) -> None:
    torch.manual_seed(3)
    table = torch.nn.Embedding(8192, 64)
    mgr = CheckpointManager(tmp_path, embedding=table, differential=True, keep_last=1, async_save=True,
                            progress=False)
    for epoch in range(5):
        touch_rows(table, 0.02, epoch)
        mgr.save(epoch=epoch)  # returns before the files are written; the next save waits for it
    mgr.close()
    want = table.weight.detach().clone()
    assert [r.epoch for r in mgr.checkpoints] == [4]
    assert blobs(tmp_path) == referenced(mgr)
    fresh = torch.nn.Embedding(8192, 64)
    assert CheckpointManager(tmp_path, embedding=fresh).resume() == 5
    assert torch.equal(fresh.weight, want)
