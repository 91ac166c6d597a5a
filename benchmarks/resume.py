"""Cold resume, raced fairly: ckpt's resume() against a raw read of the same file and its peers.

    python -m benchmarks.resume                      # 0.5 GB state (params + Adam), 5 rounds
    python -m benchmarks.resume --size-gb 1 --rounds 7 --dir /data/scratch

Every round runs each method once, the order rotating, the page cache dropped before
each: raw reads of ckpt's file (64 MiB ``readinto``; 16 MiB ``preadv`` after
``POSIX_FADV_SEQUENTIAL``, as one stream and as two; the fastest in a round is the
round's read limit), ``torch.load`` +
``load_state_dict`` of the same state saved with ``torch.save``, safetensors'
``load_file`` and ``dcp.load`` (module tensors loaded in place) of it saved flat, each
followed by ``load_state_dict``, and ckpt's ``resume()`` (verified). Each resume goes
into the same model and a fresh optimizer (no state yet, as in a restarted run), and
every page of the optimizer state it leaves is touched within the timed region (a file
mapping is then really read); the memory that stays is the optimizer's state;
transient memory is the peak of anonymous memory minus what stays after, divided by
the checkpoint's size. Reported per round: each time, the raw read's time
divided by it (its speed against the read limit), and ckpt's speed against each
peer's. Results go to ``benchmarks/results/resume.{json,md}``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ckpt import CheckpointManager
from ckpt.io import checksum

from . import _harness as h
from ._results import in_scratch, parse_args, parser, publish
from ._variants import build_state, has, touch


def _transient(fn: Callable[[], Any]) -> Dict[str, float]:
    """(seconds, peak resident bytes above the start, bytes still resident after): the
    peak is VmHWM, reset to the current RSS first (exact, unlike sampling)."""
    gc.collect()
    h.reset_peak()
    base = h.status_bytes("VmRSS")
    start = time.perf_counter()
    keep = fn()
    took = time.perf_counter() - start
    gc.collect()
    peak, after = h.status_bytes("VmHWM"), h.status_bytes("VmRSS")
    del keep
    return {"time": took, "peak": max(0, peak - base), "stays": max(0, after - base)}


def measure(root: Path, size_gb: float, rounds: int) -> Dict[str, Any]:
    model, opt = build_state(int(size_gb * 1e9), 2048)
    nbytes = sum(t.nbytes for t in model.state_dict().values()) + sum(
        t.nbytes for s in opt.state_dict()["state"].values() for t in s.values())
    with CheckpointManager(root / "ckpt", model=model, optimizer=opt, progress=False) as mgr:
        mgr.save(epoch=0)
        ckpt_file = mgr.latest.path  # type: ignore[union-attr]
    torch_file = root / "torch.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, torch_file)
    flat, groups = _flat(model, opt)
    st_file, dcp_dir = root / "state.safetensors", root / "dcp"
    methods: Dict[str, Callable[[], Any]] = {}
    if has("safetensors"):
        from safetensors.torch import load_file, save_file
        save_file(flat, str(st_file))

        def st_resume() -> Any:
            return _apply(model, groups, load_file(str(st_file)))
        methods["safetensors_resume"] = st_resume
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp
        dcp.save(flat, checkpoint_id=str(dcp_dir))

    def dcp_resume() -> Any:  # module tensors loaded in place, optimizer state into new tensors
        live = model.state_dict()
        target = {k: live[k[len("model."):]] if k.startswith("model.") else torch.empty_like(v)
                  for k, v in flat.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, checkpoint_id=str(dcp_dir))
        return _apply(model, groups, target)
    methods["dcp_resume"] = dcp_resume
    def torch_resume() -> Any:
        fresh = torch.optim.Adam(model.parameters())
        obj = torch.load(torch_file, weights_only=True)
        model.load_state_dict(obj["model"])
        fresh.load_state_dict(obj["optimizer"])
        return fresh

    def ckpt_resume() -> Any:
        fresh = torch.optim.Adam(model.parameters())
        with CheckpointManager(root / "ckpt", model=model, optimizer=fresh, progress=False) as m:
            m.resume()
        return fresh

    raws = _raw_reads(ckpt_file)
    methods = {**raws, "torch_resume": torch_resume, "ckpt_resume": ckpt_resume, **methods}
    for name in list(methods)[len(raws):]:
        methods[name] = _touching(methods[name])
    names = list(methods)
    runs: List[Dict[str, Dict[str, float]]] = []
    cold = ""
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        found = {}
        for name in order:
            cold = h.cold([ckpt_file, torch_file, st_file, dcp_dir])
            found[name] = _transient(methods[name])
        if r:  # round 0 is untimed; the read limit is the fastest raw read of the round
            found["raw_read"] = min((found[n] for n in raws), key=lambda x: x["time"])
            runs.append(found)
    return {"bytes": nbytes, "file_bytes": os.stat(ckpt_file).st_size, "rounds": runs, "cold": cold,
            "crc": checksum.CRC_IMPL, "machine": h.describe_machine(root)}


def _raw_reads(path: Path) -> Dict[str, Callable[[], None]]:
    """Ways to read the file's bytes and nothing else: 64 MiB ``readinto``, 16 MiB
    ``preadv`` after ``POSIX_FADV_SEQUENTIAL``, and that as two streams (the file's
    halves, one thread each). The read limit of a round is the fastest of them."""
    def stream(fd: int, lo: int, hi: int, size: int) -> None:
        view = memoryview(bytearray(size))
        while lo < hi:
            lo += os.preadv(fd, [view[:min(size, hi - lo)]], lo) or hi

    def streams(count: int, size: int) -> Callable[[], None]:
        def run() -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                end, span = os.fstat(fd).st_size, -(-os.fstat(fd).st_size // count)
                threads = [threading.Thread(target=stream, args=(fd, i * span, min(end, (i + 1) * span), size))
                           for i in range(count)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                os.close(fd)
        return run
    buffer = bytearray(64 << 20)

    def readinto() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return {"raw_readinto": readinto, "raw_seq16": streams(1, 16 << 20), "raw_2streams": streams(2, 16 << 20)}


def _touching(resume: Callable[[], Any]) -> Callable[[], Any]:
    """``resume``, then one element of every page of the optimizer state it left, timed
    with it: a loader that maps the file (safetensors does) has then really read it."""
    def run() -> Any:
        fresh = resume()
        touch(fresh.state_dict()["state"])
        return fresh
    return run


def _flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Any]:
    """The state as one flat dict of tensors (what safetensors and DCP save), and the
    optimizer's parameter groups (which are not tensors)."""
    sd = opt.state_dict()
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, entry in sd["state"].items():
        flat.update({f"optimizer.{pid}.{k}": v for k, v in entry.items()})
    return flat, sd["param_groups"]


