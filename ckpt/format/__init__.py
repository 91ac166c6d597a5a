"""File formats: the checkpoint file (:mod:`.torchfile`, written by :mod:`.torchzip`, read
by :mod:`.directread`), plain torch files (:mod:`.torchio`), a sharded checkpoint's files
and manifest (:mod:`.shardfiles`) and a differential checkpoint's chunked tensors
(:mod:`.chunks`). The only modules that call ``torch.save`` / ``torch.load``; they commit
through a :class:`ckpt.storage.base.Store` and read through :mod:`ckpt.io`.
"""
