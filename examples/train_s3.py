"""Train with checkpoints in an object store (S3 or any fsspec URL), optionally tiered.

    python examples/train_s3.py s3://my-bucket/runs/exp1                 # credentials from the environment
    python examples/train_s3.py s3://my-bucket/runs/exp1 --cache /local/ssd/exp1
    python examples/train_s3.py memory://demo/run                        # no server at all

Try it against a local S3 server (moto, installed by ``pip install 'ckpt[test]'``):

    python -m moto.server -H 127.0.0.1 -p 5000 &
    python -c "import s3fs; s3fs.S3FileSystem(key='x', secret='x', \\
        client_kwargs={'endpoint_url': 'http://127.0.0.1:5000'}).mkdir('demo')"
    python examples/train_s3.py s3://demo/run --endpoint http://127.0.0.1:5000 --key x --secret x

Kill it (Ctrl-C, kill -9) and run it again: it resumes from the newest committed
checkpoint. With ``--cache`` each save commits to the local directory first and is
uploaded in the background; delete the cache directory and it resumes from the bucket.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict

import torch
from torch import nn

from ckpt import CheckpointManager


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="run directory: s3://bucket/prefix, gs://..., memory://...")
    p.add_argument("--cache", default=None, help="local tier (committed first, uploaded in the background)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (MinIO, moto, ...)")
    p.add_argument("--key", default=None)
    p.add_argument("--secret", default=None)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()

    options: Dict[str, Any] = {}
    if args.endpoint:
        options["client_kwargs"] = {"endpoint_url": args.endpoint}
    if args.key:
        options.update(key=args.key, secret=args.secret)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(512, 32), torch.randint(0, 4, (512,))

    with CheckpointManager(args.url, model=model, optimizer=opt, keep_last=3,
                           storage_options=options or None, cache_dir=args.cache) as mgr:
        start = mgr.resume()
        print(f"{mgr.url}: starting at epoch {start}")
        for epoch in range(start, args.epochs):
            for i in range(0, len(x), 64):
                loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
            record = mgr.save(epoch=epoch, step=(epoch + 1) * 8, metrics={"loss": loss.item()})
            print(f"epoch {epoch}: loss {loss.item():.4f} -> {record.path}")
    print("committed:", [r.name for r in mgr.checkpoints])


if __name__ == "__main__":
    main()
