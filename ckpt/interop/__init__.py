"""Files ckpt did not write (:mod:`.foreign`) and weights for other tools (:mod:`.safetensors`)."""
