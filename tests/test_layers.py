"""The import graph of ckpt/ points down only (README "Architecture"), and the
save/resume path never loads model portability."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import ckpt

ROOT = Path(ckpt.__file__).parent

#: Layer of each top-level module or package; a module may import only layers <= its own.
#: The run directory's code is four packages, low to high: ``io`` (checksums, POSIX
#: helpers), ``storage`` (back-ends), ``format`` (file formats), ``catalog`` (committed
#: checkpoints); ``store`` is the deprecated re-export shim (nothing in ckpt imports it).
LAYERS = {
    "errors": 0, "_version": 0, "progress": 0, "verdicts": 0,
    "policy": 1, "cadence": 1,
    "schema": 2, "record": 2,
    "loaders": 3, "state": 3, "spec": 3, "specvalues": 3, "sampler": 3, "preemption": 3,
    "io": 4, "storage": 5, "format": 6, "catalog": 7, "store": 7,
    "background": 8, "distributed": 8, "models": 8, "interop": 8,
    "options": 8, "resume": 8, "engine": 9,
    "manager": 10, "cli": 11, "integrations": 11, "__main__": 11, "__init__": 11,
}

#: The format layer: the only modules that call ``torch.save`` / ``torch.load``.
FORMAT = {"format/torchfile.py", "format/torchio.py"}


def top(module: str) -> str:
    return module.split(".")[0]


def imports_of(path: Path) -> Set[str]:
    """Top-level ckpt modules that ``path`` imports (relative or absolute)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                found.add(parts[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckpt."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ckpt."))
    return found


