"""Resume reads the file's records straight into the tracked tensors (ckpt.format.directread)."""

from __future__ import annotations

import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, List

import pytest
import torch

from ckpt import CheckpointManager, CheckpointNotFoundError
from ckpt.format import directread
from ckpt.io import pipelined


def _model(width: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.BatchNorm1d(width), torch.nn.Linear(width, 3))


def _trained(directory: Path, width: int = 64) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _model(width)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).sum().backward()
        opt.step()
    with CheckpointManager(directory, model=model, optimizer=opt) as mgr:
        mgr.save(epoch=0)
    return model, opt


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    """What each direct read returned (None: the usual torch.load path was taken)."""
    calls: List[Any] = []
    real = directread.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls.append(out)
        return out
    monkeypatch.setattr(directread, "load", spy)
    return calls


def test_resume_reads_into_the_tracked_tensors_bit_exact(tmp_path: Path, direct_calls: List[Any]) -> None:
    model, opt = _trained(tmp_path)
    torch.manual_seed(1)
    fresh = _model()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    weight = fresh[0].weight
    ptr = weight.data_ptr()
    with CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt) as mgr:
        assert mgr.resume() == 1
    assert len(direct_calls) == 1 and isinstance(direct_calls[0], directread.Loaded)
    assert fresh[0].weight is weight and weight.data_ptr() == ptr  # the same parameter, filled in place
    for (k, want), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(want, got), k
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, state in saved["state"].items():
        for k, v in state.items():
            assert torch.equal(v, loaded["state"][i][k]), (i, k)


def test_a_damaged_tensor_record_is_found_before_anything_is_applied(tmp_path: Path) -> None:
    _trained(tmp_path)
    (path,) = tmp_path.glob("*.pt")
    with zipfile.ZipFile(path) as archive:
        biggest = max(archive.infolist(), key=lambda i: i.file_size)
        at = biggest.header_offset + 30 + len(biggest.filename.encode()) + len(biggest.extra) + biggest.file_size // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    torch.manual_seed(2)
    fresh = _model()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            mgr.resume()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k  # not one byte of the damaged file reached the model
    assert fresh_opt.state_dict()["state"] == {}



