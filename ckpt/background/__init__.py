"""Asynchronous saves: staging buffers (:mod:`.staging`) and the writer thread (:mod:`.writer`)."""