def test_every_import_points_down() -> None:
    upward: Dict[str, Set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert own in LAYERS, f"{rel}: add its layer to LAYERS (and to the README's Architecture table)"
        bad = {m for m in imports_of(path) if m in LAYERS and LAYERS[m] > LAYERS[own]}
        if bad:
            upward[str(rel)] = bad
    assert upward == {}


def test_the_run_directory_packages_import_down_only() -> None:
    """io < storage < format < catalog, each package importing only its own layer or lower
    (the format never calls back into a back-end: it reads files through ckpt.io)."""
    order = ["io", "storage", "format", "catalog"]
    seen: Dict[str, Set[str]] = {}
    for package in order:
        for path in sorted((ROOT / package).rglob("*.py")):
            above = {m for m in imports_of(path) if m in order[order.index(package) + 1:] or m == "store"}
            if above:
                seen[path.relative_to(ROOT).as_posix()] = above
    assert seen == {}
    assert {m for m in imports_of(ROOT / "io" / "checksum.py") | imports_of(ROOT / "io" / "posix.py")
            if m in LAYERS} <= {"errors"}


def test_nothing_in_ckpt_imports_the_deprecated_store_shim() -> None:
    users = sorted(path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*.py")
                   if path.parent.name != "store" and "store" in imports_of(path))
    assert users == []


def test_the_store_shim_is_the_new_modules() -> None:
    from ckpt.store.local import LocalStore as old

    import ckpt.store
    from ckpt.catalog import Catalog, index
    from ckpt.storage.local import LocalStore

    assert old is LocalStore and ckpt.store.Catalog is Catalog and ckpt.store.index is index


def test_save_and_resume_never_load_model_portability(tmp_path: Path) -> None:
    script = f"""
import sys, torch
from ckpt import CheckpointManager
model = torch.nn.Linear(3, 2)
mgr = CheckpointManager({str(tmp_path)!r}, model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                        keep_last=2, async_save=True)
for epoch in range(3):
    mgr.save(epoch=epoch, metrics={{"loss": 1.0 / (epoch + 1)}})
mgr.close()
again = CheckpointManager({str(tmp_path)!r}, model=model)
assert again.resume() == 3 and again.verify()
loaded = sorted(m for m in sys.modules if m.startswith(("ckpt.models", "ckpt.interop")))
print(loaded)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_format_layer_calls_torch_save_and_load() -> None:
    callers: Dict[str, Set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("save", "load")
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                callers.setdefault(path.relative_to(ROOT).as_posix(), set()).add(f"torch.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module == "torch":
                named = {a.name for a in node.names} & {"save", "load"}
                if named:
                    callers.setdefault(path.relative_to(ROOT).as_posix(), set()).update(named)
    assert set(callers) <= FORMAT, {k: v for k, v in callers.items() if k not in FORMAT}


#: A module holds one responsibility: 400 lines at most, every module alike.
MAX_LINES = 400


def test_every_module_is_at_most_400_lines() -> None:
    long = {path.relative_to(ROOT).as_posix(): n for path in sorted(ROOT.rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, "split these modules by responsibility"


#: Names a manager goes by outside manager.py (the engines see it as a ManagerView).
MANAGER_NAMES = {"mgr", "manager"}


def _is_manager(node: ast.expr) -> bool:
    """``mgr``, ``manager``, or an attribute holding one (``self._mgr``, ``trainer.manager``)."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lstrip("_") in MANAGER_NAMES


def test_nothing_outside_the_manager_touches_its_private_attributes() -> None:
    """The engines (and everything else: benchmarks, examples) use the manager through its
    public attributes and ckpt.engine.base.ManagerView; ``mgr._x`` outside manager.py is a
    visitor of its privates."""
    private: Dict[str, Set[str]] = {}
    paths = [*ROOT.rglob("*.py"), *(ROOT.parent / "benchmarks").rglob("*.py"),
             *(ROOT.parent / "examples").rglob("*.py")]
    for path in sorted(paths):
        if path == ROOT / "manager.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _is_manager(node.value)):
                private.setdefault(path.relative_to(ROOT.parent).as_posix(), set()).add(ast.unparse(node))
    assert private == {}


#: A function does one thing: 50 lines at most, from its ``def`` to its last line.
MAX_FUNCTION_LINES = 50


def test_every_function_is_at_most_50_lines() -> None:
    long = {f"{path.relative_to(ROOT).as_posix()}:{node.name}": n
            for path in sorted(ROOT.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_FUNCTION_LINES}
    assert long == {}, "split these functions"


def _storage_classes() -> Set[str]:
    """The storage package's back-ends, sharded checkpoint trees and capability Protocols
    (not its value types)."""
    return {node.name for path in (ROOT / "storage").rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
            and (node.name.endswith(("Store", "Claim", "Tree"))
                 or any(ast.unparse(b) == "Protocol" for b in node.bases))}


def test_no_caller_probes_a_store() -> None:
    """Outside ckpt/storage/ a store is asked for its capabilities (storage.base.capabilities),
    and a sharded checkpoint's tree for its own (``tree.capabilities()``), never probed: no
    ``getattr(<a store>, "name", ...)``, no ``hasattr`` on one, no ``isinstance(x, <a
    storage class>)`` -- back-ends, trees (``LocalTree``/``ObjectTree``/``TieredTree``) and
    Protocols alike."""
    classes = _storage_classes()
    probes: Dict[str, Set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("storage", "store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2):
                continue
            first, second = node.args[0], node.args[1]
            if (node.func.id in ("getattr", "hasattr") and isinstance(second, ast.Constant)
                    and isinstance(second.value, str) and "store" in ast.unparse(first).lower()):
                probes.setdefault(rel.as_posix(), set()).add(ast.unparse(node))
            elif node.func.id == "isinstance":
                named = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(second)
                         if isinstance(n, (ast.Name, ast.Attribute))}
                if named & classes:
                    probes.setdefault(rel.as_posix(), set()).add(ast.unparse(node))
    assert probes == {}, "use ckpt.storage.base.capabilities(store) instead"


def test_the_record_list_has_one_owner() -> None:
    """The committed records are kept once, by the catalog's book (ckpt/catalog/book.py):
    the manager shows them, the engines and the other ranks of a process group change
    them only through the catalog (commit, scan, adopt). No ``x.records = ...`` anywhere
    else in ckpt/, so no second copy can disagree with it."""
    owners = {"catalog/book.py"}
    assigned: Dict[str, Set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for sub in (n for t in targets for n in ast.walk(t)):
                if not (isinstance(sub, ast.Attribute) and sub.attr == "records"):
                    continue
                if ast.unparse(sub.value) != "self" or rel == "manager.py" or rel.startswith("engine/"):
                    assigned.setdefault(rel, set()).add(ast.unparse(sub))  # (self.records elsewhere: zip records)
    assert assigned == {}


def test_the_manager_shows_the_catalogs_records(tmp_path: Path) -> None:
    import pytest
    import torch

    from ckpt import CheckpointManager

    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), keep_last=2)
    for epoch in range(3):
        mgr.save(epoch=epoch)
    assert mgr.checkpoints == mgr.catalog.records == mgr.records
    assert [r.epoch for r in mgr.checkpoints] == [1, 2]
    with pytest.raises(AttributeError):
        mgr.records = []  # type: ignore[misc]
    mgr.checkpoints.clear()  # a copy: the catalog's list is not changed through it
    assert [r.epoch for r in mgr.catalog.records] == [1, 2]
