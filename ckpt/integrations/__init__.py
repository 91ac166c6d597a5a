"""ckpt inside the trainers people use: Lightning, Hugging Face Trainer, ignite.

Each submodule imports its trainer and is an optional extra (``pip install
'ckpt[lightning]'``, ``'ckpt[transformers]'``, ``'ckpt[ignite]'``); ``import ckpt``
imports none of them. Accelerate-prepared objects and torchdata's
``StatefulDataLoader`` need no integration: track them with ``CheckpointManager``.
"""
