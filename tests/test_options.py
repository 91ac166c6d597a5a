"""Options are checked when the manager is created or save() is called, before anything is
read or written: a configuration mistake is a ConfigError, never damage, never data loss
(issue 11 items 1, 11, 12, 13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.errors import ConfigError


def saved_run(directory: Path, epochs: int = 3) -> None:
    with CheckpointManager(directory, model=torch.nn.Linear(4, 2), progress=False) as mgr:
        for epoch in range(epochs):
            mgr.save(epoch=epoch)


def files(directory: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# -- 1: a wrong map_location is a configuration error, never damage -----------------------

@pytest.mark.parametrize("where", ["mps", "CPU", "cpu:1", "cdua", "cuda:99", "xla", 3.5])
def test_a_map_location_this_machine_cannot_load_onto_is_refused_and_quarantines_nothing(
        tmp_path: Path, where: Any) -> None:
    if where == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has a 100th GPU")
    saved_run(tmp_path)
    before = files(tmp_path)
    with pytest.raises(ConfigError, match="map_location"):
        CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2), map_location=where).resume()
    assert files(tmp_path) == before  # nothing renamed *.corrupt, the index untouched
    assert CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2)).resume() == 3


def test_a_map_location_function_that_fails_is_re_raised_and_the_file_kept(tmp_path: Path) -> None:
    # torch's device errors mention "storage"; what failed is the function, not the bytes.
    saved_run(tmp_path)
    before = files(tmp_path)

    def refuse(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        raise RuntimeError(f"cannot map storage from {location}: unpickling storage failed, corrupted?")

    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2), map_location=refuse)
    with pytest.raises(RuntimeError, match="cannot map storage"):
        mgr.resume()
    assert files(tmp_path) == before
    assert len(mgr.refresh()) == 3


# -- 11: flags are bools, metrics a dict -------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("weights_only", 0), ("weights_only", "False"), ("strict", "yes"), ("strict", None),
    ("async_save", 1), ("progress", "never"),
])
def test_manager_flags_must_be_bools(tmp_path: Path, option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=option):
        CheckpointManager(tmp_path / "run", model=torch.nn.Linear(4, 2), **{option: value})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value", [("overwrite", "no"), ("overwrite", 1), ("mid_epoch", 1),
                                           ("mid_epoch", "True")])
def test_save_flags_must_be_bools_and_nothing_is_written(tmp_path: Path, option: str, value: Any) -> None:
    saved_run(tmp_path, epochs=1)
    before = files(tmp_path)
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=option):
        mgr.save(epoch=0, **{option: value})
    assert files(tmp_path) == before


@pytest.mark.parametrize("metrics", [[0.5], "loss=0.5", 0.5, (("loss", 0.5),)])
def test_metrics_that_are_not_a_dict_are_a_config_error(tmp_path: Path, metrics: Any) -> None:
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="metrics"):
        mgr.save(epoch=0, metrics=metrics)
    assert mgr.checkpoints == [] and not list(tmp_path.glob("*.pt"))


# -- 12: a misspelled option is named as such ---------------------------------------------

@pytest.mark.parametrize("typo, meant, value", [
    ("keep_latest", "keep_last", 3), ("keep_bset", "keep_best", 2), ("monitr", "monitor", "val_loss"),
    ("weight_only", "weights_only", False), ("map_locaton", "map_location", "cpu"),
])
def test_a_misspelled_option_suggests_the_option(tmp_path: Path, typo: str, meant: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"not an option.*did you mean {meant!r}"):
        CheckpointManager(tmp_path / "run", model=torch.nn.Linear(4, 2), **{typo: value})
    assert not (tmp_path / "run").exists()


def test_a_trackable_whose_name_is_close_to_an_option_is_still_tracked(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    mgr = CheckpointManager(tmp_path, model=model, monitors=torch.nn.Linear(2, 2))
    assert set(mgr.trackables) == {"model", "monitors"}


# -- 13: metrics without the monitored one -------------------------------------------------

def test_metrics_without_the_monitored_name_write_nothing_and_name_the_closest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2), monitor="acc", mode="max", keep_best=1)
    with pytest.raises(ConfigError, match=r"\['val_acc', 'val_loss'\].*'acc'.*closest: 'val_acc'"):
        mgr.save(epoch=0, metrics={"val_loss": 0.3, "val_acc": 0.9})
    assert mgr.checkpoints == [] and not list(tmp_path.glob("*.pt"))


def test_a_step_checkpoint_without_metrics_is_still_allowed_and_not_evicted_for_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2), monitor="acc", mode="max", keep_best=2)
    mgr.save(epoch=0, metrics={"acc": 0.5})
    mgr.save(epoch=1, metrics={"acc": 0.7})
    mgr.save(epoch=1, step=10, mid_epoch=True)
    assert [r.key for r in mgr.checkpoints] == [(0, 0), (1, 0), (1, 10)]


# -- the run directory is a path or a URL ------------------------------------------------

class _BytesPath:
    def __fspath__(self) -> bytes:
        return b"runs/exp1"


@pytest.mark.parametrize("directory", [None, 3, 2.5, b"runs/exp1", ["runs"], _BytesPath()],
                         ids=["none", "int", "float", "bytes", "list", "bytes-pathlike"])
def test_a_directory_that_is_not_a_path_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          directory: Any) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"the run directory must be a path, got ") as info:
        CheckpointManager(directory, model=torch.nn.Linear(4, 2))
    assert isinstance(info.value, ValueError) and type(directory).__name__ in str(info.value)
    assert "str path" in info.value.hint and "s3://" in info.value.hint
    assert list(tmp_path.iterdir()) == []  # nothing created, not even under a str() of the value


def test_a_str_path_and_a_path_like_are_run_directories(tmp_path: Path) -> None:
    CheckpointManager(str(tmp_path / "a"), model=torch.nn.Linear(4, 2)).close()
    CheckpointManager(tmp_path / "b", model=torch.nn.Linear(4, 2)).close()
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()
