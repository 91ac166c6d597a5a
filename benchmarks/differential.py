"""Differential checkpoints: bytes written and time per save, differential vs full.

    python -m benchmarks.differential --dir /work/benchtmp [--mib 64] [--saves 4] [--rounds 3]

Workloads, each saved ``--saves`` times per run into fresh directories with ``keep_last=2``
(durable: fsync, rename, directory fsync, evicted files deleted), the first save of each
run not counted:

* ``frozen backbone``: a frozen ``--mib`` MiB backbone and a trained 1 MiB head (an SGD
  step between saves);
* ``embedding 2 % / 10 % / 50 %``: the issue's ``nn.Embedding(200_000, 64)`` (51.2 MB)
  with that fraction of its rows, drawn at random, updated between saves;
* ``fully trained``: a ``--mib`` MiB model whose every weight changes between saves.

A full and a differential manager track the same objects and save after every step, one
after the other (which one first alternates), so each differential save is paired with a
full save of the same state under the same load; the workloads rotate from round to
round. The table reports medians of bytes added to the directory, seconds per ``save()``
(the time the loop waits) and CPU seconds per ``save()`` (``time.process_time``, all
threads: less sensitive than wall time to other processes on a shared machine), and the
medians of the paired ratios to the full save.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from benchmarks import _harness, _results
from ckpt import CheckpointManager

Workload = Tuple[Dict[str, Any], Callable[[int], None]]


def frozen_backbone(mib: int) -> Workload:
    width = 1024
    layers = max(1, (mib << 20) // (width * width * 4))
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    backbone.requires_grad_(False)
    head = torch.nn.Linear(width, 256)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)

    def step(_: int) -> None:
        loss = head(torch.randn(4, width)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"model": torch.nn.Sequential(backbone, head), "optimizer": opt}, step


def embedding(fraction: float) -> Callable[[int], Workload]:
    def make(_: int) -> Workload:
        table = torch.nn.Embedding(200_000, 64)
        g = torch.Generator().manual_seed(0)

        def step(_: int) -> None:
            rows = torch.randperm(table.num_embeddings, generator=g)[:int(table.num_embeddings * fraction)]
            with torch.no_grad():
                table.weight[rows] += 0.01
        return {"embedding": table}, step
    return make


def fully_trained(mib: int) -> Workload:
    width = 1024
    layers = max(1, (mib << 20) // (width * width * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])

    def step(_: int) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
    return {"model": model}, step


WORKLOADS: Dict[str, Callable[[int], Workload]] = {
    "frozen backbone": frozen_backbone, "embedding 2 %": embedding(0.02), "embedding 10 %": embedding(0.10),
    "embedding 50 %": embedding(0.50), "fully trained": fully_trained,
}


def added_bytes(directory: Path, before: Dict[str, Tuple[int, int]]) -> int:
    total = 0
    for p in directory.iterdir():
        if p.name.startswith("ckpt-") and p.is_file():
            st = p.stat()
            if before.get(p.name) != (st.st_ino, st.st_size):
                total += st.st_size
    return total


def snapshot(directory: Path) -> Dict[str, Tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in directory.iterdir() if p.is_file()}


def one_save(mgr: CheckpointManager, directory: Path, epoch: int) -> Tuple[int, float, float]:
    before = snapshot(directory)
    start, start_cpu = time.perf_counter(), time.process_time()
    mgr.save(epoch=epoch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return added_bytes(directory, before), seconds, cpu


def run(root: Path, make: Callable[[int], Workload], mib: int, saves: int,
        first: bool) -> Tuple[Dict[bool, List[Tuple[int, float, float]]], int]:
    """One workload saved by a full and a differential manager side by side: after each
    training step both save, in turn (``first`` saves first on even epochs), so that the
    two saves of a pair see the same load. Returns per mode the (bytes, s, CPU s) of each
    save but the first."""
    torch.manual_seed(0)
    tracked, step = make(mib)
    state = sum(t.nbytes for o in tracked.values() if isinstance(o, torch.nn.Module) for t in o.state_dict().values())
    dirs = {mode: root / ("differential" if mode else "full") for mode in (False, True)}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    mgrs = {mode: CheckpointManager(d, keep_last=2, differential=mode, progress=False, **tracked)
            for mode, d in dirs.items()}
    out: Dict[bool, List[Tuple[int, float, float]]] = {False: [], True: []}
    for epoch in range(saves):
        step(epoch)
        order = (first, not first) if epoch % 2 == 0 else (not first, first)
        for mode in order:
            got = one_save(mgrs[mode], dirs[mode], epoch)
            if epoch:
                out[mode].append(got)
    for mode, mgr in mgrs.items():
        mgr.close()
        shutil.rmtree(dirs[mode], ignore_errors=True)
    return out, state


def measure(root: Path, mib: int, saves: int, rounds: int) -> Dict[str, Any]:
    results: Dict[str, Dict[str, Any]] = {}
    names = list(WORKLOADS)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            got, state = run(root, WORKLOADS[name], mib, saves, first=bool(r % 2))
            for mode in (False, True):
                entry = results.setdefault(f"{name} | {'differential' if mode else 'full'}",
                                           {"bytes": [], "seconds": [], "cpu_seconds": [], "state_bytes": state,
                                            "time_ratio": [], "cpu_ratio": []})
                entry["bytes"].extend(b for b, _, _ in got[mode])
                entry["seconds"].extend(t for _, t, _ in got[mode])
                entry["cpu_seconds"].extend(c for _, _, c in got[mode])
                entry["time_ratio"].extend(t / f[1] for (_, t, _), f in zip(got[mode], got[False]))
                entry["cpu_ratio"].extend(c / f[2] for (_, _, c), f in zip(got[mode], got[False]))
    return results


def table(results: Dict[str, Dict[str, Any]], machine: Dict[str, Any], args: Any, note: Optional[str]) -> str:
    header = ["workload", "mode", "state", "added per save", "bytes vs full", "s / save", "time vs full",
              "CPU s / save", "CPU vs full"]
    rows: List[List[str]] = []
    for name in WORKLOADS:
        full = results[f"{name} | full"]
        fb = statistics.median(full["bytes"])
        for mode in ("full", "differential"):
            e = results[f"{name} | {mode}"]
            b, s = statistics.median(e["bytes"]), statistics.median(e["seconds"])
            c = statistics.median(e["cpu_seconds"])
            rows.append([name, mode, f"{e['state_bytes'] / 1e6:.1f} MB", f"{b / 1e6:.2f} MB",
                         f"{b / fb:.3f}", f"{s:.3f}", f"{statistics.median(e['time_ratio']):.2f}", f"{c:.3f}",
                         f"{statistics.median(e['cpu_ratio']):.2f}"])
    lines = [f"# Differential vs full saves ({args.rounds} rounds x {args.saves - 1} saves, medians)", "",
             f"`python -m benchmarks.differential --dir {args.dir} --mib {args.mib} --saves {args.saves} "
             f"--rounds {args.rounds}`", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
             f"{machine['filesystem']}; torch {machine['torch']}; load average at start "
             f"{machine['load_average_at_start']}.", ""]
    if note:
        lines += [note, ""]
    lines.append(_harness.markdown_table(header, rows))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = _results.parser("differential", __doc__)
    p.add_argument("--mib", type=int, default=64, help="backbone / fully trained model size (MiB)")
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default=None, help="a line printed above the table (e.g. the machine's load)")
    args = _results.parse_args(p, argv)
    machine = _harness.describe_machine(Path(args.dir))
    results = _results.in_scratch(args.dir, "ckpt-bench-diff-",
                                  lambda root: measure(root, args.mib, args.saves, args.rounds))
    report = {"machine": machine, "args": vars(args), "results": results}
    _results.publish(args.out, "differential", report, table(results, machine, args, args.note))


if __name__ == "__main__":
    main()
