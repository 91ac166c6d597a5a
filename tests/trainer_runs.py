"""Tiny training runs in the real trainers, for the integration tests.

Run as a script (``python tests/trainer_runs.py TRAINER DIR OUT [--resume] [--slow]
[--async]``) so that a test can SIGKILL it from outside; the final weights go to OUT.
Imported as ``trainer_runs`` (the tests folder is on ``sys.path``) for the kill harness.
The Lightning and HF modules' single-process runs fork from a pair of zygotes:
interpreters that imported torch and the trainer once (a forked run still dies by a real
SIGKILL), instead of paying that import (up to 8 s of CPU for Lightning) per run. The
killed runs fork from one, the resumes from the other: a resume still starts in another
interpreter than the run it resumes (its own hash seed and address layout).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

HERE = Path(__file__).resolve()
EPOCHS = 6


def data(n: int = 48) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))


def pause(slow: bool) -> None:
    if slow:
        time.sleep(0.3)


# -- Lightning -----------------------------------------------------------------------------

def lightning(directory: str, out: str, resume: bool, slow: bool, async_save: bool, ddp: bool = False,
              full: str = "") -> None:
    """``ddp``: under ``torchrun`` with 2 processes, ``strategy="ddp"`` (gloo), every rank
    seeded differently and ``RankRNG`` among the callbacks; each rank writes its PID and,
    at the end, its torch RNG state next to ``out``. ``full``: first the uninterrupted fit
    (in ``DIRECTORY-full``), its weights to that path."""
    if full:
        _lightning_fit(directory + "-full", full, False, False, async_save, ddp)
    _lightning_fit(directory, out, resume, slow, async_save, ddp)


def _lightning_fit(directory: str, out: str, resume: bool, slow: bool, async_save: bool, ddp: bool) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ckpt.integrations.lightning import CheckpointIO, RankRNG, last_checkpoint

    rank = int(os.environ.get("RANK", 0))
    if ddp:
        Path(f"{out}.rank{rank}.pid").write_text(str(os.getpid()))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss, on_epoch=True, on_step=False, sync_dist=ddp)
            return loss

        def setup(self, stage: str) -> None:  # after DDP's own seeding, before a checkpoint is restored
            if ddp:  # each rank its own dropout masks: only RankRNG brings every rank's RNG back
                torch.manual_seed(100 + self.global_rank)

        def on_train_epoch_end(self) -> None:
            pause(slow)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(data(), batch_size=4 if ddp else 8, shuffle=True)

    pl.seed_everything(0, verbose=False)
    model = Module()
    callbacks: List[Any] = [ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=2, monitor="loss",
                                            every_n_epochs=1)]
    parallel: Dict[str, Any] = {}
    if ddp:
        callbacks.append(RankRNG())
        parallel = {"strategy": "ddp", "devices": 2, "num_nodes": 1}
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[CheckpointIO(async_save=async_save)],
                         callbacks=callbacks, **parallel)
    trainer.fit(model, ckpt_path=last_checkpoint(directory) if resume else None)
    if ddp:
        torch.save(torch.get_rng_state(), f"{out}.rank{rank}.rng")
    if rank == 0:
        torch.save(model.net.state_dict(), out + ".part")
        os.replace(out + ".part", out)


# -- Hugging Face Trainer ------------------------------------------------------------------------

HF_STEPS, HF_SAVE_EVERY = 12, 3


def hf(directory: str, out: str, resume: bool, slow: bool, jit: bool = False) -> None:
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from ckpt.integrations.transformers import CheckpointCallback, last_checkpoint

    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=8, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (32, 6), generator=g)
    ds = [{"input_ids": ids[i], "labels": int(ids[i].sum()) % 2} for i in range(len(ids))]

    class Slow(Trainer):
        def _save_rng_state(self, output_dir: str) -> None:  # a save the test kills half-way
            if slow and not jit and self.state.global_step == 2 * HF_SAVE_EVERY:
                time.sleep(30)
            super()._save_rng_state(output_dir)

    class Steady(TrainerCallback):  # with --jit: past the first save, hold each step until the JIT
        def on_step_end(self, _: Any, state: Any, *args: Any, **kwargs: Any) -> None:  # request the
            if slow and state.global_step > HF_SAVE_EVERY:  # test's SIGTERM makes (3 s later) is set
                jit = next(c.jit_manager for c in trainer.callback_handler.callbacks if getattr(c, "jit_manager", None))
                deadline = time.monotonic() + 120
                while not jit.is_checkpoint_requested and time.monotonic() < deadline:
                    time.sleep(0.01)

    args = TrainingArguments(output_dir=directory, max_steps=HF_STEPS,
                             save_steps=HF_SAVE_EVERY, save_strategy="steps", save_total_limit=1,
                             per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True,
                             logging_strategy="no", seed=0, dataloader_num_workers=0, enable_jit_checkpoint=jit)
    callbacks = [CheckpointCallback()] + ([Steady()] if jit else [])
    trainer = Slow(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=last_checkpoint(directory) if resume else None)
    torch.save(model.state_dict(), out)


# -- pytorch-ignite ------------------------------------------------------------------------------

def ignite(directory: str, out: str, resume: bool, slow: bool) -> None:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, global_step_from_engine

    from ckpt.integrations.ignite import CkptSaver, RNGState, last_checkpoint, load

    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = torch.utils.data.DataLoader(data(), batch_size=8, shuffle=True)

    def step(engine: Engine, batch: Any) -> float:
        x, y = batch
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    to_save = {"model": model, "optimizer": opt, "trainer": trainer, "rng": RNGState()}
    handler = Checkpoint(to_save, CkptSaver(directory), n_saved=2,
                         global_step_transform=global_step_from_engine(trainer))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: pause(slow))
    path = last_checkpoint(directory) if resume else None
    if path:
        Checkpoint.load_objects(to_load=to_save, checkpoint=load(path))
    trainer.run(loader, max_epochs=EPOCHS)
    torch.save(model.state_dict(), out)


# -- torchdata StatefulDataLoader under CheckpointManager, saved mid-epoch ----------------------

def torchdata(directory: str, out: str, resume: bool, slow: bool) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ckpt import CheckpointManager

    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = StatefulDataLoader(data(), batch_size=4, shuffle=True, num_workers=2)
    with CheckpointManager(directory, model=model, optimizer=opt, loader=loader) as mgr:
        start = mgr.resume() if resume else 0
        step = mgr.step if resume else 0
        for epoch in range(start, 3):
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                step += 1
                if step % 5 == 0:
                    mgr.save(epoch=epoch, step=step, mid_epoch=True)
                    pause(slow)
    torch.save(model.state_dict(), out)


# -- Accelerate-prepared objects under CheckpointManager, saved mid-epoch (1 or 2 processes) ----

ACC_EPOCHS, ACC_SAVE_EVERY = 2, 4


def accelerate(directory: str, out: str, resume: bool, slow: bool, full: str = "") -> None:
    """Run under ``python`` (one process) or ``torchrun`` (2 processes, gloo). ``full``:
    first the uninterrupted fit (in ``DIRECTORY-full``), its weights to that path, then
    the (slow) fit the test kills. Each rank writes its PID next to ``out``; rank 0 the weights."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True,
                                                                          use_seedable_sampler=True))
    Path(f"{out}.rank{acc.process_index}.pid").write_text(str(os.getpid()))
    if full:
        _accelerate_fit(acc, directory + "-full", full, resume=False, slow=False)
    _accelerate_fit(acc, directory, out, resume, slow)


