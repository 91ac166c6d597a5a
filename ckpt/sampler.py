"""Resumable data order: a sampler whose place in the epoch is part of the checkpoint.

A plain ``DataLoader`` forgets where it was: a run resumed in the middle of an epoch
either replays the epoch from its first batch or skips to the next one.
:class:`ResumableSampler` shuffles each epoch from ``seed + epoch`` (no global RNG),
counts the samples it hands to the loader, and saves ``(epoch, position)``; after a
restore it yields only the rest of the interrupted epoch, in the same order, without
loading the skipped samples. Track it like any other object::

    sampler = ResumableSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)
    mgr = CheckpointManager("runs/exp1", model=model, optimizer=opt, sampler=sampler)
    for epoch in range(mgr.resume(), epochs):
        sampler.set_epoch(epoch)        # continues the interrupted epoch after resume()
        for batch in loader:
            ...

Under DDP pass nothing more: ``num_replicas`` and ``rank`` default from the process
group, and each rank serves its share of the epoch's permutation, like
``DistributedSampler`` (padded by repeating the first indices so that every rank gets
the same count, or with ``drop_last=True`` cut to a multiple of ``num_replicas``);
``len(sampler)`` and ``position`` count this rank's samples.

Counting is exact for ``num_workers=0``; worker processes prefetch batches the loop has
not trained on yet (see the README for what to use instead).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sized, Tuple, Union

import torch

from . import state
from .errors import ConfigError


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Per-epoch shuffled (or sequential) indices whose epoch and position are checkpointed.

    ``position`` is the number of samples of the current epoch already handed to the
    loader; ``remaining`` is what is left. Call :meth:`set_epoch` at the start of every
    epoch: right after a restore it continues the saved epoch, otherwise it starts the
    given epoch from its first sample.
    """

    def __init__(self, data_source: Union[Sized, int], *, shuffle: bool = True, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, drop_last: bool = False) -> None:
        try:
            length = data_source if isinstance(data_source, int) else len(data_source)
        except TypeError:
            length = -1  # no len(): an iterable-style dataset has no indices to sample
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ConfigError(f"ResumableSampler needs a sized dataset or a sample count, "
                              f"got {data_source!r}",
                              hint="pass the (map-style) dataset itself, or len(dataset)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}", hint="pass seed=0, for example")
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.drop_last = bool(drop_last)
        self.length = length
        self.num_samples = _share(length, self.num_replicas, self.drop_last)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._start = 0           # where a new iterator starts: 0, or the restored position
        self._restored = False    # state came from load_state_dict(); the epoch not finished since
        self._resume_rng: Optional[Dict[str, Any]] = None
        self._generation = 0      # bumped by set_epoch()/load_state_dict(): older iterators are stale

    def __len__(self) -> int:
        """This rank's samples in a whole epoch (what schedulers and progress bars expect)."""
        return self.num_samples

    @property
    def remaining(self) -> int:
        """Samples of the current epoch not yet handed to the loader."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        """Prepare epoch ``epoch``: continue it if it is the restored, interrupted epoch
        (every iterator until that epoch's rest has been served once), otherwise every
        iterator starts it from its first sample."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"set_epoch() needs a non-negative int, got {epoch!r}",
                              hint="call sampler.set_epoch(epoch) with the loop's epoch counter")
        if not (self._restored and epoch == self.epoch):
            self.epoch, self.position, self._start = epoch, 0, 0
            self._restored, self._resume_rng = False, None
        self._generation += 1

    def order(self, epoch: Optional[int] = None) -> List[int]:
        """Every index of ``epoch`` (default: the current one), in the order it is served."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            order = list(range(self.length))
        else:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        if self.num_replicas == 1:
            return order
        total = self.num_samples * self.num_replicas
        if total > len(order) and order:  # pad by repeating from the start, as DistributedSampler does
            order = (order * -(-total // len(order)))[:total]
        return order[:total][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # Like torch's samplers, every new iterator serves the epoch from its first sample
        # (a peek such as ``next(iter(loader))`` before or after set_epoch() skips nothing);
        # only while a restored epoch's rest has not been served once does it start there.
        return self._serve(self.order(), self._start, self._generation)

    def _serve(self, order: List[int], start: int, generation: int) -> Iterator[int]:
        # Runs on the first index request, i.e. after the DataLoader iterator has drawn
        # its base seed from torch's RNG: re-applying the checkpoint's RNG undoes that
        # draw (and any other draw since resume()), as the interrupted run made it before
        # saving. Each pass over the restored rest re-applies it (a peek's draws are undone).
        if self._resume_rng is not None:
            state.restore_rng(self._resume_rng)
        self.position = start
        for i in range(start, len(order)):
            self.position = i + 1  # counted when handed out: exact with num_workers=0
            yield order[i]
        if generation == self._generation:  # the restored rest has been served: done with it
            self._start, self._restored, self._resume_rng = 0, False, None

    def state_dict(self) -> Dict[str, Any]:
        """Epoch, position, configuration, and the RNG states when inside an epoch."""
        saved = {"epoch": self.epoch, "position": self.position, "length": self.length,
                 "seed": self.seed, "shuffle": self.shuffle,
                 "rng": state.capture_rng() if self.position > 0 else None}
        if self.num_replicas > 1:
            saved.update(num_replicas=self.num_replicas, drop_last=self.drop_last)
        return saved

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore the saved place; the next :meth:`set_epoch` decides whether to continue.

        A dict that is not one :meth:`state_dict` wrote, or one saved by a sampler
        configured otherwise, raises :class:`ConfigError` (a ``ValueError``, as before)
        and changes nothing; the manager reports it as a ``StateMismatchError``.
        """
        epoch, position, replicas, drop_last = _parsed(saved)
        for key, mine in (("length", self.length), ("seed", self.seed), ("shuffle", self.shuffle)):
            if saved[key] != mine:
                raise ConfigError(f"the checkpoint's sampler has {key}={saved[key]!r}, this one "
                                         f"{key}={mine!r}; the remaining order would differ",
                                         hint=f"build the ResumableSampler with {key}={saved[key]!r}")
        saved_share = _share(self.length, replicas, drop_last)  # the position counts the saving rank's share
        if position > saved_share:
            raise ConfigError(f"saved position {position} is outside 0..{saved_share}",
                                     hint="the state was saved by a sampler over another dataset")
        if (replicas, drop_last) != (self.num_replicas, self.drop_last):
            if 0 < position < saved_share:
                raise ConfigError(
                    f"the checkpoint was saved part-way through an epoch by {replicas} replicas; this sampler "
                    f"has num_replicas={self.num_replicas}: the rest of the epoch would differ",
                    hint="resume mid-epoch at the same world size, or from an end-of-epoch checkpoint")
            position = self.num_samples if position else 0  # the epoch served whole (or not begun), in this split
        self.epoch, self.position = epoch, position
        self._start, self._resume_rng, self._restored = position, saved.get("rng"), True
        self._generation += 1

    def _use_rng(self, rng: Optional[Dict[str, Any]]) -> None:
        """Under a process group: continue with this rank's RNG states (the saved sampler
        state holds rank 0's), or, with none saved for this rank, with its own."""
        if self._resume_rng is not None:
            self._resume_rng = rng

    def __repr__(self) -> str:
        return (f"ResumableSampler(length={self.length}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, position={self.position})")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Each entry of a sampler's state dict: what it must be, and the check (the last three
