"""Many processes: bounded collectives over the process group (:mod:`.collective`), the
manager's collective save/resume (:mod:`.coordinator`), and sharded checkpoints written
with ``torch.distributed.checkpoint`` (:mod:`.sharded`, :mod:`.shardfiles`,
:mod:`.export`). Imported only when a process group is initialised or a sharded
checkpoint is read."""
