"""Many processes: bounded collectives over the process group (:mod:`.collective`) and
sharded checkpoints written with ``torch.distributed.checkpoint`` (:mod:`.sharded`,
:mod:`.shardfiles`). Imported only when a process group is initialised or a sharded
checkpoint is read."""