#: are absent from older or single-replica states).
_ENTRIES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "epoch": ("a non-negative int", lambda v: _int(v) and v >= 0),
    "position": ("a non-negative int", lambda v: _int(v) and v >= 0),
    "length": ("a non-negative int", lambda v: _int(v) and v >= 0),
    "seed": ("an int", _int),
    "shuffle": ("True or False", lambda v: isinstance(v, bool)),
    "rng": ("a dict of RNG states or None", lambda v: v is None or isinstance(v, Mapping)),
    "num_replicas": ("a positive int", lambda v: _int(v) and v >= 1),
    "drop_last": ("True or False", lambda v: isinstance(v, bool)),
}
_OPTIONAL = ("rng", "num_replicas", "drop_last")


def _parsed(saved: Any) -> Tuple[int, int, int, bool]:
    """(epoch, position, num_replicas, drop_last) of a dict :meth:`ResumableSampler.state_dict`
    wrote; :class:`ConfigError` naming the first entry that is missing or wrong."""
    hint = "pass what ResumableSampler.state_dict() returned"
    if not isinstance(saved, Mapping):
        raise ConfigError(f"a sampler state must be a dict, got {type(saved).__name__}", hint=hint)
    for key, (expected, fits) in _ENTRIES.items():
        if key not in saved and key not in _OPTIONAL:
            raise ConfigError(f"the sampler state has no {key!r} (expected {expected})", hint=hint)
        if key in saved and not fits(saved[key]):
            raise ConfigError(f"the sampler state's {key!r} is {saved[key]!r}; expected {expected}",
                                     hint=hint)
    return saved["epoch"], saved["position"], saved.get("num_replicas", 1), saved.get("drop_last", False)


def inside_epoch(trackables: Mapping[str, Any]) -> List[str]:
    """Names of tracked samplers part-way through an epoch (samples handed out and left)."""
    return [name for name, obj in trackables.items()
            if isinstance(obj, ResumableSampler) and 0 < obj.position < obj.num_samples]


def _share(length: int, replicas: int, drop_last: bool) -> int:
    """One replica's samples per epoch (as DistributedSampler splits ``length``)."""
    if replicas == 1:
        return length
    return length // replicas if drop_last else -(-length // replicas)


def _replicas(num_replicas: Optional[int], rank: Optional[int]) -> Tuple[int, int]:
    """(num_replicas, rank), each defaulting from the default process group (1 and 0 without one)."""
    dist = sys.modules.get("torch.distributed")
    grouped = dist is not None and dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if grouped else 1  # type: ignore[union-attr]
    if rank is None:
        rank = dist.get_rank() if grouped else 0  # type: ignore[union-attr]
    for name, value in (("num_replicas", num_replicas), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an int, got {value!r}", hint="leave it out under torchrun")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ConfigError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}",
                          hint="leave both out under torchrun: they default from the process group")
    return num_replicas, rank
