"""Checksum candidates against the durable write of the same bytes.

    python benchmarks/checksum.py [--size-mb 512] [--dir PATH] [--repeat 3]

For each candidate (zlib.crc32, hashlib sha1/md5/blake2b, and xxhash/crc32c when
installed) prints its throughput on an in-memory buffer and its time as a percentage of
the durable write (write + fsync) of the same bytes to ``--dir`` (default: the current
directory, so run it on the disk your checkpoints go to). Also prints what the checksum
costs inside ckpt's real commit path (``storage.atomic_write``, where it overlaps the
write on a helper thread) and what torch's own per-record zip CRC-32 costs in
``torch.save``. Best of ``--repeat`` runs for each figure.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ckpt import storage  # noqa: E402
from ckpt.io.checksum import ChecksumWriter


def candidates() -> Dict[str, Callable[[memoryview], object]]:
    found: Dict[str, Callable[[memoryview], object]] = {
        "zlib.crc32": zlib.crc32,
        "hashlib.sha1": lambda b: hashlib.sha1(b).digest(),
        "hashlib.md5": lambda b: hashlib.md5(b).digest(),
        "hashlib.blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    try:
        import xxhash
        found["xxhash.xxh3_64"] = xxhash.xxh3_64_intdigest
        found["xxhash.xxh64"] = xxhash.xxh64_intdigest
    except ImportError:
        print("(xxhash not installed: pip install xxhash to include it)")
    try:
        import crc32c
        found["crc32c.crc32c"] = crc32c.crc32c
    except ImportError:
        print("(crc32c not installed: pip install crc32c to include it)")
    return found


def best(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def durable_write(directory: Path, data: memoryview) -> None:
    """The floor: write the bytes in 64 MiB pieces and fsync, as dd conv=fsync does."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".bench-")
    try:
        for at in range(0, len(data), 64 << 20):
            os.write(fd, data[at:at + (64 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def ckpt_write(directory: Path, data: memoryview) -> None:
    """ckpt's commit path: CRC-32 in flight, fsync, rename, directory fsync."""
    def write(f: ChecksumWriter) -> None:
        for at in range(0, len(data), 64 << 20):
            f.write(data[at:at + (64 << 20)])
    written = storage.atomic_write(directory, ".bench-ckpt", write)
    os.unlink(written.path)


class Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        return memoryview(b).nbytes


def torch_zip_crc_cost(tensor: torch.Tensor, repeat: int) -> float:
    """Seconds torch.save spends on its per-record zip CRC-32 (on the saving thread)."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        return float("nan")
    before = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(True)
        with_crc = best(repeat, lambda: torch.save({"x": tensor}, Null()))
        torch.serialization.set_crc32_options(False)
        without = best(repeat, lambda: torch.save({"x": tensor}, Null()))
    finally:
        torch.serialization.set_crc32_options(before)
    return with_crc - without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tensor = torch.randn(args.size_mb * (1 << 20) // 4)  # incompressible, like real weights
    data = memoryview(tensor.numpy()).cast("B")
    size = len(data)
    write_s = best(args.repeat, lambda: durable_write(args.dir, data))
    print(f"{size / 2**20:.0f} MiB; durable write (write + fsync) to {args.dir}: {write_s:.3f} s "
          f"= {size / write_s / 1e9:.2f} GB/s (the floor)\n")
    print(f"{'candidate':<18} {'GB/s':>7} {'seconds':>8} {'% of write':>11}")
    for name, func in candidates().items():
        seconds = best(args.repeat, lambda func=func: func(data))
        print(f"{name:<18} {size / seconds / 1e9:>7.2f} {seconds:>8.3f} {100 * seconds / write_s:>10.1f}%")
    ckpt_s = best(args.repeat, lambda: ckpt_write(args.dir, data))
    print(f"\nckpt commit path (CRC-32 in flight + fsync + rename): {ckpt_s:.3f} s = "
          f"{100 * (ckpt_s - write_s) / write_s:+.1f}% vs the bare durable write")
    zip_crc = torch_zip_crc_cost(tensor, args.repeat)
    print(f"torch.save's own per-record zip CRC-32 (inline, holds the GIL): {zip_crc:.3f} s = "
          f"{size / zip_crc / 1e9:.2f} GB/s = {100 * zip_crc / write_s:.1f}% of the write")


if __name__ == "__main__":
    main()
