"""CheckpointManager: save, resume, restore, records, retention across restarts, bad input."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_weights

from ckpt import (
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    StateMismatchError,
    StorageError,
)
from ckpt.catalog import index
from ckpt.catalog.history import HISTORY_NAME
from ckpt.io.checksum import file_checksum
from ckpt.schema import file_name
from ckpt.storage import local as storage


def names(directory: Path) -> list:
    return sorted(p.name for p in Path(directory).iterdir())


def epochs(mgr: CheckpointManager) -> list:
    return [(r.epoch, r.step) for r in mgr.checkpoints]


@pytest.fixture
def history(run_dir, trainables):
    """Three end-of-epoch checkpoints with changing weights; returns (objs, weights per epoch)."""
    objs, seen = trainables(), {}
    with CheckpointManager(run_dir, monitor="loss", **objs) as mgr:
        for epoch, loss in enumerate([0.5, 0.2, 0.9]):
            objs.step()
            mgr.save(epoch=epoch, step=10 * (epoch + 1), metrics={"loss": loss}, extra={"lr": 0.1 / (epoch + 1)})
            seen[epoch] = objs.weights()
    return objs, seen


# -- save and records -----------------------------------------------------------------

def test_save_returns_the_committed_record(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        record = mgr.save(epoch=2, step=30, metrics={"loss": np.float32(0.25), "acc": torch.tensor(0.5)},
                          extra={"lr": 0.01, "ids": torch.arange(3)})
        assert (record.epoch, record.step, record.metrics) == (2, 30, {"loss": 0.25, "acc": 0.5})
        assert record.path == run_dir / file_name(2, 30) and record.path.is_file()
        assert record.size == record.path.stat().st_size and record.time > 0
        assert record.checksum == file_checksum(record.path)
        assert record.extra["lr"] == 0.01 and torch.equal(record.extra["ids"], torch.arange(3))
        assert mgr.latest == record and mgr.checkpoints == [record]
    entry = json.loads((run_dir / index.INDEX_NAME).read_text())["checkpoints"][0]
    assert entry["file"] == record.path.name and entry["metrics"] == {"loss": 0.25, "acc": 0.5}


def test_records_from_a_new_manager_load_extra_lazily(history, run_dir):
    objs, _ = history
    mgr = CheckpointManager(run_dir, **objs)
    first = mgr.checkpoints[0]
    with CheckpointManager(run_dir, **objs) as other:  # replace the file after it was listed
        other.save(epoch=0, step=10, extra={"lr": "replaced"}, overwrite=True)
    assert first.extra == {"lr": "replaced"}  # read on first access, not when listed
    assert [r.extra["lr"] for r in mgr.checkpoints[1:]] == [0.05, 0.1 / 3]


def test_latest_and_best(history, run_dir):
    objs, _ = history
    assert CheckpointManager(run_dir, monitor="loss", **objs).best.epoch == 1
    assert CheckpointManager(run_dir, monitor="loss", mode="max", **objs).best.epoch == 2
    assert CheckpointManager(run_dir, **objs).best is None  # no monitor
    assert CheckpointManager(run_dir, monitor="acc", **objs).best is None  # nothing carries it
    assert CheckpointManager(run_dir, **objs).latest.epoch == 2


def test_epoch_and_step_default_to_the_last_saved_values(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        assert mgr.save().key == (0, 0)
        assert mgr.save(step=20).key == (0, 20)
        assert mgr.save(epoch=1).key == (1, 20)
        assert mgr.save(step=25, mid_epoch=True).key == (1, 25)


def test_a_save_without_metrics_is_allowed_but_a_missing_monitored_metric_is_an_error(run_dir, trainables):
    """Retention (see docs/explanation/retention.md): a step checkpoint without metrics is
    normal; an epoch's metrics without the monitored name is a typo, which must never make best-K delete history."""
    with CheckpointManager(run_dir, keep_best=1, keep_last=5, monitor="val_loss", **trainables()) as mgr:
        mgr.save(epoch=0, metrics={"val_loss": 1.0})
        mgr.save(epoch=1)  # no metrics: kept by the other rules only
        mgr.save(epoch=1, step=5, mid_epoch=True, metrics={"train_loss": 2.0})  # training metrics mid-epoch
        with pytest.raises(ConfigError, match=r"\['val_los'\] without the monitored 'val_loss'.*closest: 'val_los'"):
            mgr.save(epoch=2, metrics={"val_los": 0.5})
        assert [r.key for r in mgr.checkpoints] == [(0, 0), (1, 0), (1, 5)]
        assert not (run_dir / file_name(2, 0)).exists()


