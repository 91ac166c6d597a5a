"""Every S3 request ckpt sends is bounded by ``storage_options["ckpt_request_seconds"]``,
not only uploads (a listing, a GET), and no lock is held across a request: a renewal of
the writer lease stuck on a frozen endpoint does not stall the committing thread's
check. A real moto server in its own process, frozen with SIGSTOP (its own server: the
shared one stays up); client timeouts set far above the limit, so only the limit can end
a request. Every thread has a deadline; nothing asserts timing."""

from __future__ import annotations

import secrets
import threading
from typing import Any, Callable, Iterator, List

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt.errors import StorageError  # noqa: E402
from ckpt.storage.remote import FsspecStore  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402

#: Client timeouts far above the per-request limit: before the fix a frozen GET or
#: listing waited for these (about 10 minutes), not for ckpt_request_seconds.
SLOW_CLIENT = {"connect_timeout": 5, "read_timeout": 600, "retries": {"max_attempts": 1}}
DEADLINE = 60.0  # a bounded request ends well within this


@pytest.fixture
def frozen_server() -> Iterator[MotoServer]:
    srv = MotoServer()
    try:
        yield srv
    finally:
        srv.stop()


def _store(srv: MotoServer, **extra: Any) -> FsspecStore:
    import s3fs
    bucket = f"b{secrets.token_hex(4)}"
    s3fs.S3FileSystem(**srv.options()).mkdir(bucket)
    opts = dict(srv.options(config_kwargs=SLOW_CLIENT), ckpt_retry_seconds=0, **extra)
    store = FsspecStore(f"s3://{bucket}/run", opts)
    store.write("ckpt-e000000-s000000000.pt", lambda f: f.write(b"committed"))
    return store


def _in_thread(fn: Callable[[], Any], deadline: float = DEADLINE) -> List[Any]:
    """Run ``fn`` in a daemon thread; its outcome (value or exception), [] if still running."""
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test looks at
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=deadline)
    return out


@pytest.mark.parametrize("what", ["listing", "GET"])
def test_a_listing_and_a_get_on_a_frozen_endpoint_end_within_the_request_limit(frozen_server: MotoServer,
                                                                               what: str) -> None:
    store = _store(frozen_server, ckpt_request_seconds=2)
    call = (lambda: store.list()) if what == "listing" else (lambda: store.read_bytes("ckpt-e000000-s000000000.pt"))
    frozen_server.pause()
    try:
        out = _in_thread(call)
    finally:
        frozen_server.resume()
    assert out, f"the {what} hung past {DEADLINE:.0f} s on a frozen endpoint"
    assert isinstance(out[0], StorageError) and store.url in str(out[0]), out
    assert "unreachable" in str(out[0])
    assert store.read_bytes("ckpt-e000000-s000000000.pt") == b"committed"  # the server answers again


def test_a_renewal_stuck_on_a_frozen_endpoint_does_not_block_the_commit_check(frozen_server: MotoServer) -> None:
    store = _store(frozen_server, ckpt_request_seconds=30, ckpt_lease_seconds=600)
    lease = store.lease
    lease.acquire(wait=False)
    frozen_server.pause()
    try:
        renewal = threading.Thread(target=lease.renew, daemon=True)  # as the heartbeat does
        renewal.start()
        while renewal.is_alive() and not getattr(lease, "_renewing", True):  # (old code: a brief wait)  # type: ignore[attr-defined]
            renewal.join(timeout=0.01)
        # a commit's check, meanwhile: well before the renewal's request gives up (30 s)
        out = _in_thread(lambda: (lease.check(), lease.held), deadline=10)
        assert out, "the commit's check waited for the renewal's request (a lock held across it)"
        assert out[0] == (None, True)
    finally:
        frozen_server.resume()
    renewal.join(timeout=DEADLINE)
    assert not renewal.is_alive()
    lease.release()
