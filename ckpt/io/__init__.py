"""Bytes and files below every other layer: checksums and writeback (:mod:`.checksum`),
POSIX helpers (:mod:`.posix`). Imports nothing of ckpt but its errors."""
