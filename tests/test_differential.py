"""Differential checkpoints (see docs/explanation/differential.md): unchanged
tensors are stored once and referenced."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

from ckpt import CheckpointManager, CorruptCheckpointError
from ckpt.catalog import Catalog, differential
from ckpt.format import chunks
from ckpt.storage import LocalStore

BACKBONE = 256  # 4 x 256 x 256 float32 = 1 MiB frozen, vs a 2 KiB head


def finetune_model() -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*[torch.nn.Linear(BACKBONE, BACKBONE, bias=False) for _ in range(4)])
    for p in backbone.parameters():
        p.requires_grad_(False)
    return torch.nn.Sequential(backbone, torch.nn.Linear(BACKBONE, 2))


def train_head(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, BACKBONE)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def files(directory: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.name.startswith("ckpt-") and p.is_file()}


def blobs_on_disk(directory: Path) -> Set[str]:
    return {n for n in files(directory) if n.startswith(differential.BLOB_PREFIX)}


def states(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_frozen_backbone_is_written_once_and_every_checkpoint_restores_alone(tmp_path: Path) -> None:
    model = finetune_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mgr = CheckpointManager(tmp_path, model=model, optimizer=opt, differential=True, keep_last=2)
    written: List[int] = []
    saved: List[Dict[str, torch.Tensor]] = []
    for epoch in range(5):
        train_head(model, opt)
        before = files(tmp_path)
        mgr.save(epoch=epoch)
        after = files(tmp_path)
        written.append(sum(size for name, size in after.items() if before.get(name) != size))
        saved.append(states(model))
    assert written[0] > 1 << 20  # the first writes the backbone
    assert all(w <= written[0] / 10 for w in written[1:]), written
    # retention removed the first checkpoints; their backbone blob is still referenced
    assert [r.epoch for r in mgr.checkpoints] == [3, 4]
    assert len(blobs_on_disk(tmp_path)) == 4  # one per backbone layer, written once
    for record in mgr.checkpoints:
        fresh = finetune_model()
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        other = CheckpointManager(tmp_path, model=fresh)
        other.restore(record.epoch)
        for k, v in saved[record.epoch].items():
            assert torch.equal(fresh.state_dict()[k], v), k
    assert set(mgr.verify().values()) == {"ok"}


def test_changed_bytes_are_never_reused(tmp_path: Path) -> None:
    model = finetune_model()
    mgr = CheckpointManager(tmp_path, model=model, differential=True)
    mgr.save(epoch=0)
    first = blobs_on_disk(tmp_path)
    weight = model[0][0].weight
    with torch.no_grad():
        weight[3, 7] = -0.0 if weight[3, 7] == 0 else weight[3, 7] * (1 + 1e-7) + 1e-30
        model[0][1].weight[0, 0] = torch.nextafter(model[0][1].weight[0, 0], torch.tensor(1.0))
    mgr.save(epoch=1)
    assert len(blobs_on_disk(tmp_path) - first) == 2  # exactly the two changed tensors
    restored = finetune_model()
    CheckpointManager(tmp_path, model=restored).restore(1)
    for k, v in model.state_dict().items():
        assert torch.equal(restored.state_dict()[k].view(torch.uint8), v.view(torch.uint8)), k


def test_negative_zero_is_a_change(tmp_path: Path) -> None:
    model = torch.nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    mgr = CheckpointManager(tmp_path, model=model, differential=True)
    mgr.save(epoch=0)
    with torch.no_grad():
        model.weight.neg_()  # -0.0 == 0.0 numerically, not bytewise
    mgr.save(epoch=1)
    assert not mgr.latest.blobs  # changed everywhere: stored inline, the -0.0 pack not reused
    restored = torch.nn.Linear(256, 256, bias=False)
    CheckpointManager(tmp_path, model=restored).restore(1)
    assert torch.equal(restored.weight.view(torch.int32), model.weight.view(torch.int32))


def test_export_writes_a_standalone_plain_file(tmp_path: Path) -> None:
    model = finetune_model()
    mgr = CheckpointManager(tmp_path / "run", model=model, differential=True)
    mgr.save(epoch=0)
    mgr.save(epoch=1)
    catalog = Catalog(LocalStore(tmp_path / "run"))
    obj, _ = catalog.load(mgr.latest)
    out = tmp_path / "plain.pt"
    torch.save(differential.standalone(obj), out)
    plain = torch.load(out, weights_only=True)
    assert "blobs" not in plain["ckpt"]
    for k, v in model.state_dict().items():
        assert torch.equal(plain["model"][k], v)
    raw = torch.load(mgr.latest.path, weights_only=True)  # the checkpoint file alone: references
    assert differential.is_marker(raw["model"]["0.0.weight"])


def test_a_damaged_tensor_file_is_caught_by_verify_and_never_loaded(tmp_path: Path) -> None:
    model = finetune_model()
    mgr = CheckpointManager(tmp_path, model=model, differential=True)
    mgr.save(epoch=0)
    blob = tmp_path / sorted(blobs_on_disk(tmp_path))[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert mgr.verify() == {mgr.latest.name: "damaged"}
    with pytest.raises(CorruptCheckpointError):  # before resume(), which moves the checkpoint aside
        Catalog(LocalStore(tmp_path)).load(mgr.latest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"), pytest.raises(FileNotFoundError):
        CheckpointManager(tmp_path, model=finetune_model()).resume()
    assert (tmp_path / f"{mgr.latest.name}.corrupt").is_file()  # kept aside: the pack failed, not the file


def test_unreferenced_tensor_files_are_cleaned_when_a_manager_opens(tmp_path: Path) -> None:
    model = finetune_model()
    CheckpointManager(tmp_path, model=model, differential=True).save(epoch=0)
    kept = blobs_on_disk(tmp_path)
    stray = tmp_path / differential.new_name()
    stray.write_bytes(b"left by a save that was killed before its commit")
    (tmp_path / "ckpt-blob-notes.txt").write_bytes(b"not ours")  # not a blob name: never touched
    CheckpointManager(tmp_path, model=model)
    assert blobs_on_disk(tmp_path) == kept | {"ckpt-blob-notes.txt"}


WRITER = r"""
import sys, torch
from ckpt import CheckpointManager
torch.manual_seed(0)
backbone = torch.nn.Linear(512, 512, bias=False)
head = torch.nn.Linear(512, 4)
model = torch.nn.Sequential(backbone, head)
table = torch.nn.Embedding(4096, 64)  # a few rows change every save: chunks
with torch.no_grad():
    table.weight.zero_()
