"""Hugging Face Trainer with ckpt's CheckpointCallback: durable checkpoint-N folders, and a
resume that never picks a half-written one. A tiny BERT built from a config (no download).

    python examples/hf_train.py --dir runs/hf      # start, or resume
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, set_seed

from ckpt.integrations.transformers import CheckpointCallback, last_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/hf")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    set_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=16, num_labels=2))
    ids = torch.randint(0, 64, (256, 12), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": int(row.sum()) % 2} for row in ids]
    training = TrainingArguments(output_dir=args.dir, max_steps=args.steps, save_steps=10, save_total_limit=2,
                                 per_device_train_batch_size=16, learning_rate=1e-3, use_cpu=True,
                                 report_to="none", disable_tqdm=True, logging_steps=10)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[CheckpointCallback()])
    start = last_checkpoint(args.dir)  # only committed, verifying checkpoint-N folders
    print(f"resuming from {start}" if start else "fresh run")
    trainer.train(resume_from_checkpoint=start)
    print(f"done; newest committed checkpoint {last_checkpoint(args.dir)}")


if __name__ == "__main__":
    main()
