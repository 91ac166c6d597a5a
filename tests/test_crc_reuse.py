"""A checkpoint's checksum reuses torch's per-record CRC-32s: it must still equal the
CRC-32 of every byte of the file, whatever torch wrote and whatever it vouched for."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import torch

from ckpt.format import torchfile
from ckpt.io import checksum
from ckpt.storage import LocalStore


def file_crc(path: Path) -> str:
    return f"crc32:{zlib.crc32(path.read_bytes()):08x}"


@pytest.mark.parametrize("split", [0, 1, 7, 4096, 99_999, 100_000])
def test_crc32_combine_equals_the_crc_of_the_concatenation(split):
    data = random.Random(split).randbytes(100_000)
    a, b = data[:split], data[split:]
    assert checksum.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


@pytest.mark.parametrize("zip_crc", [True, False])
def test_the_recorded_checksum_is_the_files_crc_with_large_and_odd_tensors(tmp_path, zip_crc):
    store = LocalStore(tmp_path)
    obj = {"big": torch.randn(1 << 19), "matrix": torch.randn(700, 800), "tiny": torch.arange(5),
           "strided": torch.randn(3 << 19)[::2], "shared": [torch.ones(1 << 18)] * 2, "n": 3}
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(zip_crc)
    try:
        written = torchfile.write(store, "x.pt", obj, nbytes=0, progress=False)
    finally:
        torch.serialization.set_crc32_options(before)
    assert written.checksum == file_crc(tmp_path / "x.pt")
    assert written.size == (tmp_path / "x.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["strided"], obj["strided"])


@pytest.mark.parametrize("vouched", ["nothing", "wrong size"])
def test_ranges_the_format_does_not_vouch_for_are_read_back(tmp_path, vouched):
    chunks = [os.urandom(10), os.urandom(checksum.TRUSTED_MIN + 3), os.urandom(5), os.urandom(2 << 20)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "wb") as f:
        writer = checksum.ChecksumWriter(f)
        writer.trust_records()
        for chunk in chunks:
            writer.write(chunk)
        writer.settle(lambda _: {} if vouched == "nothing" else {10: (1, 0)})
        crc = writer.crc
    assert f"crc32:{crc:08x}" == file_crc(path)
