"""What a differential save reads, compares and writes (see docs/explanation/differential.md):
a tensor with more than half of its chunks changed is written whole; a trained tensor is
decided from a sample, without reading the previous checkpoint or its packs; the
reference stays the same size however many checkpoints there are."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.catalog import differential
from ckpt.format import changes, chunks, torchfile

ROWS = 8192  # Embedding(8192, 64) of float32: 2 MiB, 2 rows a chunk, 4096 chunks


def pack_bytes(directory: Path, before: Dict[str, int]) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.name.startswith(differential.BLOB_PREFIX) and p.name not in before)


def names(directory: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def change_chunks(table: torch.nn.Embedding, which: torch.Tensor) -> None:
    rows = chunks.rows_per_chunk(table.weight)
    with torch.no_grad():
        for offset in range(rows):
            table.weight[which * rows + offset] += 1.0


def stored(path: Path) -> Any:
    return torch.load(path, weights_only=True)["embedding"]["weight"]


def test_more_than_half_the_chunks_changed_is_written_whole(tmp_path: Path) -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(ROWS, 64)
    count = ROWS // chunks.rows_per_chunk(table.weight)
    mgr = CheckpointManager(tmp_path, embedding=table, differential=True, progress=False)
    mgr.save(epoch=0)
    sampled = set(changes.sample_index(ROWS, chunks.rows_per_chunk(table.weight)).tolist())
    # 60 % of the chunks, none of them sampled: only the full comparison sees it
    hidden = torch.tensor([c for c in range(count) if c not in sampled][:int(0.6 * count)])
    change_chunks(table, hidden)
    mgr.save(epoch=1)
    assert isinstance(stored(mgr.latest.path), torch.Tensor)  # inline, as in a full save
    assert not mgr.latest.blobs
    change_chunks(table, torch.tensor([c for c in range(count) if c % 3]))  # two thirds, the sample's too: whole
    mgr.save(epoch=2)
    assert isinstance(stored(mgr.latest.path), torch.Tensor)
    change_chunks(table, torch.arange(0, count, 10))  # a tenth, after an inline save: every chunk written once
    mgr.save(epoch=3)
    ref = stored(mgr.latest.path)
    assert chunks.is_ref(ref)
    before = names(tmp_path)
    change_chunks(table, torch.arange(0, count, 10))  # a tenth again: only those chunks
    mgr.save(epoch=4)
    assert pack_bytes(tmp_path, before) < table.weight.nbytes / 8
    want = table.weight.detach().clone()
    fresh = torch.nn.Embedding(ROWS, 64)
    CheckpointManager(tmp_path, embedding=fresh).restore(4)
    assert torch.equal(fresh.weight.view(torch.int32), want.view(torch.int32))


def spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> List[Any]:
    """Calls of ``owner.name`` (the real function still runs)."""
    calls: List[Any] = []
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[:2])
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_a_trained_model_is_decided_from_the_sample_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 256, bias=False))
    mgr = CheckpointManager(tmp_path, model=model, differential=True, keep_last=2, progress=False)
    mgr.save(epoch=0)  # the first save has nothing to compare with: every tensor goes to a pack
    loads, peeks, digests = spy(monkeypatch, torchfile, "load"), spy(monkeypatch, differential, "_peek"), \
        spy(monkeypatch, changes, "digest_all")
    for epoch in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        mgr.save(epoch=epoch)
        raw = torch.load(mgr.latest.path, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in raw["model"].values())  # inline, as in a full save
    assert loads == [] and peeks == [] and digests == []  # no previous file, no pack read, nothing hashed
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 256, bias=False))
    CheckpointManager(tmp_path, model=fresh).restore(3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_new_process_reads_the_previous_checkpoint_to_compare(tmp_path: Path) -> None:
    table = torch.nn.Embedding(ROWS, 64)
    CheckpointManager(tmp_path, embedding=table, differential=True, progress=False).save(epoch=0)
    change_chunks(table, torch.arange(0, 100))
    before = names(tmp_path)
    second = CheckpointManager(tmp_path, embedding=table, differential=True, progress=False)  # no memory of save 0
    second.save(epoch=1)
    assert 100 * 512 <= pack_bytes(tmp_path, before) <= 100 * 512 + 4096  # the 100 changed chunks (+ the zip)
    fresh = torch.nn.Embedding(ROWS, 64)
    CheckpointManager(tmp_path, embedding=fresh).restore(1)
    assert torch.equal(fresh.weight, table.weight)


def test_the_bookkeeping_stays_flat_in_the_number_of_checkpoints(tmp_path: Path) -> None:
    """Keep-all retention, 40 saves: each checkpoint file (references and header) stays
    the same size and names at most MAX_PACKS packs for the table."""
    torch.manual_seed(2)
    table = torch.nn.Embedding(ROWS, 64)
    mgr = CheckpointManager(tmp_path, embedding=table, differential=True, progress=False)
    sizes: List[int] = []
    for epoch in range(40):
        change_chunks(table, torch.randperm(ROWS // 2)[:100])
        mgr.save(epoch=epoch)
        ref = stored(mgr.latest.path)
        assert chunks.is_ref(ref) and len(ref[chunks.KEY]["packs"]) <= chunks.MAX_PACKS
        sizes.append(mgr.latest.path.stat().st_size)
    assert max(sizes[1:]) - min(sizes[1:]) <= 2048, sizes  # a few pack names more or fewer
    assert max(len(r.blobs) for r in mgr.checkpoints) <= chunks.MAX_PACKS


def test_a_tensor_stored_inline_then_frozen_restores_after_a_restart(tmp_path: Path) -> None:
    # a new process compares with the inline tensor of the previous checkpoint: equal
    # everywhere, yet no pack holds its chunks, so every chunk is written once
    layer = torch.nn.Linear(256, 256, bias=False)
    with CheckpointManager(tmp_path, layer=layer, differential=True, progress=False) as mgr:
        mgr.save(epoch=0)
        with torch.no_grad():
            layer.weight.add_(1.0)
        mgr.save(epoch=1)
        assert isinstance(torch.load(mgr.latest.path, weights_only=True)["layer"]["weight"], torch.Tensor)
    with CheckpointManager(tmp_path, layer=layer, differential=True, progress=False) as again:
        again.save(epoch=2)  # unchanged since epoch 1
    fresh = torch.nn.Linear(256, 256, bias=False)
    CheckpointManager(tmp_path, layer=fresh).restore(2)
    assert torch.equal(fresh.weight, layer.weight)


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_tensor_that_changed_shape_or_dtype_is_written_anew(tmp_path: Path, change: str) -> None:
    """A restarted run whose large tensor has another shape or dtype than the previous
    checkpoint's cannot reuse its chunks: every chunk is written, the save succeeds and the
    checkpoint restores (was: a raw IndexError from the old reference's chunk table)."""
    first = torch.nn.Embedding(ROWS, 64)
    with CheckpointManager(tmp_path, embedding=first, differential=True) as mgr:
        mgr.save(epoch=0)
    torch.manual_seed(1)
    second = torch.nn.Embedding(2 * ROWS, 64) if change == "shape" else torch.nn.Embedding(ROWS, 64).double()
    with CheckpointManager(tmp_path, embedding=second, differential=True) as mgr:
        mgr.save(epoch=1)
        mgr.save(epoch=2)  # and the save after it reuses the new chunks
    fresh = torch.nn.Embedding(2 * ROWS, 64) if change == "shape" else torch.nn.Embedding(ROWS, 64).double()
    with CheckpointManager(tmp_path, embedding=fresh, differential=True) as mgr:
        assert mgr.resume() == 3
    assert torch.equal(fresh.weight, second.weight)
