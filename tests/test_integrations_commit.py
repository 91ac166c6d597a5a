"""The single-file commit of the trainer integrations, SIGKILLed at every step of a save
and of a removal: each committed file always has a record that verifies it, a reader
never sees a file it cannot verify, and the next writer leaves every file with its
sidecar and nothing half-done (docs/howto/lightning.md, "Checksums")."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ckpt.integrations import _files
from ckpt.storage import LocalStore

pytest.importorskip("pytorch_lightning")

from ckpt.integrations.lightning import CheckpointIO, last_checkpoint  # noqa: E402

#: The store operations of one save, in order: staged file, pending sidecar, two renames.
SAVE_STEPS = ("write", "write", "move", "move")


class _KillAt:
    """A store that SIGKILLs its own process just before its ``at``-th write/move/delete."""

    def __init__(self, store: LocalStore, at: int) -> None:
        self._store, self._at, self._calls = store, at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _op(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._calls == self._at:
                os.kill(os.getpid(), signal.SIGKILL)
            self._calls += 1
            return fn(*args, **kwargs)
        return call

    def write(self, *a: Any, **k: Any) -> Any:
        return self._op(self._store.write)(*a, **k)

    def move(self, *a: Any, **k: Any) -> Any:
        return self._op(self._store.move)(*a, **k)

    def delete(self, *a: Any, **k: Any) -> Any:
        return self._op(self._store.delete)(*a, **k)


def _in_killed_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked child (which kills itself); its exit signal, reaped."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            work()
        except BaseException:
            os._exit(1)  # an error is not a clean finish: the caller sees status 1
        os._exit(0)
    end = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return os.WTERMSIG(status)
            assert os.WEXITSTATUS(status) == 0, "the child's work raised instead of finishing or being killed"
            return 0
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the save did not finish before the deadline")
        time.sleep(0.01)


def _state(step: int) -> dict:
    return {"epoch": step // 10, "global_step": step, "w": torch.full((1000,), float(step))}


def _sidecars_match_files(d: Path) -> None:
    files = {p.name for p in d.glob("*.ckpt")}
    assert files == {p.name[: -len(_files.SIDECAR)] for p in d.glob("*.ckpt" + _files.SIDECAR)}
    assert not [p.name for p in d.iterdir() if p.name.endswith((_files.STAGED, _files.PENDING))]


@pytest.mark.parametrize("at", range(len(SAVE_STEPS) + 1))
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "new-name"])
def test_save_killed_at_each_step(tmp_path: Path, at: int, overwrite: bool) -> None:
    ckpt_io = CheckpointIO()
    ckpt_io.save_checkpoint(_state(10), tmp_path / "epoch=1.ckpt")
    if overwrite:
        ckpt_io.save_checkpoint(_state(10), tmp_path / "last.ckpt")
    name = "last.ckpt" if overwrite else "epoch=2.ckpt"

    def work() -> None:
        _files.save(_KillAt(LocalStore(tmp_path), at), name, _state(20), {"global_step": 20, "epoch": 2})

    assert _in_killed_child(work) == (signal.SIGKILL if at < len(SAVE_STEPS) else 0)
    # a reader, before any writer came back: every file there verifies; the newest is found
    for path in tmp_path.glob("*.ckpt"):
        ckpt_io.load_checkpoint(path)
    newest = last_checkpoint(tmp_path)
    assert newest is not None
    renamed_in = at >= 3
    assert ckpt_io.load_checkpoint(newest)["global_step"] == (20 if renamed_in else 10)
    if renamed_in:
        assert newest == str(tmp_path / name)
    # the next writer (a new run) settles: a save whose file and record were durable is completed
    CheckpointIO().save_checkpoint(_state(5), tmp_path / "other.ckpt")
    _sidecars_match_files(tmp_path)
    if (tmp_path / name).exists():
        assert ckpt_io.load_checkpoint(tmp_path / name)["global_step"] == (20 if at >= 2 else 10)
    assert (tmp_path / name).exists() == (overwrite or at >= 2)


def test_removal_killed_between_its_deletes(tmp_path: Path) -> None:
    ckpt_io = CheckpointIO()
    for step in (10, 20):
        ckpt_io.save_checkpoint(_state(step), tmp_path / f"s{step}.ckpt")
    assert _in_killed_child(lambda: _files.remove(_KillAt(LocalStore(tmp_path), 1), "s20.ckpt")) == signal.SIGKILL
    assert last_checkpoint(tmp_path) == str(tmp_path / "s10.ckpt")
    CheckpointIO().save_checkpoint(_state(30), tmp_path / "s30.ckpt")
    _sidecars_match_files(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["s10.ckpt", "s30.ckpt"]