def test_a_record_rewritten_in_place_after_the_check_is_refused_by_the_fill(tmp_path: Path) -> None:
    """The first pass sums a module's records only into the file's CRC-32; the fill
    checks each one against the zip directory's CRC-32 (verified with the file): bytes
    changed in place between the passes are refused, naming the record."""
    from ckpt import CorruptCheckpointError
    from ckpt.format import torchfile
    from ckpt.state import direct_targets
    _trained(tmp_path)
    fresh = _model()
    with CheckpointManager(tmp_path, model=fresh) as mgr:
        record = mgr.latest
        assert record is not None
    path = Path(record.path)
    loaded = torchfile.load(path, checksum=record.checksum, targets=direct_targets({"model": fresh}))
    assert isinstance(loaded, directread.Loaded)
    with zipfile.ZipFile(path) as archive:  # records of the first layer's weight's size (its Adam state's too)
        heads = [i.header_offset for i in archive.infolist() if i.file_size == fresh[0].weight.nbytes]
    with open(path, "r+b") as f:
        for head in heads:
            f.seek(head + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))  # the local header's, padding included
            at = head + 30 + name_len + extra_len
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptCheckpointError, match="changed between its check and its load"):
        loaded.fill()


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file read as a large one is: on the reader thread, in pieces (here of
    1,000 bytes), records of 1 KiB and more straight into their storage."""
    monkeypatch.setattr(pipelined, "THREAD_MIN", 0)
    monkeypatch.setattr(pipelined, "chunk_size", lambda total: 1000)
    monkeypatch.setattr(directread, "DIRECT_MIN", 1024)


def test_read_in_pieces_on_a_thread_bit_exact(tmp_path: Path, direct_calls: List[Any], small_pieces: None) -> None:
    test_resume_reads_into_the_tracked_tensors_bit_exact(tmp_path, direct_calls)


def test_read_in_pieces_on_a_thread_damage_is_found_first(tmp_path: Path, small_pieces: None) -> None:
    test_a_damaged_tensor_record_is_found_before_anything_is_applied(tmp_path)



def test_damage_in_any_record_is_found_before_anything_is_applied(tmp_path: Path, small_pieces: None) -> None:
    """Read in pieces on a thread: a byte flipped in any one record, one read into a
    live tensor later or one read into fresh optimizer state, fails the resume with the
    model and the optimizer untouched."""
    good = tmp_path / "good"
    _trained(good)
    (path,) = good.glob("*.pt")
    with zipfile.ZipFile(path) as archive:
        heads = [i.header_offset for i in archive.infolist() if "/data/" in i.filename and i.file_size]
    for i, head in enumerate(heads):
        run = tmp_path / f"flip{i}"
        shutil.copytree(good, run)
        data = bytearray((run / path.name).read_bytes())
        name_len, extra_len = struct.unpack("<HH", data[head + 26: head + 30])  # the local header's
        data[head + 30 + name_len + extra_len] ^= 0x02
        (run / path.name).write_bytes(bytes(data))
        fresh = _model()
        fresh_opt = torch.optim.Adam(fresh.parameters())
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with CheckpointManager(run, model=fresh, optimizer=fresh_opt) as mgr, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointNotFoundError):
                mgr.resume()
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, before[k]), (head, k)
        assert fresh_opt.state_dict()["state"] == {}
    assert len(heads) > 10


def test_damage_in_the_second_stream_is_found_before_anything_is_applied(tmp_path: Path,
                                                                         small_pieces: None) -> None:
    """A file read as two streams (its halves): a flipped byte in the last record is in the
    second one, and the combined CRC-32 still finds it before the model is touched."""
    _trained(tmp_path)
    (path,) = tmp_path.glob("*.pt")
    with zipfile.ZipFile(path) as archive:
        last = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.header_offset)
        at = last.header_offset + 30 + len(last.filename.encode()) + len(last.extra)
    assert at > path.stat().st_size // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = _model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with CheckpointManager(tmp_path, model=fresh, optimizer=torch.optim.Adam(fresh.parameters())) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            mgr.resume()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_mismatched_shape_or_dtype_falls_back_to_load_state_dict(tmp_path: Path,
                                                                  direct_calls: List[Any]) -> None:
    model, _ = _trained(tmp_path)
    fresh = _model()
    fresh[2] = torch.nn.Linear(64, 5)  # other shape: skipped with strict=False
    fresh[0].double()  # other dtype: read into a fresh tensor, cast by load_state_dict
    kept = fresh[2].weight.detach().clone()
    with CheckpointManager(tmp_path, model=fresh, strict=False) as mgr, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr.resume()
    assert isinstance(direct_calls[0], directread.Loaded)
    assert torch.equal(fresh[0].weight, model[0].weight.double())
    assert torch.equal(fresh[1].running_mean, model[1].running_mean)
    assert torch.equal(fresh[2].weight, kept)


def test_a_shared_storage_is_read_once_and_stays_shared(tmp_path: Path) -> None:
    """Tied weights (one storage, two keys) are not read into either tensor directly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].weight = model[0].weight
    with CheckpointManager(tmp_path, model=model) as mgr:
        mgr.save(epoch=0)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    fresh[1].weight = fresh[0].weight
    with CheckpointManager(tmp_path, model=fresh) as mgr:
        mgr.resume()
    assert torch.equal(fresh[0].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


def test_not_a_direct_read_where_torch_load_is_needed(tmp_path: Path, direct_calls: List[Any]) -> None:
    """A map_location dict keeps torch.load's path: same values."""
    model, _ = _trained(tmp_path)
    fresh = _model()
    with CheckpointManager(tmp_path, model=fresh, map_location={"cpu": "cpu"}) as mgr:
        mgr.resume()
    assert direct_calls == [None]
    assert torch.equal(fresh[0].weight, model[0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_reads_into_cuda_tensors_through_a_pinned_buffer(tmp_path: Path,
                                                                direct_calls: List[Any]) -> None:
    model, opt = _trained(tmp_path)
    fresh = _model().cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    with CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt, map_location="cuda") as mgr:
        mgr.resume()
    assert isinstance(direct_calls[0], directread.Loaded)
    for (k, want), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(want, got.cpu()), k
    state = fresh_opt.state_dict()["state"]
    assert all(v.device.type == "cuda" for s in state.values() for k, v in s.items() if k != "step")
