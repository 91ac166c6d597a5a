"""Run a function on N ranks as real processes joined by a real gloo process group.

``launch(fn, world_size, *args)`` starts one process per rank, each with
``torch.distributed`` initialised (gloo, rank, world size), calls ``fn(rank, world_size,
*args)`` in each and returns one :class:`Outcome` per rank: the return value, or the
exception and its traceback, or the signal that killed it. ``run()`` is the same but
re-raises the first rank's failure, naming the rank.

Like torchrun, the rendezvous store lives in the launching process, not in rank 0, so
a rank killed on purpose (:func:`kill_self`) does not take the store down with it.

Processes come from a forkserver that has imported torch once: a spawned rank would
import torch again, seconds per rank on a loaded machine. Every launch has a hard
deadline; on failure or timeout every rank still alive is SIGKILLed and reaped.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "numpy"]
_mp = multiprocessing.get_context("forkserver")
_mp.set_forkserver_preload(_PRELOAD)


@dataclass
class Outcome:
    """What one rank did: returned ``value``, raised ``error``, or was killed (``signal``)."""

    rank: int
    value: Any = None
    error: BaseException | None = None
    traceback: str = ""
    exitcode: int | None = None
    pid: int | None = None

    @property
    def killed(self) -> bool:
        return self.exitcode is not None and self.exitcode < 0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.killed and self.exitcode == 0


class RankFailed(AssertionError):
    """A rank raised, was killed, or did not finish; the message names it. After a
    timeout, ``outcomes`` holds what every rank did (all of them killed and reaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.outcomes: list[Outcome] = []


def kill_self() -> NoReturn:
    """SIGKILL the calling rank at once: no cleanup, no exception, like a preempted node."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, init: bool,
           pg_timeout: float, conn: multiprocessing.connection.Connection, args: tuple) -> None:
    torch.set_num_threads(1)  # ranks share the machine's few cores
    try:
        if init:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                  timeout=timedelta(seconds=pg_timeout))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=pg_timeout))
        value = fn(rank, world_size, *args)
        # plain pickle, not the connection's: torch's reducer would pass tensors as shared-memory
        # file descriptors, which die with this process right after sending
        conn.send_bytes(pickle.dumps(("ok", value, "")))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, whatever it is
        tb = traceback.format_exc()
        try:
            data = pickle.dumps(("err", e, tb))
            pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
        except Exception:  # noqa: BLE001 - then send the text instead
            data = pickle.dumps(("err", RuntimeError(f"{type(e).__name__}: {e}"), tb))
        conn.send_bytes(data)
    finally:
        conn.close()
        # skip interpreter teardown: a gloo thread blocked on a dead peer must not hang exit
        os._exit(0)


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
           init: bool = True, pg_timeout: float = 30.0) -> list[Outcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; never raises for a
    rank's failure (see :func:`run`), raises :class:`RankFailed` after ``timeout`` seconds."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=pg_timeout)) if init else None
    port = store.port if store is not None else 0
    outcomes = [Outcome(rank) for rank in range(world_size)]
    procs, conns = [], []
    try:
        for rank in range(world_size):
            recv, send = _mp.Pipe(duplex=False)
            p = _mp.Process(target=_child, args=(fn, rank, world_size, port, init, pg_timeout, send, args),
                            name=f"rank{rank}", daemon=True)
            p.start()
            outcomes[rank].pid = p.pid
            send.close()
            procs.append(p)
            conns.append(recv)
        _collect(procs, conns, outcomes, timeout)
    except RankFailed as e:
        e.outcomes = outcomes
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        for c in conns:
            c.close()
        for out, p in zip(outcomes, procs):
            out.exitcode = p.exitcode
    return outcomes


def _collect(procs: list, conns: list, outcomes: list[Outcome], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = {c: r for r, c in enumerate(conns)}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            stuck = sorted(pending.values())
            raise RankFailed(f"ranks {stuck} did not finish within {timeout:g} s; all ranks killed")
        for c in multiprocessing.connection.wait(list(pending), timeout=left):
            rank = pending.pop(c)
            try:
                status, payload, tb = pickle.loads(c.recv_bytes())
            except EOFError:  # died without reporting: killed
                continue
            if status == "ok":
                outcomes[rank].value = payload
            else:
                outcomes[rank].error, outcomes[rank].traceback = payload, tb
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))


def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
        init: bool = True) -> list[Any]:
    """:func:`launch`, returning every rank's value; re-raises the first failure with its rank."""
    outcomes = launch(fn, world_size, *args, timeout=timeout, init=init)
    for out in outcomes:
        if out.error is not None:
            raise RankFailed(f"rank {out.rank} raised {type(out.error).__name__}: {out.error}\n"
                             f"--- rank {out.rank} traceback ---\n{out.traceback}") from out.error
        if not out.ok:
            raise RankFailed(f"rank {out.rank} exited with code {out.exitcode}")
    return [out.value for out in outcomes]
