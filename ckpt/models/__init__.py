"""Model portability: rebuild a model from a file without its code by hand.

:mod:`.build` turns an architecture spec back into a module under the trust rule,
:mod:`.files` reads and writes model files (``save_model``/``load_model``),
:mod:`.export` writes class-free programs (``torch.export``, TorchScript). The save and
resume path never imports this package: the spec a checkpoint records is captured by
:mod:`ckpt.spec`, which imports and runs nothing.
"""
