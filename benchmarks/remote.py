"""Saving to S3: ckpt's commit-last store and its tiered mode against plain fsspec.

    python benchmarks/remote.py [--size-mb 64] [--rounds 3]

Starts a local S3 server (moto, its own process; ``pip install 'ckpt[test]'``) on
127.0.0.1 and saves the same state dict (``--size-mb`` of float32 tensors) in
interleaved rounds with:

* ``fsspec``: ``torch.save`` into ``fs.open(key, "wb")`` - the bytes and nothing else;
* ``ckpt``: ``CheckpointManager(s3://...).save()`` - commit-last (upload, size check,
  commit record, index), synchronous;
* ``ckpt tiered``: ``CheckpointManager(s3://..., cache_dir=...).save()`` - the local
  commit; the upload runs in the background (its time is reported as ``wait()``).

Prints, per variant, the median stall (the time ``save()`` blocks the training loop)
and the median throughput to the store (size / time until the bytes are committed
remotely). A loopback server measures ckpt's protocol overhead, not a network.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ckpt import CheckpointManager  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402


class Blob:
    """A trackable holding ``size_mb`` of float32 tensors (16 MiB each)."""

    def __init__(self, size_mb: int) -> None:
        n = max(1, size_mb // 16)
        self.tensors = {f"t{i}": torch.randn(4 << 20) for i in range(n)}

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.tensors = dict(state)


def plain(fs: Any, bucket: str, blob: Blob, epoch: int) -> Tuple[float, float]:
    start = time.perf_counter()
    with fs.open(f"{bucket}/plain/e{epoch}.pt", "wb") as f:
        torch.save(blob.state_dict(), f)
    took = time.perf_counter() - start
    return took, took


def managed(url: str, options: Dict[str, Any], blob: Blob, epoch: int, cache: str = "") -> Tuple[float, float]:
    mgr = CheckpointManager(url, storage_options=options, cache_dir=cache or None, keep_last=1,
                            progress=False, blob=blob)
    start = time.perf_counter()
    mgr.save(epoch=epoch, step=epoch)
    stall = time.perf_counter() - start
    mgr.close()  # waits for the background upload in tiered mode
    return stall, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    server = MotoServer()
    try:
        import s3fs
        options = server.options()
        fs = s3fs.S3FileSystem(**options)
        bucket = f"bench{secrets.token_hex(4)}"
        fs.mkdir(bucket)
        blob = Blob(args.size_mb)
        size = sum(t.numel() * 4 for t in blob.tensors.values())
        cache = tempfile.mkdtemp(prefix="ckpt-bench-cache-")
        variants: Dict[str, Callable[[int], Tuple[float, float]]] = {
            "fsspec": lambda e: plain(fs, bucket, blob, e),
            "ckpt": lambda e: managed(f"s3://{bucket}/ckpt", options, blob, e),
            "ckpt tiered": lambda e: managed(f"s3://{bucket}/tiered", options, blob, e, cache),
        }
        results: Dict[str, List[Tuple[float, float]]] = {k: [] for k in variants}
        for epoch in range(args.rounds):  # interleaved: drift hits every variant alike
            for name, run in variants.items():
                results[name].append(run(epoch))
            fs.rm(f"{bucket}/plain", recursive=True)
        print(f"{size / 2**20:.0f} MiB state dict, {args.rounds} interleaved rounds, local moto server "
              f"(median of rounds)")
        print(f"{'variant':<14}{'stall s':>10}{'committed s':>14}{'MiB/s':>10}")
        for name, rows in results.items():
            stall = statistics.median(r[0] for r in rows)
            done = statistics.median(r[1] for r in rows)
            print(f"{name:<14}{stall:>10.2f}{done:>14.2f}{size / 2**20 / done:>10.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
