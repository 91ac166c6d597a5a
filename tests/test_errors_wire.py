"""ckpt.errors.to_wire/from_wire: how one rank's error is raised on the others (plain
values; only ckpt.errors classes are rebuilt, by name)."""

from __future__ import annotations

import pytest

from ckpt import errors


def test_a_ckpt_error_is_rebuilt_with_the_same_class_and_fields() -> None:
    e = errors.storage_error(OSError(28, "No space left on device"), "/run/ckpt-e1.pt", "writing")
    got = errors.from_wire(errors.to_wire(e), 0, "save() of epoch 1, step 0 (commit)")
    assert type(got) is errors.StorageError and isinstance(got, OSError)
    assert (got.path, got.lead, got.what, got.hint, got.errno) == (e.path, e.lead, e.what, e.hint, 28)
    short = errors.CorruptCheckpointError("checksum mismatch (recorded a, file has b)", summary="checksum mismatch")
    assert errors.from_wire(errors.to_wire(short), 1, "load()").summary == "checksum mismatch"
    assert got.rank == 0 and e.rank is None
    assert str(got) == f"save() of epoch 1, step 0 (commit) failed on rank 0: {e.headline()}\n  hint: {e.hint}"


def test_a_subclass_outside_ckpt_errors_is_rebuilt_as_its_nearest_ckpt_class() -> None:
    class Custom(errors.ConfigError):
        pass

    got = errors.from_wire(errors.to_wire(Custom("bad option", hint="fix it")), 2, "save()")
    assert type(got) is errors.ConfigError and (got.what, got.hint, got.rank) == ("bad option", "fix it", 2)


@pytest.mark.parametrize("kind", [None, "Optional", "pickle", "Exception", "storage_error", "os"])
def test_anything_but_a_ckpt_error_class_name_gives_a_collective_error(kind: object) -> None:
    wire = {"kind": kind, "type": "KeyError", "text": "KeyError: 'x'", "what": "w", "path": None, "lead": None,
            "hint": ""}
    got = errors.from_wire(wire, 0, "save()")
    assert type(got) is errors.CollectiveError
    assert str(got).startswith("save() failed on rank 0: KeyError: 'x'")


def test_a_non_ckpt_exception_travels_as_its_type_and_text_only() -> None:
    wire = errors.to_wire(KeyError("x"))
    assert wire == {"kind": None, "type": "KeyError", "text": "KeyError: 'x'"}
