"""What one save costs in S3 requests, counted on a real (moto) S3 server.

    python -m benchmarks.s3_requests [--saves 5] [--keep-last 2]

Starts ``python -m moto.server`` on 127.0.0.1, saves ``--saves`` small checkpoints to an
``s3://`` run directory (the manager's first save also claims the run), and counts the
HTTP requests the S3 client sent for each save, by operation (botocore's
``before-send`` event). Small states: one PUT per object, no multipart parts. Figures
only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import secrets
import sys
from pathlib import Path
from typing import Any, Counter, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Optional[List[str]] = None) -> None:
    from ckpt import CheckpointManager
    from tests.s3server import MotoServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--keep-last", type=int, default=2)
    args = ap.parse_args(argv)
    srv = MotoServer()
    try:
        import s3fs
        bucket = f"b{secrets.token_hex(4)}"
        s3fs.S3FileSystem(**srv.options()).mkdir(bucket)
        counts: Counter[str] = collections.Counter()

        def count(request: Any, **_: Any) -> None:
            counts[f"{request.method} {request.url.split('?', 1)[1].split('=')[0] if '?' in request.url else ''}"] += 1

        mgr = CheckpointManager(f"s3://{bucket}/run", model=torch.nn.Linear(8, 8), storage_options=srv.options(),
                                keep_last=args.keep_last)
        client = mgr.catalog.store.fs.s3
        client.meta.events.register("before-send.s3", count)
        print(f"requests per save (s3://, keep_last={args.keep_last}, one small object per checkpoint)")
        for epoch in range(args.saves):
            counts.clear()
            mgr.save(epoch=epoch)
            detail = ", ".join(f"{k.strip()} x{v}" for k, v in sorted(counts.items()))
            print(f"  save {epoch}: {sum(counts.values())} requests ({detail})")
        counts.clear()
        mgr.close()
        print(f"  close(): {sum(counts.values())} requests")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
