"""Differential checkpoints: bytes written and time per save, differential vs full.

    python -m benchmarks.differential --dir /work/benchtmp [--mib 64] [--saves 4] [--rounds 3]

Workloads, each saved ``--saves`` times per run into a fresh directory with ``keep_last=2``
(durable: fsync, rename, directory fsync, evicted files deleted), the first save of each
run not counted:

* ``frozen backbone``: a frozen ``--mib`` MiB backbone and a trained 1 MiB head (an SGD
  step between saves);
* ``embedding 2 % / 10 % / 50 %``: the issue's ``nn.Embedding(200_000, 64)`` (51.2 MB)
  with that fraction of its rows, drawn at random, updated between saves;
* ``fully trained``: a ``--mib`` MiB model whose every weight changes between saves.

Full and differential runs of every workload alternate within each round, their order
rotating from round to round (repetitions interleaved). The table reports medians of
bytes added to the directory, seconds per ``save()`` (the time the loop waits) and CPU
seconds per ``save()`` (``time.process_time``, all threads: less sensitive than wall time
to other processes on a shared machine), and their ratios to the full save of the same
workload.
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


def run(directory: Path, make: Callable[[int], Workload], mib: int, saves: int,
        differential: bool) -> Tuple[List[int], List[float], List[float], int]:
    shutil.rmtree(directory, ignore_errors=True)
    torch.manual_seed(0)
    tracked, step = make(mib)
    state = sum(t.nbytes for o in tracked.values() if isinstance(o, torch.nn.Module) for t in o.state_dict().values())
    mgr = CheckpointManager(directory, keep_last=2, differential=differential, progress=False, **tracked)
    written, seconds, cpu = [], [], []
    for epoch in range(saves):
        step(epoch)
        before = snapshot(directory)
        start, start_cpu = time.perf_counter(), time.process_time()
        mgr.save(epoch=epoch)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        written.append(added_bytes(directory, before))
    mgr.close()
    shutil.rmtree(directory, ignore_errors=True)
    return written[1:], seconds[1:], cpu[1:], state


def measure(root: Path, mib: int, saves: int, rounds: int) -> Dict[str, Any]:
    results: Dict[str, Dict[str, Any]] = {}
    order = [(w, d) for w in WORKLOADS for d in (False, True)]
    for r in range(rounds):
        shift = r % len(order)
        for name, differential in order[shift:] + order[:shift]:
            written, seconds, cpu, state = run(root / "run", WORKLOADS[name], mib, saves, differential)
            entry = results.setdefault(f"{name} | {'differential' if differential else 'full'}",
                                       {"bytes": [], "seconds": [], "cpu_seconds": [], "state_bytes": state})
            entry["bytes"].extend(written)
            entry["seconds"].extend(seconds)
            entry["cpu_seconds"].extend(cpu)
    return results


def table(results: Dict[str, Dict[str, Any]], machine: Dict[str, Any], args: Any, note: Optional[str]) -> str:
    header = ["workload", "mode", "state", "added per save", "bytes vs full", "s / save", "time vs full",
              "CPU s / save", "CPU vs full"]
    rows: List[List[str]] = []
    for name in WORKLOADS:
        full = results[f"{name} | full"]
        fb, fs = statistics.median(full["bytes"]), statistics.median(full["seconds"])
        fc = statistics.median(full["cpu_seconds"])
        for mode in ("full", "differential"):
            e = results[f"{name} | {mode}"]
            b, s = statistics.median(e["bytes"]), statistics.median(e["seconds"])
            c = statistics.median(e["cpu_seconds"])
            rows.append([name, mode, f"{e['state_bytes'] / 1e6:.1f} MB", f"{b / 1e6:.2f} MB",
                         f"{b / fb:.3f}", f"{s:.3f}", f"{s / fs:.2f}", f"{c:.3f}", f"{c / fc:.2f}"])
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
