"""Differential checkpoints: bytes written and save time per checkpoint, full vs differential.

    python -m benchmarks.differential --dir /work/benchtmp/diff [--mib 128] [--rounds 4]

Two workloads, each saved `--saves` times per round into a fresh directory with
`keep_last=2` (durable: fsync, rename, directory fsync, evicted files deleted):

* fine-tune: a frozen backbone of `--mib` MiB and a trained 1 MiB head (an SGD step
  between saves);
* embedding: a `--mib` MiB table with 32 random rows updated between saves.

Full and differential runs alternate within each round (order rotating), and the table
reports, for the checkpoints after the first, the median bytes written and seconds per
save, and their ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from ckpt import CheckpointManager


def new_files_bytes(directory: Path, before: Dict[str, Tuple[int, int]]) -> int:
    total = 0
    for p in directory.iterdir():
        if p.name.startswith("ckpt-") and p.is_file():
            st = p.stat()
            if before.get(p.name) != (st.st_ino, st.st_size):
                total += st.st_size
    return total


def snapshot(directory: Path) -> Dict[str, Tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in directory.iterdir() if p.is_file()}


def finetune(mib: int) -> Tuple[Dict[str, object], Callable[[], None]]:
    width = 1024
    layers = max(1, (mib << 20) // (width * width * 4))
    backbone = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    backbone.requires_grad_(False)
    head = torch.nn.Linear(width, 256)
    opt = torch.optim.SGD(head.parameters(), lr=0.01)

    def step() -> None:
        loss = head(torch.randn(4, width)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"model": torch.nn.Sequential(backbone, head), "optimizer": opt}, step


def embedding(mib: int) -> Tuple[Dict[str, object], Callable[[], None]]:
    dim = 128
    table = torch.nn.Embedding((mib << 20) // (dim * 4), dim)

    def step() -> None:
        with torch.no_grad():
            table.weight[torch.randint(0, table.num_embeddings, (32,))] += 0.01
    return {"embedding": table}, step


def run(directory: Path, workload: Callable, mib: int, saves: int, differential: bool) -> Tuple[List[int], List[float]]:
    shutil.rmtree(directory, ignore_errors=True)
    tracked, step = workload(mib)
    mgr = CheckpointManager(directory, keep_last=2, differential=differential, progress=False, **tracked)
    written, seconds = [], []
    for epoch in range(saves):
        step()
        before = snapshot(directory)
        start = time.perf_counter()
        mgr.save(epoch=epoch)
        seconds.append(time.perf_counter() - start)
        written.append(new_files_bytes(directory, before))
    mgr.close()
    shutil.rmtree(directory, ignore_errors=True)
    return written[1:], seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckpt-bench-diff"))
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: Dict[Tuple[str, bool], Tuple[List[int], List[float]]] = {}
    for r in range(args.rounds):
        order = [(w, d) for w in ("fine-tune", "embedding") for d in (False, True)]
        order = order[r % len(order):] + order[:r % len(order)]
        for name, differential in order:
            workload = finetune if name == "fine-tune" else embedding
            written, seconds = run(args.dir, workload, args.mib, args.saves, differential)
            acc = results.setdefault((name, differential), ([], []))
            acc[0].extend(written)
            acc[1].extend(seconds)
    print(f"state {args.mib} MiB, {args.rounds} rounds x {args.saves - 1} saves after the first; medians")
    print(f"{'workload':<10} {'mode':<13} {'MiB written':>12} {'s / save':>9} {'bytes ratio':>12} {'time ratio':>11}")
    for name in ("fine-tune", "embedding"):
        full_b, full_s = (statistics.median(v) for v in results[(name, False)])
        for differential in (False, True):
            b, s = (statistics.median(v) for v in results[(name, differential)])
            print(f"{name:<10} {'differential' if differential else 'full':<13} {b / 2**20:>12.2f} {s:>9.3f} "
                  f"{b / full_b:>12.3f} {s / full_s:>11.3f}")


if __name__ == "__main__":
    main()
