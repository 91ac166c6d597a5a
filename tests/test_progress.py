"""Progress bars: shown on saves and loads when asked, or on a terminal for large files."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios

import pytest

from ckpt import CheckpointManager, progress


def save_and_restore(directory, objs, **options) -> None:
    with CheckpointManager(directory, **options, **objs) as mgr:
        mgr.save(epoch=0)
        mgr.restore("latest")


def test_progress_true_shows_a_byte_bar_on_save_and_load(run_dir, trainables, capsys):
    save_and_restore(run_dir, trainables(), progress=True)
    err = capsys.readouterr().err
    assert "saving ckpt-e000000-s000000000.pt" in err
    assert "verifying ckpt-e000000-s000000000.pt" in err
    assert "B/s" in err or "B [" in err  # tqdm's byte units


def test_progress_false_shows_nothing(run_dir, trainables, capsys, monkeypatch):
    monkeypatch.setattr(progress, "THRESHOLD", 1)  # even for a "large" file
    save_and_restore(run_dir, trainables(), progress=False)
    assert capsys.readouterr().err == ""


def test_default_shows_nothing_below_the_threshold(run_dir, trainables, capsys):
    save_and_restore(run_dir, trainables())
    assert capsys.readouterr().err == ""


def test_default_shows_nothing_when_stderr_is_not_a_terminal(run_dir, trainables, capsys, monkeypatch):
    monkeypatch.setattr(progress, "THRESHOLD", 1)
    save_and_restore(run_dir, trainables())
    assert capsys.readouterr().err == ""


@pytest.fixture
def terminal():
    """(stream, read): a text stream on a real pseudo-terminal, and a reader of its output.

    The test itself must install the stream as sys.stderr: pytest's output capture
    replaces sys.stderr again between fixture setup and the test call.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns, like a terminal
    stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), write_through=True)

    def read() -> str:
        chunks = []
        while select.select([master], [], [], 0)[0]:
            chunks.append(os.read(master, 65536))
        return b"".join(chunks).decode(errors="replace")

    yield stream, read
    stream.close()
    os.close(master)


@pytest.mark.parametrize("threshold, shown", [(1, True), (progress.THRESHOLD, False)])
def test_default_on_a_terminal_shows_a_bar_only_for_large_files(run_dir, trainables, terminal, monkeypatch,
                                                                threshold, shown):
    stream, read = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    assert sys.stderr.isatty()
    monkeypatch.setattr(progress, "THRESHOLD", threshold)
    save_and_restore(run_dir, trainables())
    out = read()
    assert ("saving ckpt-e000000-s000000000.pt" in out) is shown
    assert ("verifying ckpt-e000000-s000000000.pt" in out) is shown
