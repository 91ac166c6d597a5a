"""The writer lease of a remote run directory (``.ckpt-writer``): one writer per run.

The lease is a small JSON object naming its holder (token, host, pid, process start,
``CKPT_WRITER_ID``, when it started and was last renewed, its time to live). It is
created with a conditional write (S3 ``If-None-Match: *``), so of two writers starting
together exactly one gets it; the holder renews it every quarter of its time to live
(``If-Match`` its own version: a renewal that fails means the lease was taken over,
and that writer stops at its next commit). A second writer is refused with
:class:`~ckpt.errors.WriterConflictError`, unless the holder is provably gone:

- its lease expired (not renewed for ``ttl`` seconds, by the server's clock on S3);
- it ran on this machine (same host and boot) and that process no longer exists;
- it carries the same ``CKPT_WRITER_ID`` (a job restarted under the same identity).

A writer that finds a lease which is neither waits, at most until that lease would
expire, watching it: renewed meanwhile, the holder is alive and the writer is refused;
not renewed, the holder died (a job SIGKILLed on another machine) and the writer takes
over. A job restarted at once is never locked out: on the same machine at once, on
another within ``ttl`` (60 s by default). A clean ``close()`` deletes the lease. A tool
(``ckpt prune``) never waits and never takes over a live lease. See
docs/explanation/remote-runs.md.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Dict, Optional

from ..errors import WriterConflictError
from .conditional import Objects, Precondition, Version

WRITER_NAME = ".ckpt-writer"
#: How long a lease lives without renewal (``storage_options["ckpt_lease_seconds"]``).
DEFAULT_TTL = 60.0
#: ``CKPT_WRITER_ID``: a job's identity across restarts (its scheduler's job id, say).
WRITER_ID_ENV = "CKPT_WRITER_ID"
_POLL = 1.0


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` (clock ticks since boot, Linux), None if unknown;
    "" for a process that no longer runs (absent, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return ""
    except (OSError, IndexError):
        return None
    return "" if fields[0] in ("Z", "X") else fields[19]


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its object says."""

    token: str
    writer_id: Optional[str]
    host: str
    boot: Optional[str]
    pid: int
    pstart: Optional[str]
    started: float
    renewed: float
    ttl: float
    tool: bool

    @classmethod
    def parse(cls, data: bytes) -> Optional[Holder]:
        try:
            d = json.loads(data.decode("utf-8"))
            return cls(str(d["token"]), d.get("writer_id"), str(d.get("host", "?")), d.get("boot"),
                       int(d.get("pid", -1)), d.get("pstart"), float(d.get("started", 0.0)),
                       float(d.get("renewed", 0.0)), float(d.get("ttl", DEFAULT_TTL)), bool(d.get("tool", False)))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            return None  # an older ckpt's claim (a bare token) or junk: taken as an expired lease

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def describe(self) -> str:
        kind = "ckpt tool" if self.tool else "writer"
        when = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        who = f", {WRITER_ID_ENV}={self.writer_id}" if self.writer_id else ""
        return f"{kind} pid {self.pid} on {self.host}{who}, started {when}"

    def gone(self, me: Holder) -> bool:
        """Provably no longer running: on this machine (same host and boot), its process is gone."""
        if self.host != me.host or self.boot is None or self.boot != me.boot:
            return False
        now = _process_start(self.pid)
        return now == "" or (now is not None and self.pstart is not None and now != self.pstart)