def _accelerate_fit(acc: Any, directory: str, out: str, resume: bool, slow: bool) -> None:
    from ckpt import CheckpointManager

    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4)
    loader = torch.utils.data.DataLoader(data(), batch_size=8 // acc.num_processes, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    with CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched, loader=loader) as mgr:
        start = mgr.resume() if resume else 0
        step = mgr.step if resume else 0
        for epoch in range(start, ACC_EPOCHS):
            for x, y in loader:
                opt.zero_grad()
                acc.backward(torch.nn.functional.mse_loss(model(x), y))
                opt.step()
                sched.step()
                step += 1
                if step % ACC_SAVE_EVERY == 0:
                    mgr.save(epoch=epoch, step=step, mid_epoch=True)
                    pause(slow)
    if acc.is_main_process:
        torch.save(acc.unwrap_model(model).state_dict(), out + ".part")
        os.replace(out + ".part", out)


RUNS: Dict[str, Callable[..., None]] = {"lightning": lightning, "hf": hf, "ignite": ignite, "torchdata": torchdata,
                                        "accelerate": accelerate}


def main(argv: List[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trainer", choices=sorted(RUNS))
    p.add_argument("directory")
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow", action="store_true")
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--jit", action="store_true", help="hf: enable_jit_checkpoint (SIGTERM saves)")
    p.add_argument("--full", default="", help="first the uninterrupted fit (in DIRECTORY-full), its weights "
                                              "here, then the run asked for: one interpreter start less")
    p.add_argument("--ddp", action="store_true", help="lightning: strategy='ddp' on 2 processes (under torchrun)")
    a = p.parse_args(argv)
    kwargs: Dict[str, Any] = {"resume": a.resume, "slow": a.slow}
    if a.trainer == "lightning":
        kwargs.update(async_save=a.async_save, ddp=a.ddp, full=a.full)
    if a.trainer == "hf":
        kwargs["jit"] = a.jit
    if a.trainer in ("lightning", "accelerate"):
        kwargs["full"] = a.full  # they share one Accelerator / need their rank's paths
    elif a.full:
        RUNS[a.trainer](a.directory + "-full", a.full, **{**kwargs, "resume": False, "slow": False})
    RUNS[a.trainer](a.directory, a.out, **kwargs)


# -- the kill harness -------------------------------------------------------------------------

#: ``torchrun`` with 2 processes on this machine (gloo: Accelerator(cpu=True) under it).
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def saves(directory: Path) -> int:
    """How many checkpoints a run directory's index lists (0 before its first commit)."""
    try:
        return len(json.loads((directory / "ckpt-index.json").read_text())["checkpoints"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def run(trainer: str, directory: Path, out: Path, *flags: str, timeout: float = 120,
        launcher: Tuple[str, ...] = (sys.executable,), zygote: Optional[Zygote] = None) -> None:
    """Run to the end in a subprocess (``launcher``: ``TORCHRUN_2`` for 2 processes), or
    forked by ``zygote``."""
    if zygote is None:
        subprocess.run([*launcher, str(HERE), trainer, str(directory), str(out), *flags],
                       check=True, timeout=timeout, env=_env(), stdout=subprocess.DEVNULL)
        return
    with tempfile.NamedTemporaryFile() as log:
        forked = zygote.fork([trainer, str(directory), str(out), *flags], log.name)
        try:
            forked.wait(timeout)
        finally:
            _kill_session(forked)
        assert forked.returncode == 0, (forked.returncode, Path(log.name).read_bytes()[-3000:].decode(errors="replace"))


def run_and_kill(trainer: str, directory: Path, saved: Callable[[Path], bool], *flags: str,
                 out: Optional[Path] = None, ranks: int = 0, launcher: Tuple[str, ...] = (sys.executable,),
                 deadline: float = 120, sig: int = signal.SIGKILL, status: Optional[int] = None,
                 zygote: Optional[Zygote] = None) -> None:
    """Start a slow run (in its own session, its output to a file: no pipe to fill); once
    ``saved(directory)``, send ``sig`` from outside by PID: to the launched process, or with
    ``ranks`` to each of that many ranks by the PID it wrote next to ``out`` (the launcher
    reaps them). The run must end with ``status``: by default, killed by ``sig``, or 1 for
    ``torchrun`` (its workers failed). Whatever is left of its session (or, forked by
    ``zygote``, its process group) is SIGKILLed, and it is reaped."""
    out = out or directory.parent / f"{directory.name}-unused.pt"
    pid_files = [Path(f"{out}.rank{r}.pid") for r in range(ranks)]
    with tempfile.NamedTemporaryFile() as log:
        argv = [trainer, str(directory), str(out), "--slow", *flags]
        proc: Any = (zygote.fork(argv, log.name) if zygote else
                     subprocess.Popen([*launcher, str(HERE), *argv], env=_env(), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        try:
            _signal_once(proc, lambda: directory.exists() and saved(directory) and all(p.exists() for p in pid_files),
                         lambda: [int(p.read_text()) for p in pid_files] if ranks else [proc.pid], sig, deadline, log)
            proc.wait(timeout=deadline)
        finally:
            _kill_session(proc)
        text = Path(log.name).read_bytes()[-3000:].decode(errors="replace")
    if status is None:
        status = -sig if launcher == (sys.executable,) else 1
    assert proc.returncode == status, (proc.returncode, text)


def _signal_once(proc: subprocess.Popen, ready: Callable[[], bool], pids: Callable[[], List[int]], sig: int,
                 deadline: float, log: Any) -> None:
    """Poll ``ready()`` until true (or fail once the run ended, or after ``deadline`` s), then
    send ``sig`` to the processes ``pids()`` names."""
    end = time.monotonic() + deadline
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was killed: {Path(log.name).read_bytes()[-3000:]!r}")
        if time.monotonic() > end:
            raise AssertionError("no checkpoint appeared before the deadline")
        time.sleep(0.02)
    for pid in pids():
        os.kill(pid, sig)


def _kill_session(proc: Any) -> None:
    """SIGKILL whatever is left of ``proc``'s session (it, a launcher's workers, a data
    loader's workers), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left: it ended and took its session with it
        pass
    proc.wait(timeout=30)


class Baseline:
    """The uninterrupted run's final weights, computed once per test module by the first
    kill test that needs them: its launch runs the uninterrupted fit first (``--full``),
    so the module pays one interpreter start less."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "full.pt"

    def flags(self) -> Tuple[str, ...]:
        """What to add to the next killed run's command line (nothing once computed)."""
        return () if self.path.exists() else ("--full", str(self.path))

    def ready(self, directory: Path) -> bool:
        return self.path.exists()

    def weights(self) -> Any:
        return torch.load(self.path)


# -- the zygote: one import of torch and a trainer, a fork per run ------------------------------

#: What a zygote imports before its first fork, by trainer (the costly part of a run's start).
WARM = {"lightning": ("pytorch_lightning", "ckpt.integrations.lightning"),
        "hf": ("transformers", "ckpt.integrations.transformers")}


class Forked:
    """A run the zygote forked, in a process group of its own: ``pid``, ``poll()``,
    ``wait(timeout)`` and ``returncode`` as for a ``Popen`` (the zygote reaps it and
    reports its status)."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            line = self.zygote.line(0)
            if line is not None:
                self.returncode = int(line.removeprefix("exit "))
        return self.returncode

    def wait(self, timeout: float) -> int:
        if self.returncode is None:
            line = self.zygote.line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(f"run {self.pid}", timeout)
            self.returncode = int(line.removeprefix("exit "))
        return self.returncode


class Zygote:
    """``python trainer_runs.py --zygote TRAINER``: imports once, then forks one run per
    request (one at a time). ``close()`` ends and reaps it (a test module's fixture)."""

    def __init__(self, trainer: str) -> None:
        self.trainer = trainer
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--zygote", trainer], env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def ready(self, timeout: float = 300) -> None:
        """Wait until it imported all it needs."""
        if self.line(timeout) != "ready":
            raise AssertionError(f"the {self.trainer} zygote did not start within {timeout:.0f} s")

    def line(self, timeout: float) -> Optional[str]:
        """The zygote's next line, or None if none within ``timeout`` s (it ended: an error)."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the zygote ended (status {self.proc.wait(30)})")
        return line.strip()

    def fork(self, argv: List[str], log: str) -> Forked:
        """Start ``main(argv)`` in a fork, its output to the file ``log``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
        self.proc.stdin.flush()
        line = self.line(60)
        assert line is not None and line.startswith("pid "), line
        return Forked(self, int(line.removeprefix("pid ")))

    def close(self) -> None:
        """End the zygote (EOF on its input) and reap it; SIGKILL its session if it lingers."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            _kill_session(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


class Zygotes(NamedTuple):
    """Runs to kill fork from ``killed``, their resumes from ``resumed``: two interpreters."""

    killed: Zygote
    resumed: Zygote


def zygotes(trainer: str) -> Iterator[Zygotes]:
    """A test module's fixture: ``yield from trainer_runs.zygotes("hf")`` (both started at
    once, closed at its end; until then children of the session, like the moto server, for
    the check in conftest)."""
    from tests import children

    pair = Zygotes(Zygote(trainer), Zygote(trainer))
    children.SESSION.update(z.proc.pid for z in pair)
    try:
        for z in pair:
            z.ready()
        yield pair
    finally:
        for z in pair:
            z.close()
            children.SESSION.discard(z.proc.pid)


def _serve(trainer: str) -> None:
    """The zygote's loop: import, say ``ready``; per request line, fork the run, say ``pid N``,
    reap it, say ``exit STATUS`` (negative: the signal that ended it); end at EOF."""
    import importlib
    import threading

    for name in WARM[trainer]:
        importlib.import_module(name)
    assert threading.active_count() == 1, "a thread started on import: forking would copy its locks"
    print("ready", flush=True)
    for request in sys.stdin:
        job = json.loads(request)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the run: its own process group, so that the harness's killpg reaches its workers too
            os.setpgid(0, 0)
            os.close(r)
            os.close(w)  # the zygote may report the PID now
            _die_with_parent()
            fd = os.open(job["log"], os.O_WRONLY | os.O_APPEND)
            for target in (1, 2):
                os.dup2(fd, target)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            main(job["argv"])
            return  # the interpreter ends as after the script: threads joined, atexit run; an error: 1
        os.close(w)
        os.read(r, 1)  # EOF once the child is in its process group
        os.close(r)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def _die_with_parent() -> None:
    """SIGKILL this process if the zygote dies (Linux prctl; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    root = str(HERE.parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--zygote":
        _serve(sys.argv[2])
    else:
        main(sys.argv[1:])