# -- resume ---------------------------------------------------------------------------

def test_resume_restores_everything_and_returns_the_next_epoch(history, run_dir, trainables):
    saved, seen = history
    fresh = trainables(seed=1)
    mgr = CheckpointManager(run_dir, **fresh)
    assert mgr.resume() == 3
    assert same_weights(fresh.weights(), seen[2])
    assert fresh["scheduler"].last_epoch == saved["scheduler"].last_epoch == 3
    assert fresh["optimizer"].state_dict()["state"][0]["step"] == 3
    assert (mgr.epoch, mgr.step) == (2, 30)
    assert mgr.resumed == mgr.latest and mgr.resumed.extra == {"lr": 0.1 / 3}


def test_resume_restores_the_random_number_generators(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        torch.manual_seed(11)
        random.seed(12)
        np.random.seed(13)
        mgr.save(epoch=0)
        expected = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    CheckpointManager(run_dir, **trainables()).resume()
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


def test_resume_after_a_mid_epoch_save_returns_the_same_epoch(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        mgr.save(epoch=0, step=100)
        mgr.save(epoch=1, step=150, mid_epoch=True)
    mgr = CheckpointManager(run_dir, **trainables())
    assert mgr.resume() == 1 and mgr.resumed.mid_epoch and mgr.step == 150


def test_resume_on_a_fresh_directory_returns_zero_and_creates_only_the_lock(run_dir, trainables):
    objs = trainables()
    before = objs.weights()
    mgr = CheckpointManager(run_dir, **objs)
    assert names(run_dir) == [storage.LOCK_NAME]  # decided: the lock file, nothing else
    assert mgr.resume() == 0 and mgr.resumed is None and mgr.checkpoints == [] and mgr.latest is None
    assert names(run_dir) == [storage.LOCK_NAME] and same_weights(objs.weights(), before)


def test_resume_on_a_directory_of_other_files_touches_nothing(tmp_path, trainables, snapshot):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    before = snapshot(tmp_path)
    assert CheckpointManager(tmp_path, **trainables()).resume() == 0
    assert snapshot(tmp_path) == {**before, storage.LOCK_NAME: b""}


def test_truncated_newest_is_skipped_with_a_warning_and_kept_as_corrupt(history, run_dir, trainables):
    _, seen = history
    newest = run_dir / file_name(2, 30)
    data = newest.read_bytes()[:-1000]
    newest.write_bytes(data)
    fresh = trainables(seed=1)
    mgr = CheckpointManager(run_dir, **fresh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mgr.resume() == 2
    messages = [str(w.message) for w in caught]  # one warning, naming the file and where it went
    assert len(messages) == 1, messages
    assert f"skipping damaged checkpoint {newest}" in messages[0] and f"kept as {newest}.corrupt" in messages[0]
    assert same_weights(fresh.weights(), seen[1])
    assert not newest.exists() and (run_dir / (newest.name + ".corrupt")).read_bytes() == data
    assert epochs(mgr) == [(0, 10), (1, 20)]
    assert [e["step"] for e in json.loads((run_dir / index.INDEX_NAME).read_text())["checkpoints"]] == [10, 20]


def test_no_valid_checkpoint_is_an_error_naming_the_damaged_files(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        path = mgr.save(epoch=0).path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="skipping damaged"), pytest.raises(CheckpointNotFoundError) as info:
        CheckpointManager(run_dir, **trainables()).resume()
    assert str(path) in str(info.value) and isinstance(info.value, FileNotFoundError)
    assert (run_dir / (path.name + ".corrupt")).exists()


def test_a_model_that_does_not_fit_is_an_error_not_damage(history, run_dir):
    model = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.ReLU(), torch.nn.Linear(9, 2))
    mgr = CheckpointManager(run_dir, model=model)
    with pytest.raises(StateMismatchError, match=r"0.weight: checkpoint \(8, 4\) vs model \(9, 4\)"):
        mgr.resume()
    assert file_name(2, 30) in names(run_dir)  # not quarantined
    with pytest.warns(UserWarning, match="strict=False skipped"):
        assert CheckpointManager(run_dir, strict=False, model=model).resume() == 3


# -- restore --------------------------------------------------------------------------

@pytest.mark.parametrize("which, kwargs, epoch", [
    ("latest", {}, 2), ("best", {}, 1), (0, {}, 0), (1, dict(step=20), 1), ("latest", dict(step=10), 0),
])
def test_restore_by_name_epoch_and_step(history, run_dir, trainables, which, kwargs, epoch):
    _, seen = history
    fresh = trainables(seed=1)
    mgr = CheckpointManager(run_dir, monitor="loss", **fresh)
    record = mgr.restore(which, **kwargs)
    assert record.epoch == epoch and mgr.resumed is record and mgr.epoch == epoch
    assert same_weights(fresh.weights(), seen[epoch])


def test_restore_an_epoch_picks_its_newest_checkpoint(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        mgr.save(epoch=1, step=15, mid_epoch=True)
        mgr.save(epoch=1, step=20)
        mgr.save(epoch=2, step=30)
        assert mgr.restore(1).key == (1, 20)
        assert mgr.restore(1, step=15).key == (1, 15)


@pytest.mark.parametrize("as_path", [str, Path, "record"])
def test_restore_by_path_or_record(history, run_dir, trainables, as_path):
    _, seen = history
    fresh = trainables(seed=1)
    mgr = CheckpointManager(run_dir, **fresh)
    which = mgr.checkpoints[0] if as_path == "record" else as_path(run_dir / file_name(0, 10))
    assert mgr.restore(which).epoch == 0 and same_weights(fresh.weights(), seen[0])


def test_restore_a_file_outside_the_directory(history, run_dir, tmp_path, trainables):
    _, seen = history
    copy = tmp_path / "elsewhere.pt"
    copy.write_bytes((run_dir / file_name(1, 20)).read_bytes())
    fresh = trainables(seed=1)
    assert CheckpointManager(tmp_path / "other", **fresh).restore(copy).epoch == 1
    assert same_weights(fresh.weights(), seen[1])


@pytest.mark.parametrize("which, kwargs, error, match", [
    (7, {}, CheckpointNotFoundError, r"no checkpoint matches 7 \(committed: e0/s10, e1/s20, e2/s30\)"),
    (1, dict(step=99), CheckpointNotFoundError, "with step 99"),
    ("missing.pt", {}, CheckpointNotFoundError, "no such checkpoint file"),
])
def test_restore_of_something_absent(history, run_dir, which, kwargs, error, match):
    with pytest.raises(error, match=match):
        CheckpointManager(run_dir, **history[0]).restore(which, **kwargs)


def test_restore_best_needs_a_monitor(history, run_dir):
    with pytest.raises(ConfigError, match="monitor="):
        CheckpointManager(run_dir, **history[0]).restore("best")


def test_restore_on_an_empty_directory(run_dir, trainables):
    with pytest.raises(CheckpointNotFoundError, match="committed: none"):
        CheckpointManager(run_dir, **trainables()).restore("latest")


# -- retention across restarts ----------------------------------------------------------

@pytest.mark.parametrize("lose_index", [False, True])
def test_best_k_tracking_survives_restarts(run_dir, trainables, lose_index):
    objs = trainables()
    opts = dict(keep_best=1, monitor="loss", **objs)
    with CheckpointManager(run_dir, **opts) as mgr:
        mgr.save(epoch=0, metrics={"loss": 0.1})
        mgr.save(epoch=1, metrics={"loss": 0.5})
    if lose_index:
        (run_dir / index.INDEX_NAME).unlink()
    with CheckpointManager(run_dir, **opts) as mgr:
        assert [r.metrics["loss"] for r in mgr.checkpoints] == [0.1, 0.5]
        mgr.save(epoch=2, metrics={"loss": 0.9})
        mgr.save(epoch=3, metrics={"loss": 0.8})
        assert epochs(mgr) == [(0, 0), (3, 0)] and mgr.best.epoch == 0
    assert names(run_dir) == sorted([storage.LOCK_NAME, index.INDEX_NAME, HISTORY_NAME,
                                    file_name(0, 0), file_name(3, 0)])


def test_keep_last_and_milestones_on_disk(run_dir, trainables):
    with CheckpointManager(run_dir, keep_last=2, keep_every=3, **trainables()) as mgr:
        for epoch in range(8):
            mgr.save(epoch=epoch)
        mgr.save(epoch=8, step=1, mid_epoch=True)
    assert names(run_dir) == sorted([storage.LOCK_NAME, index.INDEX_NAME, HISTORY_NAME] +
                                    [file_name(e, 0) for e in (2, 5, 7)] + [file_name(8, 1)])


def test_resume_source_is_protected_until_a_newer_commit(run_dir, trainables):
    """Only a commit with a smaller (epoch, step) can meet the protection: here a run that
    restored epoch 1 writes an epoch-0 step checkpoint; the restored file must survive it."""
    opts = dict(keep_best=2, monitor="loss", **trainables())
    with CheckpointManager(run_dir, **opts) as mgr:
        for epoch, loss in enumerate([0.1, 0.2, 0.9, 0.8]):
            mgr.save(epoch=epoch, metrics={"loss": loss})
        assert epochs(mgr) == [(0, 0), (1, 0), (3, 0)]
    mgr = CheckpointManager(run_dir, **opts)
    mgr.restore(1)
    mgr.save(epoch=0, step=5, metrics={"loss": 0.05})  # pushes epoch 1 out of the best two
    assert epochs(mgr) == [(0, 0), (0, 5), (1, 0), (3, 0)]
    mgr.save(epoch=1, step=7, metrics={"loss": 0.99})  # newer than the resume source
    assert epochs(mgr) == [(0, 0), (0, 5), (1, 7), (3, 0)]


# -- duplicates -----------------------------------------------------------------------

def test_saving_the_same_epoch_and_step_twice_is_an_error_and_changes_nothing(run_dir, trainables, snapshot):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        mgr.save(epoch=1, step=5, metrics={"loss": 1.0})
        before = snapshot(run_dir)
        for mid in (False, True):
            with pytest.raises(CheckpointExistsError, match="overwrite=True") as info:
                mgr.save(epoch=1, step=5, metrics={"loss": 2.0}, mid_epoch=mid)
            assert isinstance(info.value, FileExistsError) and file_name(1, 5) in str(info.value)
        assert snapshot(run_dir) == before and mgr.latest.metrics == {"loss": 1.0}
        record = mgr.save(epoch=1, step=5, metrics={"loss": 2.0}, overwrite=True)
        assert mgr.checkpoints == [record] and record.metrics == {"loss": 2.0}
    assert CheckpointManager(run_dir, **trainables()).latest.metrics == {"loss": 2.0}


def test_an_end_of_epoch_save_replaces_a_mid_epoch_one_of_the_same_key(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        mgr.save(epoch=3, step=40, mid_epoch=True)
        with pytest.raises(CheckpointExistsError):
            mgr.save(epoch=3, step=40, mid_epoch=True)
        mgr.save(epoch=3, step=40)
        assert [r.mid_epoch for r in mgr.checkpoints] == [False]
    assert CheckpointManager(run_dir, **trainables()).resume() == 4


# -- lifecycle ------------------------------------------------------------------------

def test_context_manager_and_close(run_dir, trainables):
    with CheckpointManager(run_dir, **trainables()) as mgr:
        mgr.save(epoch=0)
    mgr.close()  # closing twice is fine
    for call in (lambda: mgr.save(epoch=1), mgr.resume, lambda: mgr.restore("latest")):
        with pytest.raises(StorageError, match="closed"):
            call()
    assert epochs(CheckpointManager(run_dir)) == [(0, 0)]


# -- bad input: typed errors, nothing lost ----------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_last=-1), "keep_last=None"),
    (dict(mode="best"), "mode='min'"),
    (dict(keep_best=2), "monitor='val_loss'"),
    (dict(model=object()), "'model' (object) has no state_dict"),
    (dict(epoch=torch.nn.Linear(1, 1)), "'epoch' is a reserved checkpoint entry"),
    (dict(ckpt=torch.nn.Linear(1, 1)), "'ckpt' is a reserved checkpoint entry"),
])
def test_invalid_construction_raises_before_anything_is_written(run_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        CheckpointManager(run_dir, **kwargs)
    assert not run_dir.exists()


def test_a_file_where_the_directory_should_be(tmp_path, trainables):
    path = tmp_path / "runs"
    path.write_bytes(b"my file")
    with pytest.raises(StorageError, match="expected a directory") as info:
        CheckpointManager(path, **trainables())
    assert str(path) in str(info.value) and isinstance(info.value, OSError)
    assert path.read_bytes() == b"my file"


@pytest.mark.parametrize("call, match", [
    (dict(epoch=1, extra={"arr": np.ones(3)}), r"extra\['arr'\] is a numpy.ndarray"),
    (dict(epoch=1, extra={"f": lambda: 0}), r"extra\['f'\] is a builtins.function"),
    (dict(epoch=1, extra={"obj": {"deep": [object()]}}), r"extra\['obj'\]\['deep'\]\[0\] is a builtins.object"),
    (dict(epoch=1, extra=[1, 2]), "extra must be a dict"),
    (dict(epoch="1"), "epoch must be a non-negative int"),
    (dict(epoch=1.0), "epoch must be a non-negative int"),
    (dict(epoch=True), "epoch must be a non-negative int"),
    (dict(epoch=-1), "epoch must be a non-negative int"),
    (dict(epoch=1, step=-5), "step must be a non-negative int"),
    (dict(epoch=1, metrics={"loss": "low"}), "metric 'loss' must be a number"),
    (dict(epoch=1, metrics={"loss": torch.ones(3)}), "metric 'loss' must be a number"),
])
def test_bad_save_arguments_raise_and_leave_everything_as_it_was(run_dir, trainables, snapshot, call, match):
    objs = trainables()
    with CheckpointManager(run_dir, keep_last=1, **objs) as mgr:
        mgr.save(epoch=0, metrics={"loss": 1.0}, extra={"lr": 0.1})
        before = snapshot(run_dir)
        with pytest.raises(ConfigError, match=match):
            mgr.save(**call)
        assert snapshot(run_dir) == before and epochs(mgr) == [(0, 0)]
        assert mgr.save(epoch=1).key == (1, 0)  # the manager still works


def test_warnings_from_a_clean_run_are_none(run_dir, trainables):
    objs = trainables()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with CheckpointManager(run_dir, keep_last=2, keep_best=1, monitor="loss", **objs) as mgr:
            for epoch in range(4):
                objs.step()
                mgr.save(epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
        assert CheckpointManager(run_dir, keep_last=2, **objs).resume() == 4


# -- restore an older checkpoint, then save (issue 11 item 15) -----------------------------

def test_save_after_restoring_an_older_checkpoint_explains_the_restored_counters(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2), monitor="loss", keep_best=3)
    for epoch, loss in enumerate([0.5, 0.1, 0.3]):
        mgr.save(epoch=epoch, metrics={"loss": loss})
    assert mgr.restore("best").epoch == 1
    assert (mgr.epoch, mgr.step) == (1, 0)  # documented: restore() restores the counters
    with pytest.raises(CheckpointExistsError, match="restore") as info:
        mgr.save(metrics={"loss": 0.2})
    assert "counters" in info.value.hint and "epoch=3" in info.value.hint
    mgr.save(epoch=3, metrics={"loss": 0.2})  # the hint's way out works
    assert [r.epoch for r in mgr.checkpoints] == [1, 2, 3]


def test_a_plain_collision_keeps_its_plain_message(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
    mgr.save(epoch=0)
    with pytest.raises(CheckpointExistsError) as info:
        mgr.save(epoch=0)
    assert "restore" not in str(info.value)