mgr = CheckpointManager(sys.argv[1], model=model, embedding=table, differential=True, keep_last=2,
                        progress=False)
epoch = mgr.resume()
while True:
    with torch.no_grad():
        head.weight.fill_(epoch)
        if epoch % 3 == 0:
            backbone.weight.fill_(epoch)  # the backbone changes now and then
        table.weight[(epoch * 37) % 4000:(epoch * 37) % 4000 + 50] = float(epoch)
    mgr.save(epoch=epoch)
    print(epoch, flush=True)
    epoch += 1
"""


_TABLE_ROWS = slice(0, 4096)


def expected_rows(epoch: int) -> torch.Tensor:
    """The writer's table after the save of ``epoch`` (zeros, then 50 rows a save)."""
    out = torch.zeros((4096, 64))
    for e in range(epoch + 1):
        start = (e * 37) % 4000
        out[start:start + 50] = float(e)
    return out


@pytest.mark.slow
def test_sigkill_during_differential_saves_leaves_every_listed_checkpoint_restorable(tmp_path: Path) -> None:
    rng = random.Random(17)  # kill points: deterministic
    directory = tmp_path / "run"
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            line = child.stdout.readline()  # one commit at least, then kill anywhere in the next ones
            assert line.strip(), child.stderr.read() if child.stderr else ""
            time.sleep(rng.uniform(0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 4))
        table = torch.nn.Embedding(4096, 64)
        mgr = CheckpointManager(directory, model=model, embedding=table)  # no writer: orphans are cleaned
        referenced = {b for r in mgr.checkpoints for b, _ in r.blobs}
        assert blobs_on_disk(directory) == referenced
        assert set(mgr.verify().values()) == {"ok"}
        for record in mgr.checkpoints:
            mgr.restore(record)
            assert torch.equal(model[1].weight, torch.full_like(model[1].weight, record.epoch))
            assert torch.equal(model[0].weight, torch.full_like(model[0].weight, record.epoch - record.epoch % 3))
            assert torch.equal(table.weight[_TABLE_ROWS], expected_rows(record.epoch))
        mgr.close()


def test_an_embedding_table_rewrites_only_the_chunks_with_updated_rows(tmp_path: Path) -> None:
    table = torch.nn.Embedding(8192, 64)  # 2 MiB, chunks of 2 rows
    mgr = CheckpointManager(tmp_path, embedding=table, differential=True)
    mgr.save(epoch=0)
    first = blobs_on_disk(tmp_path)
    assert len(first) == 1  # one pack: every chunk is new
    with torch.no_grad():
        table.weight[[5, 6000]] += 1.0  # two rows, in two different chunks
    mgr.save(epoch=1)
    (pack,) = blobs_on_disk(tmp_path) - first
    rows = chunks.rows_per_chunk(table.weight)
    assert torch.load(tmp_path / pack, weights_only=True).shape == (2 * rows, 64)  # exactly those two chunks
    restored = torch.nn.Embedding(8192, 64)
    CheckpointManager(tmp_path, embedding=restored).restore(1)
    assert torch.equal(restored.weight, table.weight)


def test_ckpt_export_writes_plain_weights_from_a_differential_checkpoint(tmp_path: Path) -> None:
    model = finetune_model()
    mgr = CheckpointManager(tmp_path / "run", model=model, differential=True)
    mgr.save(epoch=0)
    mgr.save(epoch=1)
    out = tmp_path / "weights.pt"
    done = subprocess.run([sys.executable, "-m", "ckpt", "export", str(mgr.latest.path), "--to", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plain = torch.load(out, weights_only=True)
    assert plain.keys() == model.state_dict().keys()
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


def test_prune_deletes_the_tensor_files_only_evicted_checkpoints_used(tmp_path: Path) -> None:
    """``ckpt prune`` runs the same commit-and-retention transaction as a save: the
    blobs that no kept checkpoint references go with the files that used them."""
    model = finetune_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, differential=True) as mgr:
        for epoch in range(3):
            train_head(model, opt)
            mgr.save(epoch=epoch)
        with torch.no_grad():
            for p in model[0].parameters():  # the backbone changes: its old blobs are the first two's only
                p.add_(1.0)
        mgr.save(epoch=3)
    before = blobs_on_disk(tmp_path)
    done = subprocess.run([sys.executable, "-m", "ckpt", "prune", str(tmp_path), "--keep-last", "1", "--yes"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = Catalog(LocalStore(tmp_path, create=False)).scan().records
    assert [r.epoch for r in kept] == [3]
    assert blobs_on_disk(tmp_path) == {b for b, _ in kept[0].blobs} < before
    restored = finetune_model()
    CheckpointManager(tmp_path, model=restored).restore("latest")
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))
