"""The collective engine's restores: rank 0 chooses, every rank reads and applies.

:class:`Restoring` is the half of :class:`~ckpt.engine.collective.CollectiveEngine`
that resumes and restores (see that module for the protocol). On ``resume()`` rank 0
takes the newest checkpoint that loads, through the one resume loop
(:func:`ckpt.resume.newest_valid`); every other rank then reads the checkpoint it
chose. A concurrent writer may replace or delete it in between: a rank that finds
other bytes than rank 0 read, or none, says so, and rank 0 reads the directory again
and all choose again (a few times: :data:`ckpt.resume.RESUME_PASSES`), so every rank
restores the same checkpoint or all raise together.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import record, resume, schema, state
from ..catalog import sharddir
from ..distributed import collective as cl
from ..distributed.shardsafe import Held, leader_read
from ..errors import CorruptCheckpointError
from ..record import CheckpointRecord
from ..sampler import ResumableSampler
from . import restoring
from .base import ManagerView, Outcome, failure

if TYPE_CHECKING:
    from ..catalog import Catalog



class Restoring:
    """Resume and restore under a process group (mixin of the collective engine, which
    provides the group and its failing-together collectives)."""

    ctx: cl.Group
    timeout: float
    _read_by_leader: tuple[str, dict[str, Any]] | None  # rank 0: the dict it just read to check it
    _foreign: tuple[CheckpointRecord, dict[str, Any]] | None  # rank 0: the same, by path
    _held: tuple[str, Held] | None  # rank 0: a sharded checkpoint's small files, read to choose it
    _damaged: dict[str, CorruptCheckpointError]  # rank 0, in resume(): sharded ones that failed to load

    def _broadcast(self, what: str, outcome: Outcome | None, error: BaseException | None) -> Outcome:
        raise NotImplementedError

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def resume(self, mgr: ManagerView) -> int:
        """Rank 0 chooses (the newest checkpoint that loads), every rank reads it; when a
        rank finds it gone or replaced since rank 0 read it (a concurrent writer), rank 0
        reads the directory again and all choose again (a few times, then all raise). A
        sharded checkpoint found damaged while it loads is skipped as a damaged file is
        (moved aside), and all choose again."""
        self._damaged = {}
        passes_left = resume.RESUME_PASSES - 1
        while True:
            rec, _ = self._choose(mgr, None, None)
            if rec is None:
                return 0
            obj = self._read(mgr, rec, retry=passes_left > 0, damaged_too=True)
            if obj is not None:
                self._damaged = {}
                self._apply(mgr, rec, obj)
                return rec.next_epoch
            if rec.name not in self._damaged:  # each damaged one is left out once: no pass counted
                passes_left -= 1

    def restore(self, mgr: ManagerView, which: Any, step: int | None) -> CheckpointRecord:
        rec, foreign = self._choose(mgr, which, step)
        if foreign is not None:
            return self._load_foreign(mgr, foreign)
        assert rec is not None  # restore raises instead of choosing nothing
        obj = self._read(mgr, rec, retry=False)
        assert obj is not None  # without retry, a failed read raises on every rank
        return self._apply(mgr, rec, obj)

    def _choose(self, mgr: ManagerView, which: Any,
                step: int | None) -> tuple[CheckpointRecord | None, str | None]:
        """Rank 0 picks the checkpoint (resume: the newest that verifies); every rank learns
        it: (a committed record, None), or (None, the path of a file outside the index)."""
        outcome: Outcome | None = None
        error: BaseException | None = None
        if self.ctx.is_leader:
            try:
                if which is None:  # the one resume loop: newest valid first, re-read on a concurrent replace
                    found = resume.newest_valid(mgr.refresh, functools.partial(self._check, mgr),
                                                functools.partial(restoring.skip, mgr), mgr.directory)
                    rec = None if found is None else found[0]
                else:
                    mgr.refresh()
                    rec, obj = restoring.find(mgr, which, step)
                    if obj is not None:  # a file outside the index: every rank reads it by path
                        self._foreign = (rec, obj)
                        outcome = ("foreign", str(rec.path), [r.to_json() for r in mgr.records])
                if outcome is None:
                    outcome = ("ok", None if rec is None else rec.to_json(), [r.to_json() for r in mgr.records])
            except Exception as e:  # noqa: BLE001
                error, outcome = e, failure(e)
        got = self._broadcast("resume()" if which is None else "restore()", outcome, error)
        if not self.ctx.is_leader:
            mgr.catalog.adopt(records_of(mgr.catalog, got[2]))
        if got[0] == "foreign":
            return None, got[1]
        if got[1] is None:
            return None, None
        name = got[1]["file"]
        known = next((r for r in mgr.records if r.name == name), None)
        return known or record.from_json(got[1], mgr.catalog.store.where(name)), None

    def _load_foreign(self, mgr: ManagerView, path: str) -> CheckpointRecord:
        """restore(path) of a file outside the index: every rank reads it (a shared filesystem)."""
        from pathlib import Path

        error: BaseException | None = None
        applied: CheckpointRecord | None = None
        try:
            read, self._foreign = self._foreign, None
            rec, obj = restoring.foreign(mgr, Path(path)) if read is None else read
            applied = restoring.apply(mgr, obj, rec)
        except Exception as e:  # noqa: BLE001 - every failure must reach the others
            error = e
        self._collective(cl.agree, self.ctx, f"restore({path!r})", error, timeout=self.timeout)
        assert applied is not None
        return applied

    def _check(self, mgr: ManagerView, rec: CheckpointRecord) -> None:
        """Rank 0, resuming: raise unless ``rec`` loads (a file, read once: :meth:`_read`
        takes the dict), or its manifest and small files check (a sharded directory)."""
        if rec.name in self._damaged:  # it failed to load on some rank: skipped now (moved aside)
            raise self._damaged[rec.name]
        if schema.is_sharded(rec.name):  # its shards are verified while they load
            manifest = sharddir.checked_manifest(mgr.catalog.store, rec.name, rec.checksum)
            self._held = (rec.name, leader_read(mgr.catalog.store.tree(rec.name), manifest))
        else:
            self._read_by_leader = (rec.name, restoring.load(mgr, rec)[0])

    def _read(self, mgr: ManagerView, rec: CheckpointRecord, *, retry: bool,
              damaged_too: bool = False) -> dict[str, Any] | None:
        """Every rank's dict of ``rec`` (rank 0: the one it read to choose it; a sharded
        checkpoint: loaded collectively, its tensors into the tracked objects). All succeed
        or all raise; but with ``retry``, when the ranks that failed found the file gone or
        other bytes than rank 0 read (a concurrent replace or delete), None on every rank;
        with ``damaged_too``, a sharded checkpoint found damaged (None too: choose again)."""
        if schema.is_sharded(rec.name):
            return self._read_sharded(mgr, rec, damaged_too)
        error: BaseException | None = None
        obj: dict[str, Any] | None = None
        again = False
        try:
            held, self._read_by_leader = self._read_by_leader, None
            obj = held[1] if held is not None and held[0] == rec.name else restoring.load(mgr, rec)[0]
        except (FileNotFoundError, CorruptCheckpointError) as e:  # rank 0 read these bytes: a writer changed them
            error, again = e, retry and not self.ctx.is_leader
            if again:
                warnings.warn(f"{rec.path} was replaced or deleted since rank 0 chose it ({e}): "
                              "choosing again", stacklevel=4)
        except Exception as e:  # noqa: BLE001 - every failure must reach the others
            error = e
        if self._collective(cl.agree_or_retry, self.ctx, f"load of {rec.name}", error, retry=again,
                            timeout=self.timeout):
            return None
        return obj

    def _read_sharded(self, mgr: ManagerView, rec: CheckpointRecord, damaged_too: bool) -> dict[str, Any] | None:
        """Every rank loads ``rec`` (collective, agreed inside: all raise together); each
        shard file's CRC-32 is summed by the rank reading most of it. When it is damaged,
        one more agreement: with ``damaged_too`` every rank returns None (rank 0 leaves it
        out of the next choice); otherwise, or on any other failure, all raise."""
        from ..distributed.sharded import load_sharded

        held, self._held = self._held, None
        error: BaseException | None = None
        loaded: dict[str, Any] | None = None
        try:
            loaded = load_sharded(self.ctx, mgr.catalog.store.tree(rec.name), split(mgr.trackables)[0],
                                  timeout=self.timeout, strict=mgr.options.strict,
                                  held=held[1] if held is not None and held[0] == rec.name else None)
        except Exception as e:  # noqa: BLE001 - agreed below, then raised on every rank
            error = e
        damaged = isinstance(error, CorruptCheckpointError)
        if error is not None and self._collective(cl.agree_or_retry, self.ctx, f"load of {rec.name}", error,
                                                  retry=damaged and damaged_too, timeout=self.timeout):
            if self.ctx.is_leader:
                assert isinstance(error, CorruptCheckpointError)
                self._damaged[rec.name] = error
            return None
        return loaded

    def _apply(self, mgr: ManagerView, rec: CheckpointRecord, obj: dict[str, Any]) -> CheckpointRecord:
        """Every rank applies ``obj``, the dict of ``rec`` (its own RNG states); all succeed or all raise."""
        ctx, path = self.ctx, str(rec.path)
        error: BaseException | None = None
        applied: CheckpointRecord | None = None
        trackables = split(mgr.trackables)[1] if schema.is_sharded(rec.name) else mgr.trackables
        try:
            schema.header(obj, path)
            meta = obj.get("ckpt")
            saved = (meta.get("rng_per_rank") if isinstance(meta, dict) else None) or obj.get("rng") or {}
            mine = cl.rng_for_rank(ctx, saved) if saved else None
            state.restore(trackables, obj, strict=mgr.options.strict, path=path, rng=mine)
            for tracked in mgr.trackables.values():
                if isinstance(tracked, ResumableSampler):
                    tracked._use_rng(mine)  # its saved RNG is rank 0's: take this rank's
            applied = restoring.applied(mgr, obj, rec)
        except Exception as e:  # noqa: BLE001 - every failure must reach the others
            error = e
        self._collective(cl.agree, ctx, f"load of {rec.name}", error, timeout=self.timeout)
        assert applied is not None
        return applied


def split(trackables: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(modules and optimizers, for DCP; everything else, saved in the plain entries)."""
    dcp: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for name, obj in trackables.items():
        inner = state.unwrap(obj)
        if isinstance(inner, (torch.nn.Module, torch.optim.Optimizer)):
            dcp[name] = inner
        else:
            plain[name] = obj
    return dcp, plain


def records_of(catalog: Catalog, entries: list[dict[str, Any]]) -> list[CheckpointRecord]:
    store = catalog.store
    return [record.from_json(e, store.where(e["file"]), catalog.extra_loader(e["file"])) for e in entries]
