"""Preemption: opt-in handlers that only set a flag, chaining, restoring, and the one
call in the loop that saves a mid-epoch checkpoint and exits. Real signals, raised in
this process (the four-way proof in test_exact_resume.py sends SIGTERM from outside)."""

from __future__ import annotations

import itertools
import logging
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, List

import pytest
import torch

import ckpt
from ckpt import CheckpointManager, Preempted
from ckpt.errors import ConfigError, StorageError

TERM, USR1 = signal.SIGTERM, signal.SIGUSR1
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mid_epoch.py"


@pytest.fixture(autouse=True)
def _restore_handlers() -> Any:
    saved = {s: signal.getsignal(s) for s in (TERM, USR1, signal.SIGUSR2, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _files(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir())


def test_opt_in_handlers_replace_and_restore_the_previous_ones(tmp_path: Path) -> None:
    def previous(signum: int, frame: Any) -> None:
        pass

    signal.signal(USR1, previous)
    signal.signal(TERM, signal.SIG_DFL)
    with CheckpointManager(tmp_path, preemption=False) as mgr:
        assert signal.getsignal(TERM) is signal.SIG_DFL and not mgr.preempted
    mgr = CheckpointManager(tmp_path, preemption=True)
    assert signal.getsignal(TERM) not in (signal.SIG_DFL, previous)
    assert signal.getsignal(USR1) is not previous
    mgr.close()
    assert signal.getsignal(TERM) is signal.SIG_DFL and signal.getsignal(USR1) is previous


@pytest.mark.parametrize("sig", [TERM, USR1])
def test_the_handler_only_sets_a_flag(tmp_path: Path, sig: int) -> None:
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path, model=model, preemption=True) as mgr:
        before = _files(tmp_path)
        signal.raise_signal(sig)
        assert mgr.preempted
        assert _files(tmp_path) == before and mgr.checkpoints == []  # nothing written


def test_previous_python_handler_is_chained(tmp_path: Path) -> None:
    seen: List[int] = []
    signal.signal(TERM, lambda signum, frame: seen.append(signum))
    with CheckpointManager(tmp_path, preemption=True) as mgr:
        signal.raise_signal(TERM)
        assert mgr.preempted and seen == [TERM]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_closing_in_any_order_keeps_the_chain_and_restores_the_original(
        tmp_path: Path, order: Any) -> None:
    seen: List[int] = []

    def original(signum: int, frame: Any) -> None:
        seen.append(signum)

    signal.signal(USR1, original)
    mgrs = [CheckpointManager(tmp_path / str(i), preemption=[USR1]) for i in range(3)]
    for n, i in enumerate(order, 1):
        mgrs[i].close()
        if n < 3:  # the open ones and the original still get it, once each
            signal.raise_signal(USR1)
            assert seen == [USR1] * n
            assert [m.preempted for m in mgrs] == [j != order[0] for j in range(3)]
    assert signal.getsignal(USR1) is original


def _run(*code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter: a signal whose default action ends the process
    must not reach the test runner."""
    source = "\n".join(["import os, signal, sys, tempfile, threading, time", "import ckpt",
                        *(textwrap.dedent(part) for part in code)])
    return subprocess.run([sys.executable, "-c", source],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("close, restored", [
    ("a.close(); b.close()", True),  # out of order
    ("b.close(); a.close()", True),
    ("for m in (a, b): (t := threading.Thread(target=m.close)).start(); t.join()", False),
], ids=["a-then-b", "b-then-a", "in-a-thread"])
def test_after_close_sigterm_ends_the_process_again(close: str, restored: bool) -> None:
    result = _run("""
        a = ckpt.CheckpointManager(tempfile.mkdtemp(), preemption=True)
        b = ckpt.CheckpointManager(tempfile.mkdtemp(), preemption=True)
    """, close, """
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("survived")
    """)
    assert result.returncode == -TERM, result.stderr
    assert result.stdout == f"{restored}\n"  # off the main thread: handed on at the signal


@pytest.mark.parametrize("managers", [1, 2])
def test_a_second_sigterm_ends_the_process(managers: int) -> None:
    result = _run(f"mgrs = [ckpt.CheckpointManager(tempfile.mkdtemp(), preemption=True) "
                  f"for _ in range({managers})]", """
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(3000):  # the handler runs in the main thread, soon
            if all(m.preempted for m in mgrs):
                break
            time.sleep(0.01)
        print("first swallowed", all(m.preempted for m in mgrs), flush=True)
        time.sleep(ckpt.preemption.REPEAT_WINDOW_S + 0.2)  # a second request, not a duplicate delivery
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("survived")
    """)
    assert result.returncode == -TERM, result.stderr
    assert result.stdout == "first swallowed True\n"


def test_the_same_signal_twice_at_once_is_one_notice(tmp_path: Path) -> None:
    """Slurm signals every process of a step and torchrun forwards the signal to its
    workers: two SIGTERMs a few milliseconds apart must still give the graceful save."""
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path, model=model, preemption=True) as mgr:
        signal.raise_signal(TERM)
        signal.raise_signal(TERM)  # the duplicate: swallowed, the process lives on
        assert mgr.preempted and signal.getsignal(TERM) not in (signal.SIG_DFL, None)
        with pytest.raises(Preempted) as info:
            mgr.save_if_preempted(epoch=0, step=5)
    assert info.value.code == 128 + TERM and info.value.record.step == 5


def test_a_second_ctrl_c_raises_keyboard_interrupt(tmp_path: Path) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with CheckpointManager(tmp_path, preemption=[signal.SIGINT]) as mgr:
        signal.raise_signal(signal.SIGINT)
        assert mgr.preempted  # the first one only sets the flag
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_save_if_preempted_is_a_no_op_until_a_signal(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), preemption=True) as mgr:
        assert mgr.save_if_preempted(epoch=0, step=1) is None
        assert mgr.checkpoints == [] and not mgr.preempted


def test_save_if_preempted_saves_mid_epoch_closes_and_exits(tmp_path: Path, caplog: Any) -> None:
    signal.signal(TERM, signal.SIG_DFL)
    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(tmp_path, model=model, preemption=True)
    signal.raise_signal(TERM)
    with caplog.at_level(logging.WARNING, logger="ckpt"), pytest.raises(Preempted) as info:
        mgr.save_if_preempted(epoch=2, step=17, extra={"note": "preempted"})
    exit_ = info.value
    assert isinstance(exit_, SystemExit) and exit_.code == 128 + TERM and exit_.signum == TERM
    assert (exit_.record.epoch, exit_.record.step, exit_.record.mid_epoch) == (2, 17, True)
    assert "received SIGTERM" in caplog.text and exit_.record.path.name in caplog.text
    assert signal.getsignal(TERM) is signal.SIG_DFL  # handlers restored on the way out
    with pytest.raises(StorageError, match="closed"):
        mgr.save(epoch=2, step=18)

    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2)) as again:
        assert again.resume() == 2  # the interrupted epoch continues
        assert again.step == 17 and again.resumed.extra == {"note": "preempted"}


def test_preemption_with_async_saves_commits_before_exiting(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(tmp_path, model=model, preemption=True, async_save=True)
    mgr.save(epoch=0, step=1, mid_epoch=True)
    signal.raise_signal(USR1)
    with pytest.raises(Preempted) as info:
        mgr.save_if_preempted(epoch=0, step=2)
    assert info.value.record.path.is_file() and [r.step for r in mgr.checkpoints] == [1, 2]
    assert torch.equal(torch.load(info.value.record.path, weights_only=True)["model"]["weight"], model.weight)


def test_a_step_already_saved_is_not_saved_twice(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), preemption=[USR1]) as mgr:
        saved = mgr.save(epoch=0, step=8, mid_epoch=True)
        signal.raise_signal(USR1)
        with pytest.raises(Preempted) as info:
            mgr.save_if_preempted(epoch=0, step=8)
    assert info.value.record.path == saved.path and info.value.code == 128 + USR1
    assert len(mgr.checkpoints) == 1


def test_custom_signals_leave_the_others_alone(tmp_path: Path) -> None:
    signal.signal(TERM, signal.SIG_DFL)
    with CheckpointManager(tmp_path, preemption=[signal.SIGUSR2]) as mgr:
        assert signal.getsignal(TERM) is signal.SIG_DFL
        signal.raise_signal(signal.SIGUSR2)
        assert mgr.preempted


@pytest.mark.parametrize("option", ["yes", [signal.SIGKILL], [99999], [1.5], 3])
def test_invalid_options_raise_and_install_nothing(tmp_path: Path, option: Any) -> None:
    signal.signal(TERM, signal.SIG_DFL)
    with pytest.raises(ConfigError):
        CheckpointManager(tmp_path, preemption=[TERM] + option if isinstance(option, list) else option)
    assert signal.getsignal(TERM) is signal.SIG_DFL


def test_only_the_main_thread_can_enable_it(tmp_path: Path) -> None:
    errors: List[BaseException] = []

    def create() -> None:
        try:
            CheckpointManager(tmp_path, preemption=True)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    assert "main thread" in str(errors[0])


def test_public_names() -> None:
    assert ckpt.Preempted is Preempted and "Preempted" in ckpt.__all__


def _example(directory: Path) -> subprocess.Popen[str]:
    args = ["--dir", str(directory), "--epochs", "5", "--samples", "640", "--save-every", "7"]
    return subprocess.Popen([sys.executable, str(EXAMPLE), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_the_example_stops_on_sigterm_and_resumes_to_the_same_result(tmp_path: Path) -> None:
    reference, err = _example(tmp_path / "reference").communicate(timeout=120)
    assert reference.count("val_loss") == 5, err

    proc = _example(tmp_path / "run")
    assert proc.stdout is not None
    first = proc.stdout.readline()  # end of epoch 0: the run is now inside a later epoch
    proc.send_signal(TERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + TERM, err
    assert "received SIGTERM: saved" in err and "Traceback" not in err

    resumed, err = _example(tmp_path / "run").communicate(timeout=120)
    assert re.search(r"resumed from ckpt-e\d+-s\d+\.pt: epoch [1-4], step \d+", resumed), err
    lines = [line for line in (first + rest + resumed).splitlines() if "val_loss" in line]
    assert lines == reference.splitlines()  # the same numbers as the uninterrupted run
