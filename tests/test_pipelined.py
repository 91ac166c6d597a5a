"""The pipelined reader under resume (ckpt.io.pipelined): order, bytes, errors, stopping."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, List

import pytest
import torch

from ckpt.io import pipelined


def _read_at(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise EOFError(f"the file ends at {offset + done}")
        done += n


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(300_000)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, data
    finally:
        os.close(fd)


def _readers() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ckpt-read"]


def test_split_covers_the_range_in_pieces() -> None:
    target = memoryview(bytearray(10))
    pieces = list(pipelined.split(100, 10, 4, target))
    assert [(o, n) for o, n, _ in pieces] == [(100, 4), (104, 4), (108, 2)]
    assert all(v is not None and v.obj is target.obj for _, _, v in pieces)
    assert list(pipelined.split(5, 0, 4)) == []
    assert [v for _, _, v in pipelined.split(0, 9, 4)] == [None, None, None]


@pytest.mark.parametrize("threaded", [False, True])
def test_every_segment_arrives_in_order_with_its_bytes(data_fd: tuple[int, bytes], threaded: bool) -> None:
    fd, data = data_fd
    into = bytearray(50_000)
    segments = [*pipelined.split(0, 100_000, 7_000), *pipelined.split(100_000, 50_000, 7_000, memoryview(into)),
                *pipelined.split(150_000, 150_000, 7_000)]
    got, buffers = [], set()
    for offset, view, bounced in pipelined.Reader(_read_at, fd, segments, 7_000, threaded=threaded):
        assert bounced == (view.obj is not into)
        got.append((offset, bytes(view)))
        if bounced:
            buffers.add(id(view.obj))
    assert [o for o, _ in got] == [o for o, _, _ in segments]
    assert b"".join(b for _, b in got) == data
    assert bytes(into) == data[100_000:150_000]  # read in place, not through a bounce buffer
    assert len(buffers) <= pipelined.BOUNCES  # the bounce buffers are reused
    assert not _readers()


def test_a_failed_read_is_raised_here_and_the_reader_ends(data_fd: tuple[int, bytes]) -> None:
    fd, _ = data_fd
    segments = list(pipelined.split(0, 400_000, 10_000))  # past the end of the file
    seen = 0
    with pytest.raises(EOFError, match="ends at 300000"):
        for _ in pipelined.Reader(_read_at, fd, segments, 10_000, threaded=True):
            seen += 1
    assert seen == 30
    assert not _readers()


def test_leaving_early_stops_the_reader(data_fd: tuple[int, bytes]) -> None:
    fd, _ = data_fd
    reader = pipelined.Reader(_read_at, fd, list(pipelined.split(0, 300_000, 1_000)), 1_000, threaded=True)
    for i, _ in enumerate(reader):
        if i == 2:
            break
    reader.close()
    assert not _readers()


def test_prefault_keeps_what_the_memory_holds() -> None:
    st = torch.UntypedStorage(3 << 20)
    t = torch.empty(0, dtype=torch.uint8).set_(st)  # type: ignore[call-overload]
    t[: 1 << 20] = 7
    thread = pipelined.prefault([(st.data_ptr(), st.nbytes())])
    if thread is not None:
        thread.join()
    assert int(t[: 1 << 20].sum()) == 7 << 20 and int(t[-1]) in range(256)
    assert pipelined.prefault([]) is None


def test_in_parallel_returns_each_result_in_order_and_reaps_its_threads() -> None:
    seen: List[str] = []

    def job(i: int) -> int:
        seen.append(threading.current_thread().name)
        return i * i
    assert pipelined.in_parallel([lambda i=i: job(i) for i in range(3)]) == [0, 1, 4]  # type: ignore[misc]
    assert seen.count("ckpt-read") == 2 and not _readers()  # the first ran here, the others were joined
    assert pipelined.in_parallel([lambda: 5]) == [5]


def test_in_parallel_raises_a_failure_once_every_call_ended() -> None:
    finished = threading.Event()

    def slow() -> int:
        finished.wait(0.2)
        finished.set()
        return 1

    def failing() -> int:
        raise EOFError("short file")
    with pytest.raises(EOFError, match="short file"):
        pipelined.in_parallel([failing, slow])
    assert finished.is_set() and not _readers()
