"""Security: files whose pickle would run code are refused everywhere ckpt loads.

Every payload below would create a marker file if it ran. Each is planted where ckpt
reads (a checkpoint it indexed, a file it did not, the index's place, a path given to
restore, a model file, a record's extra, the command line): the load is refused with
an error that names the unsafe global and the explicit opt-in, and the marker never
appears.
"""

from __future__ import annotations

import builtins
import fractions
import json
import os
import pickle
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable, Tuple

import pytest
import torch

import ckpt
from ckpt import CheckpointManager, UnsafeCheckpointError, cli
from ckpt import schema as format
from ckpt.catalog import index
from ckpt.format import torchfile as fileio
from ckpt.io.checksum import file_checksum


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint contains."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Tuple[Any, ...]:
        return self.func, self.args


def payloads(marker: Path) -> dict:
    """name -> (payload, the global an error must name)."""
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "os.popen": (Payload(os.popen, f"touch {marker}"), "os.popen"),
        "subprocess.call": (Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "subprocess.Popen": (Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "builtins.eval": (Payload(builtins.eval, code), "builtins.eval"),
        "builtins.exec": (Payload(builtins.exec, code), "builtins.exec"),
    }


PAYLOADS = list(payloads(Path("x")))


def checkpoint_dict(payload: Any, epoch: int = 1) -> dict:
    """A well-formed ckpt checkpoint with the payload hidden in its extra."""
    model = torch.nn.Linear(4, 4)
    return {"model": model.state_dict(), "epoch": epoch, "step": 0, "metrics": {}, "rng": {},
            "extra": {"innocent": payload},
            "ckpt": {"format": format.FORMAT_VERSION, "library": "ckpt", "mid_epoch": False}}


def make_manager(directory: Path, **options: Any) -> CheckpointManager:
    return CheckpointManager(directory, model=torch.nn.Linear(4, 4), progress=False, **options)


def assert_refused(info: pytest.ExceptionInfo, unsafe_global: str, marker: Path) -> None:
    text = str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)  # what torch's own refusal raises
    assert f"'{unsafe_global}'" in text, text
    assert "weights_only=False" in text and "trust" in text, text
    assert not marker.exists(), "the payload ran"


def plant_indexed(directory: Path, payload: Any) -> Path:
    """Replace the newest checkpoint and fix its index entry, as an attacker with write
    access could: the checksum passes, so the unpickler itself must refuse."""
    mgr = make_manager(directory)
    mgr.save(epoch=0)
    mgr.save(epoch=1)
    path = directory / format.file_name(1, 0)
    torch.save(checkpoint_dict(payload), path)
    data = json.loads((directory / index.INDEX_NAME).read_text())
    data["checkpoints"][-1]["checksum"] = file_checksum(path)
    (directory / index.INDEX_NAME).write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("kind", PAYLOADS)
def test_direct_load_and_restore_path_refuse(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    payload, unsafe = payloads(marker)[kind]
    evil = tmp_path / "evil.pt"
    torch.save(checkpoint_dict(payload), evil)
    with pytest.raises(UnsafeCheckpointError) as info:
        fileio.load(evil)
    assert_refused(info, unsafe, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        make_manager(tmp_path / "run").restore(evil)
    assert_refused(info, unsafe, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        ckpt.load_model(evil)
    assert_refused(info, unsafe, marker)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_resume_and_record_extra_refuse_an_indexed_file(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    payload, unsafe = payloads(marker)[kind]
    directory = tmp_path / "run"
    path = plant_indexed(directory, payload)
    mgr = make_manager(directory)
    with pytest.raises(UnsafeCheckpointError) as info:
        mgr.resume()
    assert_refused(info, unsafe, marker)
    assert path.exists() and mgr.resumed is None  # refused, not mistaken for damage and skipped
    with pytest.raises(UnsafeCheckpointError) as info:
        _ = mgr.checkpoints[-1].extra
    assert_refused(info, unsafe, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        mgr.restore("latest")
    assert_refused(info, unsafe, marker)


def test_checksum_is_checked_before_anything_is_unpickled(tmp_path: Path) -> None:
    """Planted without fixing the index, the file fails its checksum first: it is
    skipped as damaged, and never reaches the unpickler."""
    marker = tmp_path / "marker"
    payload, _ = payloads(marker)["os.system"]
    directory = tmp_path / "run"
    mgr = make_manager(directory)
    mgr.save(epoch=0)
    mgr.save(epoch=1)
    torch.save(checkpoint_dict(payload), directory / format.file_name(1, 0))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert make_manager(directory).resume() == 1
    assert not marker.exists()


def test_unindexed_file_is_refused_and_not_listed(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    directory = tmp_path / "run"
    make_manager(directory).save(epoch=0)
    for epoch, (payload, unsafe) in enumerate(payloads(marker).values(), start=1):
        torch.save(checkpoint_dict(payload, epoch), directory / format.file_name(epoch, 0))
        with pytest.warns(UserWarning, match=f"'{unsafe}'.*\n.*weights_only=False"):
            mgr = make_manager(directory)
        assert [r.epoch for r in mgr.checkpoints] == [0]
        (directory / format.file_name(epoch, 0)).unlink()
    assert not marker.exists()


def test_pickle_in_the_index_position_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    directory = tmp_path / "run"
    mgr = make_manager(directory)
    mgr.save(epoch=0)
    for payload, _ in payloads(marker).values():
        (directory / index.INDEX_NAME).write_bytes(pickle.dumps(payload))
        with pytest.warns(UserWarning, match="index unreadable"):
            assert make_manager(directory).resume() == 1
    torch.save(payloads(marker)["os.system"][0], directory / index.INDEX_NAME)  # torch's zip format too
    with pytest.warns(UserWarning, match="index unreadable"):
        assert make_manager(directory).resume() == 1
    assert not marker.exists()


def test_command_line_inspect_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    payload, unsafe = payloads(marker)["os.system"]
    evil = tmp_path / "evil.pt"
    torch.save(checkpoint_dict(payload), evil)
    assert cli.main(["inspect", str(evil)]) != 0
    err = capsys.readouterr().err
    assert unsafe in err and "weights_only=False" in err
    assert not marker.exists()


def test_explicit_opt_in_loads_a_trusted_file(tmp_path: Path) -> None:
    """The opt-in the error names works (with a harmless non-allow-listed type)."""
    trusted = tmp_path / "trusted.pt"
    torch.save(checkpoint_dict(fractions.Fraction(1, 3)), trusted)
    with pytest.raises(UnsafeCheckpointError, match="'fractions.Fraction'"):
        make_manager(tmp_path / "a").restore(trusted)
    mgr = make_manager(tmp_path / "b", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about trusted loads
        record = mgr.restore(trusted)
    assert mgr.resumed.extra == {"innocent": fractions.Fraction(1, 3)} and record.epoch == 1