def _apply(model: torch.nn.Module, groups: Any, flat: Dict[str, torch.Tensor]) -> Any:
    """Load a flat state into ``model`` and a fresh Adam, as a restarted run does."""
    model.load_state_dict({k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        if k.startswith("optimizer."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict({"state": state, "param_groups": groups})
    return fresh


LABELS = {"raw_readinto": "raw read (64 MiB readinto)", "raw_seq16": "raw read (16 MiB, SEQUENTIAL)",
          "raw_2streams": "raw read (2 streams)", "raw_read": "raw read: fastest",
          "torch_resume": "torch.load + load_state_dict",
          "safetensors_resume": "safetensors load_file + load_state_dict",
          "dcp_resume": "dcp.load (module tensors in place) + load_state_dict", "ckpt_resume": "**ckpt resume()**"}


def render(report: Dict[str, Any]) -> str:
    size, rounds = report["bytes"], report["rounds"]
    names = [n for n in LABELS if n in rounds[0]]
    peers = [n for n in names if not n.startswith("raw_") and n not in ("raw_read", "ckpt_resume")]
    lines = [f"Cold resume: {size / 1e9:.2f} GB (Linear stack + Adam), {len(rounds)} rounds after 1 untimed, "
             f"order rotating, page cache dropped before each ({report.get('cold', 'drop_caches or fadvise')}); "
             f"CRC-32 {report['crc']}.", f"Machine: {report['machine']}", "",
             "Seconds per round:", "",
             h.markdown_table(["round"] + [LABELS[n] for n in names],
                              [[str(i)] + [f"{run[n]['time']:.3f}" for n in names]
                               for i, run in enumerate(rounds, 1)]), "",
             "Ratios per round (above 1: ckpt is faster; speed ÷ raw read: the read limit's share reached):", "",
             h.markdown_table(["round", "ckpt speed ÷ raw read"] + [f"ckpt speed ÷ {n.split('_')[0]}" for n in peers]
                              + ["ckpt transient ÷ size", "torch transient ÷ size"],
                              [[str(i), f"{run['raw_read']['time'] / run['ckpt_resume']['time']:.2f}"]
                               + [f"{run[n]['time'] / run['ckpt_resume']['time']:.2f}" for n in peers]
                               + [f"{(run[n]['peak'] - run[n]['stays']) / size:.2f}"
                                  for n in ("ckpt_resume", "torch_resume")]
                               for i, run in enumerate(rounds, 1)]), ""]
    ratio = h.median([r["raw_read"]["time"] / r["ckpt_resume"]["time"] for r in rounds])
    best = min(r["raw_read"]["time"] for r in rounds) / min(r["ckpt_resume"]["time"] for r in rounds)
    versus = [f"÷ {n.split('_')[0]} median {h.median([r[n]['time'] / r['ckpt_resume']['time'] for r in rounds]):.2f}"
              for n in peers]
    lines.append(f"ckpt resume speed ÷ raw read: median of rounds {ratio:.2f}, best vs best {best:.2f} "
                 f"(target ≥ 0.9); {'; '.join(versus)} (target > 1); transient memory target ≤ 0.1 of the size.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = parser("resume", __doc__)
    p.add_argument("--size-gb", type=float, default=0.5, help="state size (params + Adam), GB (default 0.5)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--name", default="resume", help="results file name (default resume)")
    args = parse_args(p, argv)
    report = in_scratch(args.dir, ".bench-resume-", lambda root: measure(root, args.size_gb, args.rounds))
    publish(args.out, args.name, report, render(report))


if __name__ == "__main__":
    main()