class Lease:
    """This process's lease on one run directory (see the module docstring)."""

    def __init__(self, objects: Objects, key: str, url: str, *, ttl: float = DEFAULT_TTL,
                 writer_id: Optional[str] = None, tool: bool = False,
                 on_acquire: Optional[Callable[[], object]] = None,
                 guard: Optional[Callable[[Callable[[], Any]], Any]] = None) -> None:
        #: Runs each request (the store's retries and errors naming the URL).
        self._do: Callable[[Callable[[], Any]], Any] = guard if guard is not None else (lambda fn: fn())
        self.objects, self.key, self.url, self.ttl, self.tool = objects, key, url, ttl, tool
        self.writer_id = writer_id if writer_id is not None else (os.environ.get(WRITER_ID_ENV) or None)
        self.on_acquire = on_acquire
        #: Guards the fields below; never held across a request (a renewal stuck on a frozen
        #: endpoint must not stall a commit's check, or ``held``): requests run outside it.
        self._lock = threading.Condition(threading.Lock())
        self._acquiring = threading.Lock()  # one acquisition at a time (its requests run under it)
        self._renewing = False  # a renewal's request is in flight
        self._tag: Optional[str] = None  # our version of the object while we hold it
        self._me: Optional[Holder] = None
        self._renewed_at = 0.0  # monotonic time of the last successful renewal
        self.lost: Optional[str] = None  # who took it over (the lease is no longer ours)
        self.epoch = 0  # bumped at each acquisition: what was known under an older one is stale
        self._stop: Optional[threading.Event] = None

    @property
    def held(self) -> bool:
        return self._tag is not None and self.lost is None

    def _holder(self) -> Holder:
        now = time.time()
        pid = os.getpid()
        return Holder(secrets.token_hex(8), self.writer_id, socket.gethostname(), _boot_id(), pid,
                      _process_start(pid) or None, now, now, self.ttl, self.tool)

    # -- acquiring -------------------------------------------------------------------

    def acquire(self, wait: bool) -> None:
        """Hold the lease, or raise :class:`WriterConflictError` naming its holder. ``wait``:
        watch a live-looking lease until it would expire (a writer's first commit)."""
        with self._acquiring:
            with self._lock:
                if self.held:
                    return
                if self.lost is not None:
                    raise self.taken()  # never taken back: this process stops writing
            me = self._holder()
            tag = self._take(me, wait)
            with self._lock:
                self._tag, self._me, self.lost = tag, me, None
                self._renewed_at = time.monotonic()
                self.epoch += 1
                self._start_heartbeat()
        if self.on_acquire is not None and not self.tool:
            self.on_acquire()

    def _take(self, me: Holder, wait: bool) -> str:
        """Create the lease as ``me``, or take it over from a holder that is gone; its tag."""
        watched: Optional[Version] = None
        deadline: Optional[float] = None
        while True:
            try:
                return str(self._do(lambda: self.objects.create(self.key, me.encode())))
            except Precondition:
                pass
            now = self._do(lambda: self.objects.read(self.key))
            if now is None:
                continue  # released meanwhile: try again
            other = Holder.parse(now.data)
            if self._may_take(other, now, me):
                try:
                    return str(self._do(partial(self.objects.replace, self.key, me.encode(), now.tag)))
                except Precondition:
                    continue  # someone else was quicker: look again
            assert other is not None
            if watched is not None and now.tag != watched.tag:
                raise self.conflict(other, "it renewed its lease while this process waited")
            left = self.ttl - (self._age(other, now) or 0.0)
            if not wait or self.tool:
                raise self.conflict(other, f"its lease expires in {max(left, 0):.0f} s unless renewed")
            if watched is None:
                watched, deadline = now, time.monotonic() + min(left, self.ttl) + 2 * _POLL
                import warnings
                warnings.warn(f"{self.url}: the run is held by {other.describe()}; waiting up to "
                              f"{max(left, 0):.0f} s for its lease to expire (a writer that died) or to be "
                              "renewed (a live writer: then this one is refused)", stacklevel=5)
            assert deadline is not None
            if time.monotonic() > deadline:
                raise self.conflict(other, "its lease did not expire")  # a server clock gone wrong
            time.sleep(_POLL)

    def _age(self, other: Holder, version: Version) -> Optional[float]:
        if version.age is not None:
            return version.age
        return max(0.0, time.time() - other.renewed)

    def _may_take(self, other: Optional[Holder], version: Version, me: Holder) -> bool:
        if other is None:
            return True  # not a lease ckpt writes (an older claim): nobody renews it
        if other.token == me.token:
            return True
        age = self._age(other, version)
        if age is not None and age > other.ttl:
            return True  # expired: its holder stopped renewing it
        if other.gone(me):
            return True  # it ran here, and that process is gone (killed and restarted at once)
        return (not self.tool and not other.tool and me.writer_id is not None
                and other.writer_id == me.writer_id)  # the same job, restarted

    def conflict(self, other: Optional[Holder], why: str) -> WriterConflictError:
        who = other.describe() if other is not None else "another writer"
        return WriterConflictError(
            f"a writer holds this run directory: {who} ({why}); this process did not write", path=self.url,
            hint="stop that process (a clean close() frees the run at once), or wait: a writer that died frees "
                 f"it {self.ttl:.0f} s after its last renewal (storage_options['ckpt_lease_seconds']); a job "
                 f"restarted on the same machine, or with the same {WRITER_ID_ENV}, takes over at once; "
                 "or give this run its own prefix")

    # -- holding ---------------------------------------------------------------------

    def check(self) -> None:
        """At a commit: raise if the lease was taken over; renew it when a quarter of
        its time to live has passed (one request; none for frequent saves, none while the
        heartbeat's renewal is in flight)."""
        with self._lock:
            if self.lost is not None:
                raise self.taken()
            due = time.monotonic() - self._renewed_at >= self.ttl / 4 and not self._renewing
        if due:
            self.renew()
        if self.lost is not None:
            raise self.taken()

    def taken(self) -> WriterConflictError:
        return WriterConflictError(
            f"another writer has taken over this run directory ({self.lost}); this process stops writing",
            path=self.url, hint="one writer per run directory: stop the other process, or give each run its own "
                                f"prefix (a takeover happens when this writer's lease was not renewed for "
                                f"{self.ttl:.0f} s, or by a job with the same {WRITER_ID_ENV})")

    def renew(self) -> None:
        """Renew the lease (the heartbeat and :meth:`check`); a lost lease sets ``lost``.
        The request runs outside the lock: meanwhile :attr:`held`, :meth:`check` and a
        commit go on (one renewal at a time; a second caller returns at once)."""
        with self._lock:
            if self._tag is None or self._me is None or self.lost is not None or self._renewing:
                return
            self._renewing = True
            tag, me = self._tag, Holder(**{**self._me.__dict__, "renewed": time.time()})
        try:
            try:
                new: Optional[str] = self._do(lambda: self.objects.replace(self.key, me.encode(), tag))
                lost = None
            except Precondition:
                now = self._do(lambda: self.objects.read(self.key))
                other = Holder.parse(now.data) if now is not None else None
                new, lost = None, other.describe() if other is not None else "its lease was deleted"
            with self._lock:
                if self._tag == tag and new is not None:
                    self._tag, self._renewed_at = new, time.monotonic()
                elif self._tag == tag:
                    self.lost = lost
                    self._stop_heartbeat()
        finally:
            with self._lock:
                self._renewing = False
                self._lock.notify_all()

    def release(self) -> None:
        """Delete the lease if this process holds it (a clean close); best effort. Waits
        for a renewal in flight (its new version is the one to delete)."""
        with self._lock:
            self._stop_heartbeat()
            while self._renewing:
                self._lock.wait()
            tag, self._tag = self._tag, None
            lost = self.lost
        if tag is not None and lost is None:
            try:
                self._do(lambda: self.objects.delete(self.key, tag))
            except Exception:  # noqa: BLE001 - taken over, gone or a client error: it expires anyway
                pass

    def _start_heartbeat(self) -> None:
        self._stop = stop = threading.Event()
        ref = weakref.ref(self)
        period = self.ttl / 4
        threading.Thread(target=_heartbeat, args=(ref, stop, period), name="ckpt-lease", daemon=True).start()

    def _stop_heartbeat(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None


def _heartbeat(ref: weakref.ref[Lease], stop: threading.Event, period: float) -> None:
    """Renew the lease every ``period`` seconds until released (or its owner is gone)."""
    while not stop.wait(period):
        lease = ref()
        if lease is None:
            return
        try:
            lease.renew()
        except Exception:  # noqa: BLE001 - the network: the next renewal (or commit) tries again
            pass
        del lease


def options(storage_options: Dict[str, Any]) -> Dict[str, Any]:
    """ckpt's lease keys popped from ``storage_options`` (fsspec never sees them)."""
    from ..errors import ConfigError
    ttl = storage_options.pop("ckpt_lease_seconds", DEFAULT_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ConfigError(f"storage_options['ckpt_lease_seconds'] must be a positive number of seconds, got {ttl!r}",
                          hint="pass ckpt_lease_seconds=60 (the default)")
    writer_id = storage_options.pop("ckpt_writer_id", None)
    if writer_id is not None and not isinstance(writer_id, str):
        raise ConfigError(f"storage_options['ckpt_writer_id'] must be a string, got {writer_id!r}",
                          hint=f"pass the job's identity, e.g. its scheduler job id (or set {WRITER_ID_ENV})")
    return {"ttl": float(ttl), "writer_id": writer_id}
