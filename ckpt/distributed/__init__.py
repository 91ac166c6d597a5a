"""Many processes: bounded collectives over the process group (:mod:`.collective`) and
sharded checkpoints written with ``torch.distributed.checkpoint`` (:mod:`.sharded`, :mod:`.export`; the files of a
sharded directory are :mod:`ckpt.format.shardfiles`). Imported only when a process group
is initialised or a sharded checkpoint is read. What each rank does in a collective
save and resume is the collective engine's (:mod:`ckpt.engine.collective`)."""
