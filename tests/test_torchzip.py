"""The torch-format writer: the file torch.save writes, byte for byte where it matters.

Every property is checked against torch itself: the pickle equals ``torch.save``'s,
``torch.load`` (plain and ``mmap``, ``weights_only``) gives the same values, Python's
``zipfile`` finds every record's CRC-32 right, and the returned checksum is the file's.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt import CheckpointManager
from ckpt.format import torchpickle, torchzip
from ckpt.io.checksum import file_checksum, format_checksum

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool, torch.complex64]


def write(plan: torchzip.Plan, path: Path) -> str:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size, crc = plan.write(fd)
    finally:
        os.close(fd)
    assert size == path.stat().st_size
    return format_checksum(crc)


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def torch_pickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return archive.read("archive/data.pkl")


def check_file(obj: Any, path: Path, checksum: str) -> None:
    """Everything torch and zipfile can say about the file we wrote."""
    assert checksum == file_checksum(path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every record's CRC-32
        assert archive.read("archive/data.pkl") == torch_pickle(obj)
        alignment = int(archive.read("archive/.storage_alignment"))
        for info in archive.infolist():
            if info.filename.startswith("archive/data/"):
                with open(path, "rb") as f:
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                assert (info.header_offset + 30 + name_len + extra_len) % alignment == 0
    for mmap in (False, True):
        assert same(obj, torch.load(path, weights_only=True, mmap=mmap))


@st.composite
def a_tensor(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    t = (torch.arange(int(torch.tensor(shape).prod()) if shape else 1) % 7).to(dtype).reshape(shape)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # not contiguous
    if t.numel() > 2 and draw(st.booleans()):
        t = t.reshape(-1)[1:]  # an offset into a larger storage
    return t


leaves = st.one_of(a_tensor(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=4), st.none())
states = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=states)
def test_any_state_is_torchs_file(tmp_path: Path, obj: Any) -> None:
    path = tmp_path / "x.pt"
    check_file(obj, path, write(torchzip.Plan(obj), path))


def shared_state() -> Dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32)
    return {"base": base, "view": base[3:9].reshape(2, 3), "again": base, "empty": torch.zeros(0),
            "scalar": torch.tensor(2.5), "half": torch.ones(3, dtype=torch.float16), "n": [1, 2.0, "x"]}


def test_shared_storage_is_written_once_and_shared_again(tmp_path: Path) -> None:
    obj = shared_state()
    path = tmp_path / "x.pt"
    check_file(obj, path, write(torchzip.Plan(obj), path))
    back = torch.load(path, weights_only=True)
    assert back["view"].untyped_storage().data_ptr() == back["base"].untyped_storage().data_ptr()
    with zipfile.ZipFile(path) as archive:
        expected = [n for n in zipfile.ZipFile(io.BytesIO(saved(obj))).namelist() if n != "archive/version"]
        assert [n for n in archive.namelist() if n != "archive/version"] == expected


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_zip64_records_and_end_records_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 4 GiB and over 65,535 records, fields move to zip64 extras: forced here at small sizes."""
    monkeypatch.setattr(torchzip, "ZIP32_LIMIT", 200)
    monkeypatch.setattr(torchzip, "ZIP16_LIMIT", 3)
    obj = {"big": torch.arange(1000, dtype=torch.float64), "small": torch.ones(3), **shared_state()}
    path = tmp_path / "x.pt"
    check_file(obj, path, write(torchzip.Plan(obj), path))


def big_state() -> Dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"w{i}": torch.randn(1000 + i) for i in range(40)}


@pytest.mark.parametrize("writers,iov_max,writeback", [(1, 2, 1 << 40), (3, 1024, 4096), (4, 5, 1)])
def test_threads_batches_and_writeback_give_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          writers: int, iov_max: int, writeback: int) -> None:
    monkeypatch.setattr(torchzip, "PARALLEL_MIN", 0)
    monkeypatch.setattr(torchzip, "WRITERS", writers)
    monkeypatch.setattr(torchzip.os, "cpu_count", lambda: writers)
    monkeypatch.setattr(torchzip, "IOV_MAX", iov_max)
    monkeypatch.setattr(torchzip, "WRITEBACK_EVERY", writeback)
    obj = big_state()
    plan = torchzip.Plan(obj)
    assert len(plan._groups()) == writers
    path = tmp_path / "x.pt"
    check_file(obj, path, write(plan, path))
    streamed = io.BytesIO()
    plan.stream(streamed)
    assert streamed.getvalue() == path.read_bytes()  # one layout, written in order or at offsets


