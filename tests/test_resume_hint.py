"""resume()'s error says what happened to the damaged files: *.corrupt only when moved."""

from __future__ import annotations

from pathlib import PurePath
from types import SimpleNamespace

import pytest

from ckpt import CheckpointManager, CheckpointNotFoundError
from ckpt import resume as resume_mod
from ckpt.errors import CorruptCheckpointError


def test_gone_files_are_not_said_to_be_kept_as_corrupt() -> None:
    rec = SimpleNamespace(path=PurePath("/run/ckpt-e000001-s000000000.pt"))

    def load(record: object) -> object:
        raise FileNotFoundError(str(rec.path))

    with pytest.raises(CheckpointNotFoundError) as err:
        resume_mod.newest_valid(lambda: [rec], load, lambda r, e: False, PurePath("/run"))  # type: ignore[list-item]
    assert "nothing was moved or deleted" in str(err.value)
    assert "*.corrupt" not in str(err.value)


@pytest.mark.parametrize("moved, expected", [(2, "kept as *.corrupt"), (0, "nothing was moved"),
                                             (1, "1 of them were kept as *.corrupt")])
def test_the_hint_counts_what_was_moved(moved: int, expected: str) -> None:
    recs = [SimpleNamespace(path=PurePath(f"/run/{i}.pt"), aside=i >= 2 - moved) for i in range(2)]
    gone: list = []

    def skip(record: SimpleNamespace, error: BaseException) -> bool:
        if record.aside:
            gone.append(record)  # moved aside: the next listing no longer has it
        return bool(record.aside)

    def load(record: object) -> object:
        raise CorruptCheckpointError("damaged", path=PurePath("/run/x.pt"))

    with pytest.raises(CheckpointNotFoundError) as err:
        resume_mod.newest_valid(lambda: [r for r in recs if r not in gone], load, skip, PurePath("/run"))  # type: ignore[arg-type]
    assert expected in str(err.value)


def test_a_damaged_only_checkpoint_is_moved_and_the_hint_says_so(run_dir, trainables) -> None:
    with CheckpointManager(run_dir, **trainables()) as mgr:
        rec = mgr.save(epoch=0)
    data = bytearray(rec.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rec.path.write_bytes(bytes(data))
    with pytest.warns(UserWarning), pytest.raises(CheckpointNotFoundError) as err:
        CheckpointManager(run_dir, **trainables()).resume()
    assert "kept as *.corrupt" in str(err.value)
    assert list(run_dir.glob("*.corrupt"))
