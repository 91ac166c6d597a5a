"""Injected faults at every step of the commit protocol (see docs/explanation/commit-protocol.md).

Each step of a save (the checkpoint's writes, its fsync, its rename, the directory
fsync, the same four for the index, and the deletion of an evicted checkpoint) is made
to fail in turn. After each fault the caller gets a clear error, nothing partial or
temporary is visible, earlier checkpoints and the index are byte-identical, and the next
save works. A last test records the order of the calls and checks it against the commit protocol.
"""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from helpers import snapshot, temporaries

from ckpt import CheckpointManager, StorageError
from ckpt import schema as format
from ckpt.catalog import history, index
from ckpt.format import torchzip
from ckpt.storage import local as storage

KEEP_LAST = 2
Event = Tuple[str, str]  # (operation, what it touched), e.g. ("fsync", "dir")
REAL_CALLS = (os.fsync, os.replace, os.unlink)


def label(path: str, directory: Path) -> str:
    """A stable name for a path the protocol touches."""
    p = Path(path)
    if p == directory:
        return "dir"
    if p.name.startswith(storage.TMP_PREFIX):
        return "tmp-index" if p.name.endswith(index.INDEX_NAME) else "tmp-ckpt"
    if p.name == index.INDEX_NAME:
        return "index"
    return "ckpt" if format.parse_name(p.name) else p.name


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class FaultyFile:
    """The file storage.atomic_write writes through; one write can fail half-way."""

    def __init__(self, raw, injector: Injector) -> None:
        self._raw, self._injector = raw, injector

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        exc = self._injector.event("write", label(fd_path(self._raw.fileno()), self._injector.directory))
        if exc is not None:
            self._raw.write(view[: len(view) // 2])  # a partial write, as a full disk gives
            raise exc
        return self._raw.write(view)

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    def __enter__(self) -> FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


class Injector:
    """Records protocol calls; makes the n-th call of one kind raise instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = directory
        self.events: List[Event] = []
        self.fault: Optional[Tuple[str, int, BaseException]] = None
        self.armed = False
        self.counts: Dict[str, int] = {}
        real_fsync, real_replace, real_unlink = REAL_CALLS

        def fsync(fd: int) -> None:
            exc = self.event("fsync", label(fd_path(fd), directory))
            if exc is not None:
                raise exc
            real_fsync(fd)

        def replace(src, dst) -> None:  # noqa: ANN001
            exc = self.event("replace", label(os.fspath(dst), directory))
            if exc is not None:
                raise exc
            real_replace(src, dst)

        def unlink(path, *a, **k) -> None:  # noqa: ANN001
            exc = self.event("unlink", label(os.fspath(path), directory))
            if exc is not None:
                raise exc
            real_unlink(path, *a, **k)

        def pwritev(fd: int, buffers, offset: int) -> int:  # noqa: ANN001
            exc = self.event("write", label(fd_path(fd), directory))
            if exc is not None:
                first = memoryview(buffers[0])
                real_pwritev(fd, [first[: len(first) // 2]], offset)  # a partial write, as a full disk gives
                raise exc
            return real_pwritev(fd, buffers, offset)

        real_pwritev = torchzip._PWRITEV
        monkeypatch.setattr(torchzip, "_PWRITEV", pwritev)
        monkeypatch.setattr(torchzip, "IOV_MAX", 2)  # one record per write: faults land throughout the file
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(storage, "open", lambda *a, **k: FaultyFile(open(*a, **k), self),  # noqa: SIM115
                            raising=False)

    def event(self, kind: str, what: str) -> Optional[BaseException]:
        if not self.armed:
            return None
        self.events.append((kind, what))
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if self.fault is not None and self.fault[0] == kind and self.fault[1] == n:
            self.armed = False  # one fault per save; cleanup calls run for real
            return self.fault[2]
        return None

    def arm(self, fault: Optional[Tuple[str, int, BaseException]] = None) -> None:
        self.events, self.counts, self.fault, self.armed = [], {}, fault, True


def manager(directory: Path) -> CheckpointManager:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return CheckpointManager(directory, model=model, optimizer=opt, keep_last=KEEP_LAST, progress=False)


def populated(directory: Path) -> CheckpointManager:
    """Epochs 0-2 saved; keep_last=2 leaves epochs 1 and 2, so the next save evicts epoch 1."""
    mgr = manager(directory)
    for epoch in range(3):
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    return mgr


def dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> List[Event]:
    """The calls of one clean save that evicts a checkpoint."""
    directory = tmp_path / "dry"
    mgr = populated(directory)
    injector = Injector(monkeypatch, directory)
    injector.arm()
    mgr.save(epoch=3)
    injector.armed = False
    return injector.events


def nth_of_kind(events: List[Event], position: int) -> int:
    """How many earlier events share the kind of ``events[position]``."""
    return sum(1 for e in events[:position] if e[0] == events[position][0])


def fault_for(events: List[Event], position: int) -> Tuple[str, int, BaseException]:
    kind = events[position][0]
    exc = OSError(errno.ENOSPC if kind == "write" else errno.EIO, f"injected {kind} failure")
    return kind, nth_of_kind(events, position), exc


def check_fault(directory: Path, mgr: CheckpointManager, injector: Injector,
                fault: Tuple[str, int, BaseException], event: Event) -> None:
    """Inject one fault into the save of epoch 3 and check every promise of the commit protocol."""
    before = snapshot(directory)
    injector.arm(fault)
    with pytest.raises(BaseException) as info:
        mgr.save(epoch=3)
    error = info.value
    injector.armed = False
    assert temporaries(directory) == [], f"{event}: temporary file left behind"
    if event == ("unlink", "ckpt"):  # retention runs after the commit: the new checkpoint is safe
        assert isinstance(error, StorageError) and "committed" in str(error) and "hint:" in str(error)
        after = snapshot(directory)
        assert format.file_name(3, 0) in after and format.file_name(3, 0) in after[index.INDEX_NAME].decode()
        assert all(after[name] == data for name, data in before.items()
                   if name not in (index.INDEX_NAME, history.HISTORY_NAME))
    else:
        if isinstance(fault[2], OSError):
            assert isinstance(error, StorageError), f"{event}: raw {type(error).__name__}: {error}"
            assert error.errno == fault[2].errno and "failed" in str(error) and "hint:" in str(error)
            assert str(directory) in str(error)
        else:
            assert error is fault[2]
        assert snapshot(directory) == before, f"{event}: earlier checkpoints or the index changed"
        assert [r.epoch for r in manager(directory).checkpoints] == [1, 2]
    mgr.save(epoch=4)  # the next save works
    fresh = manager(directory)
    assert fresh.resume() == 5
    assert set(fresh.verify().values()) == {"ok"}
    assert temporaries(directory) == []


NAMED_STEPS = [
    ("write", "tmp-ckpt", 0), ("write", "tmp-ckpt", -1), ("fsync", "tmp-ckpt", 0),
    ("replace", "ckpt", 0), ("fsync", "dir", 0), ("write", "tmp-index", 0),
    ("fsync", "tmp-index", 0), ("replace", "index", 0), ("fsync", "dir", 1), ("unlink", "ckpt", 0),
]


@pytest.mark.parametrize("kind,what,which", NAMED_STEPS,
                         ids=[f"{k}-{w}-{'last' if i < 0 else i}" for k, w, i in NAMED_STEPS])
def test_fault_at_each_commit_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   kind: str, what: str, which: int) -> None:
    events = dry_run(tmp_path, monkeypatch)
    matching = [i for i, e in enumerate(events) if e[0] == kind and e[1] == what]
    position = matching[which]
    directory = tmp_path / "run"
    mgr = populated(directory)
    check_fault(directory, mgr, Injector(monkeypatch, directory), fault_for(events, position),
                events[position])


def sampled(events: List[Event]) -> List[int]:
    """Every fsync, rename and unlink; of each file's run of writes the first two, the
    middle one and the last two (the writes in between fail the same way)."""
    keep: List[int] = []
    for event, group in itertools.groupby(range(len(events)), key=lambda i: events[i]):
        run = list(group)
        if event[0] == "write":
            run = sorted({run[0], run[min(1, len(run) - 1)], run[len(run) // 2], run[max(0, len(run) - 2)], run[-1]})
        keep += run
    return keep


def test_fault_at_every_step_of_a_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fsync, rename and unlink of a save, and writes throughout each file, fail once."""
    events = dry_run(tmp_path, monkeypatch)
    positions = sampled(events)
    assert {events[p] for p in positions} == set(events) and len(positions) > 12
    for position in positions:
        event = events[position]
        directory = tmp_path / f"run{position}"
        mgr = populated(directory)
        check_fault(directory, mgr, Injector(monkeypatch, directory), fault_for(events, position), event)


def test_interrupt_during_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt mid-write propagates as itself and leaves no trace."""
    directory = tmp_path / "run"
    mgr = populated(directory)
    check_fault(directory, mgr, Injector(monkeypatch, directory), ("write", 3, KeyboardInterrupt()),
                ("write", "tmp-ckpt"))


@pytest.mark.parametrize("rename", [0, 1, 2], ids=["unindex-old", "checkpoint", "index"])
def test_a_failed_overwrite_puts_the_old_checkpoint_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         rename: int) -> None:
    """overwrite=True: the old entry leaves the index, the old file is linked aside, the new
    one replaces it, then the index. A failure at any rename restores the old bytes and
    the old index, so a failed save changes nothing (see docs/explanation/commit-protocol.md)."""
    directory = tmp_path / "run"
    mgr = populated(directory)
    before = snapshot(directory)
    injector = Injector(monkeypatch, directory)
    injector.arm(("replace", rename, OSError(errno.EIO, "injected")))
    with pytest.raises(StorageError, match="failed: injected"):
        mgr.save(epoch=2, overwrite=True)
    injector.armed = False
    assert temporaries(directory) == []
    assert snapshot(directory) == before
    assert manager(directory).verify() == {format.file_name(1, 0): "ok", format.file_name(2, 0): "ok"}


def test_an_overwrite_commits_the_new_bytes(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    mgr = populated(directory)
    old = (directory / format.file_name(2, 0)).read_bytes()
    mgr.save(epoch=2, overwrite=True, extra={"second": True})
    assert (directory / format.file_name(2, 0)).read_bytes() != old
    fresh = manager(directory)
    assert fresh.verify() == {format.file_name(1, 0): "ok", format.file_name(2, 0): "ok"}
    assert fresh.latest.extra == {"second": True} and temporaries(directory) == []


def test_commit_order_follows_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit protocol: file fsync -> rename -> dir fsync, then the index the same way, then the
    history's append (not fsynced: a cache of metrics), then deletions."""
    collapsed = []
    for event in dry_run(tmp_path, monkeypatch):
        if not collapsed or collapsed[-1] != event or event[0] != "write":
            collapsed.append(event)
    assert collapsed == [
        ("write", "tmp-ckpt"), ("fsync", "tmp-ckpt"), ("replace", "ckpt"), ("fsync", "dir"),
        ("write", "tmp-index"), ("fsync", "tmp-index"), ("replace", "index"), ("fsync", "dir"),
        ("unlink", "ckpt"),
    ]