def test_one_stream_writes_in_file_order_while_the_next_batch_is_summed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default large-state path: one stream, contiguous and in order (so the file is
    laid out in few extents), the CRC-32s summed ahead on a helper thread, the writeback
    asked for after every batch."""
    monkeypatch.setattr(torchzip, "PARALLEL_MIN", 0)
    monkeypatch.setattr(torchzip, "WRITEBACK_EVERY", 3000)
    writes: List[Any] = []
    real = os.pwritev

    def record(fd: int, buffers: List[Any], offset: int) -> int:
        writes.append((offset, threading.current_thread().name))
        return real(fd, buffers, offset)
    flushed: List[int] = []
    monkeypatch.setattr(torchzip, "_PWRITEV", record)
    monkeypatch.setattr(torchzip, "start_writeback", lambda fd, start, end: flushed.append(end) or True)
    obj = big_state()
    plan = torchzip.Plan(obj)
    assert torchzip.WRITERS == 1 and len(plan._groups()) == 1
    path = tmp_path / "x.pt"
    check_file(obj, path, write(plan, path))
    offsets = [o for o, _ in writes]
    assert len(writes) > 10 and offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert {name for _, name in writes} == {threading.current_thread().name}  # one stream: the caller's
    assert len(flushed) > 5 and flushed == sorted(flushed) and flushed[-1] <= plan.data_end


def test_a_failed_write_stops_the_helper_and_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchzip, "PARALLEL_MIN", 0)
    monkeypatch.setattr(torchzip, "WRITEBACK_EVERY", 3000)
    real, calls = os.pwritev, []

    def failing(fd: int, buffers: List[Any], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(fd, buffers, offset)
    monkeypatch.setattr(torchzip, "_PWRITEV", failing)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(OSError, match="No space"):
        write(torchzip.Plan(big_state()), tmp_path / "x.pt")
    assert len(calls) == 3
    assert {t.ident for t in threading.enumerate() if t.name.startswith("ckpt-write")} - before == set()


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def short(fd: int, buffers: List[Any], offset: int) -> int:
        return real(fd, [memoryview(buffers[0])[:1000]], offset)  # a signal, a quota: less than asked
    monkeypatch.setattr(torchzip, "_PWRITEV", short)
    obj = big_state()
    path = tmp_path / "x.pt"
    check_file(obj, path, write(torchzip.Plan(obj), path))


def test_progress_counts_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchzip, "PARALLEL_MIN", 0)
    monkeypatch.setattr(torchzip, "WRITEBACK_EVERY", 8192)
    seen: List[int] = []
    plan = torchzip.Plan(big_state())
    fd = os.open(tmp_path / "x.pt", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size, _ = plan.write(fd, seen.append)
    finally:
        os.close(fd)
    assert len(seen) > 1 and sum(seen) == plan.data_end < size


class Tagged(torch.Tensor):
    pass


def unsupported() -> List[Any]:
    with_attribute = torch.ones(2)
    with_attribute.note = "kept by torch.save"  # type: ignore[attr-defined]
    base = torch.arange(4, dtype=torch.int32)
    cases = [torch.nn.Parameter(torch.ones(2)), with_attribute, torch.ones(2, dtype=torch.complex64).conj(),
             torch.ones(2, 2).to_sparse(), torch.ones(2).as_subclass(Tagged), torch.ones(2).untyped_storage(),
             [base, base.view(torch.float32)]]
    if hasattr(torch, "uint16"):
        cases.append(torch.ones(2, dtype=torch.uint16))  # a dtype torch writes with _rebuild_tensor_v3
    return cases


@pytest.mark.parametrize("value", unsupported(), ids=lambda v: type(v).__name__)
def test_what_only_torch_writes_is_refused_before_any_byte(value: Any) -> None:
    with pytest.raises(torchzip.Unsupported):
        torchzip.Plan({"x": value})


@pytest.mark.parametrize("value", [v for v in unsupported() if type(v) is torch.Tensor],
                         ids=lambda v: str(v.dtype) + str(v.layout))
def test_the_manager_saves_those_through_torch(tmp_path: Path, value: torch.Tensor) -> None:
    """Plain tensors torch serialises specially reach the file all the same."""
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), progress=False)
    mgr.save(epoch=0, extra={"x": value})
    assert mgr.latest is not None and mgr.verify() == {mgr.latest.name: "ok"}
    got = torch.load(mgr.latest.path, weights_only=True)["extra"]["x"]
    assert got.dtype == value.dtype and got.layout == value.layout and got.is_conj() == value.is_conj()
    assert torch.equal(got.to_dense().resolve_conj(), value.to_dense().resolve_conj())


def test_the_switching_pickler_writes_the_method_picklers_bytes() -> None:
    """persistent_id as a C no-op except around storage references: the same pickle."""
    shared = torch.arange(6.0)
    obj = {"model": {f"l{i}.weight": torch.randn(3, 2) for i in range(50)},
           "tied": [shared, shared[2:], {"again": shared.view(2, 3)}], "n": (1, 2.5, "s", None, b"x"),
           "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, dtype=torch.float16)}}}}
    out = []
    for cls in (torchpickle._MethodPickler, torchpickle._TogglingPickler):
        buffer = io.BytesIO()
        cls(buffer).dump(obj)
        out.append(buffer.getvalue())
    if torchpickle._pickler_class() is torchpickle._TogglingPickler:
        assert out[0] == out[1]
    else:  # this interpreter ignores the switch: the method pickler is the one used
        assert torchpickle._pickler_class() is torchpickle._MethodPickler
