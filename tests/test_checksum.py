"""ckpt.fastio: the overlapped CRC is the plain CRC, errors surface, writeback is requested."""

from __future__ import annotations

import errno
import os
import random
import threading
import zlib
from pathlib import Path

import pytest

from ckpt.io import checksum as fastio
from ckpt.io.checksum import ChecksumWriter, format_checksum
from ckpt.storage import local as storage


@pytest.mark.parametrize("size", [0, 1, fastio.OVERLAP_MIN - 1, fastio.OVERLAP_MIN, 3 * fastio.OVERLAP_MIN + 7])
def test_crc_during_is_the_crc_continued_and_runs_the_io(size: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    seen = []
    crc, result = fastio.crc_during(memoryview(data), 12345, lambda n: seen.append(n) or "done", size)
    assert crc == zlib.crc32(data, 12345)
    assert (result, seen) == ("done", [size])


def test_crc_during_propagates_the_io_error_after_joining_the_helper() -> None:
    before = {t for t in threading.enumerate() if t.name == "ckpt-crc"}

    def fail() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        fastio.crc_during(memoryview(bytes(2 * fastio.OVERLAP_MIN)), 0, fail)
    assert {t for t in threading.enumerate() if t.name == "ckpt-crc"} == before


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 3 * 4096 + 5])
def test_file_crc_over_several_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
                                     seed: int) -> None:
    monkeypatch.setattr(fastio, "READ_CHUNK", 4096)  # many chunks...
    monkeypatch.setattr(fastio, "OVERLAP_MIN", 1024)  # ...each summed on the helper thread
    data = random.Random(seed).randbytes(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    seen = []
    assert fastio.file_crc(path, seen.append) == zlib.crc32(data)
    assert sum(seen) == size


def test_writer_requests_writeback_of_each_completed_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           seed: int) -> None:
    calls = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(fastio, "_FADVISE", record)
    monkeypatch.setattr(fastio, "WRITEBACK_EVERY", 1 << 20)
    rng = random.Random(seed)
    chunks = [rng.randbytes(700 << 10) for _ in range(6)]
    written = storage.atomic_write(tmp_path, "out.bin", lambda f: [f.write(c) for c in chunks])
    data = b"".join(chunks)
    assert (tmp_path / written.name).read_bytes() == data
    assert written.checksum == format_checksum(zlib.crc32(data))
    assert [a for _, _, a in calls] == [os.POSIX_FADV_DONTNEED] * len(calls) and len(calls) >= 2
    assert [o for o, _, _ in calls] == [0] + [o + n for o, n, _ in calls[:-1]]  # contiguous, in order


def test_writeback_turns_itself_off_without_a_file_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastio, "WRITEBACK_EVERY", 1)

    class NoFd:
        def write(self, b: bytes) -> int:
            return len(b)

    writer = ChecksumWriter(NoFd())  # type: ignore[arg-type]
    assert writer.write(b"abc") == 3 and writer.write(b"de") == 2
    assert writer.crc == zlib.crc32(b"abcde")


def test_the_crc_in_use_is_zlibs_crc32(seed: int) -> None:
    """zlib-ng, when installed, must give exactly the values recorded with zlib (and back)."""
    data = random.Random(seed).randbytes((1 << 20) + 3)
    try:
        import zlib_ng.zlib_ng  # noqa: F401
        installed = "zlib-ng"
    except ImportError:
        installed = "zlib"
    assert installed == fastio.CRC_IMPL  # the vectorised one is used whenever it is installed
    assert fastio.crc32(data) == zlib.crc32(data)
    assert fastio.crc32(data[7:], zlib.crc32(data[:7])) == zlib.crc32(data)


def test_a_failing_flush_before_writeback_is_the_writes_error(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The writeback request flushes the buffered tail first; a full disk there is not swallowed."""
    monkeypatch.setattr(fastio, "WRITEBACK_EVERY", 1 << 10)

    class FullDisk:
        def __init__(self, f: object) -> None:
            self.f = f

        def write(self, b: bytes) -> int:
            return len(b)

        def fileno(self) -> int:
            return self.f.fileno()  # type: ignore[attr-defined]

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    with open(tmp_path / "f", "wb") as f:
        writer = ChecksumWriter(FullDisk(f))  # type: ignore[arg-type]
        with pytest.raises(OSError, match="No space"):
            writer.write(bytes(2 << 10))
        assert isinstance(writer.error, OSError)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 63, 4095, 65537, (4 << 20) + 5])
def test_the_default_crc_equals_zlib_crc32_at_every_size(size: int) -> None:
    """Every length (SIMD head/body/tail paths) and a running start value give zlib's values."""
    data = random.Random(size).randbytes(size)
    for start in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert fastio.crc32(data, start) == zlib.crc32(data, start)
    view = memoryview(bytearray(data))[1:]
    assert fastio.crc32(view) == zlib.crc32(view)


def test_zlib_ng_is_a_default_dependency_and_is_what_runs() -> None:
    """zlib-ng is in the default dependencies (installed here), and the summing code uses it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("zlib-ng") for d in deps)
    import zlib_ng.zlib_ng
    assert fastio.CRC_IMPL == "zlib-ng" and fastio.crc32 is zlib_ng.zlib_ng.crc32
    from ckpt.catalog import sharddir
    from ckpt.format import shardfiles, torchzip
    assert torchzip.crc32 is sharddir.crc32 is zlib_ng.zlib_ng.crc32
    assert shardfiles.stream_crc is fastio.stream_crc  # sums with fastio.crc32, checked above


def test_without_zlib_ng_the_stdlib_is_the_fallback(tmp_path: Path) -> None:
    """A Python where zlib-ng cannot be imported sums with zlib.crc32: same values."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['zlib_ng'] = None; sys.modules['zlib_ng.zlib_ng'] = None\n"
            "import zlib\nfrom ckpt.io import checksum as c\n"
            "assert c.CRC_IMPL == 'zlib' and c.crc32 is zlib.crc32, c.CRC_IMPL\n"
            "print(c.crc32(b'ckpt'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == zlib.crc32(b"ckpt")
