"""The fsspec side of a remote run directory: opening the filesystem for a URL, object
locations shown as URLs, and one fix to the S3 client (uploads never wait forever)."""

from __future__ import annotations

from contextlib import suppress
from pathlib import PurePosixPath
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import ConfigError


class ObjectPath(PurePosixPath):
    """The location of an object, shown as its URL (``s3://bucket/run/ckpt-...pt``).

    A pure path (``.name``, ``.parent`` and ``/`` work; nothing touches a local disk):
    ``CheckpointRecord.path`` of a remote checkpoint is one of these.
    """

    def __str__(self) -> str:
        parts = self.parts
        if parts and parts[0].endswith(":"):
            return parts[0] + "//" + "/".join(parts[1:])
        return super().__str__()

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"


def filesystem(url: str, storage_options: Optional[Mapping[str, Any]]) -> Tuple[Any, str]:
    """``(fsspec filesystem, root path)`` for ``url``; a missing backend is a ConfigError."""
    try:
        import fsspec
    except ImportError as e:
        raise ConfigError(f"{url}: remote run directories need fsspec",
                          hint="pip install 'ckpt[s3]' (fsspec and s3fs; gcsfs/adlfs for gs:// and az://)") from e
    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:
        raise ConfigError(f"{url}: no fsspec backend for this URL ({e})",
                          hint="pip install 'ckpt[s3]' for s3://, gcsfs for gs://, adlfs for az://") from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{url}: invalid storage_options ({e})",
                          hint="pass the options of the fsspec filesystem, e.g. "
                               "{'key': ..., 'secret': ..., 'client_kwargs': {'endpoint_url': ...}}") from e
    return fs, str(root).rstrip("/")


#: ckpt's key in ``storage_options``: the longest one S3 request may take, in seconds.
REQUEST_OPTION = "ckpt_request_seconds"
DEFAULT_REQUEST_LIMIT = 300.0


def request_limit(options: Dict[str, Any]) -> float:
    """The per-request limit popped from ``storage_options`` (fsspec never sees it)."""
    value = options.pop(REQUEST_OPTION, DEFAULT_REQUEST_LIMIT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"storage_options[{REQUEST_OPTION!r}] must be a positive number of seconds, got {value!r}",
                          hint=f"pass {REQUEST_OPTION}={DEFAULT_REQUEST_LIMIT:.0f} (the default: a 5 MiB part "
                               "at 17 kB/s)")
    return float(value)


class RequestLimitError(OSError):
    """One S3 request (its body included) ran past ``ckpt_request_seconds``. An ``OSError``
    with ``errno.ETIMEDOUT`` (transient for ckpt's retries) but not a :class:`TimeoutError`:
    s3fs retries those itself, each try with a fresh limit, which would multiply the bound."""

    def __init__(self, message: str) -> None:
        import errno
        super().__init__(errno.ETIMEDOUT, f"{message} (storage_options[{REQUEST_OPTION!r}])")


def never_wait_for_continue(fs: Any, limit: float = DEFAULT_REQUEST_LIMIT) -> None:
    """Make every S3 request end in bounded time. Two ways an upload to an endpoint that
    stopped answering (SIGSTOPped, a dead load balancer) hung forever, past every
    client timeout: botocore's ``Expect: 100-continue``, which aiohttp waits for with no
    timeout (the header is dropped), and a part's body that no longer drains into the
    socket (aiohttp has no write timeout). So each request s3fs sends (``_call_s3``: an
    upload's parts, a listing, a GET, a HEAD, a DELETE, the lease's conditional PUTs) is
    given ``limit`` seconds, then cancelled: a :class:`RequestLimitError`, transient, that the
    store's retries and deadline handle. A GET's body, read after its headers came, is
    bounded by the same ``limit`` in total, counted from the request's start
    (:class:`BoundedBody`): the client's ``read_timeout`` bounds each socket read only,
    so a server that drips a byte now and then would hold a resume for ever."""
    events = getattr(getattr(getattr(fs, "s3", None), "meta", None), "events", None)
    if events is None:
        return
    events.register("before-send.s3", _drop_expect, unique_id="ckpt-drop-expect")
    inner = getattr(fs, "_call_s3", None)
    if inner is None or getattr(inner, "ckpt_bounded", False):
        return
    import asyncio

    from fsspec.asyn import sync

    async def bounded(method: Any, *args: Any, **kwargs: Any) -> Any:
        what = getattr(method, "__name__", method)
        end = asyncio.get_running_loop().time() + limit
        try:
            out = await asyncio.wait_for(inner(method, *args, **kwargs), limit)
        except asyncio.TimeoutError:
            raise RequestLimitError(f"no answer to {what} within {limit:g} s") from None
        if isinstance(out, dict) and hasattr(out.get("Body"), "read"):
            out["Body"] = BoundedBody(out["Body"], end, f"{what} (its body)", limit)
        return out

    bounded.ckpt_bounded = True  # type: ignore[attr-defined]
    fs._call_s3 = bounded  # every s3fs method awaits this one: listings, GETs, uploads

    def call_s3(method: Any, *args: Any, **kwargs: Any) -> Any:
        return sync(fs.loop, bounded, method, *args, **kwargs)

    fs.call_s3 = call_s3


class BoundedBody:
    """A GET's streaming body whose reads all end by ``end`` (the event loop's clock):
    past it, a :class:`RequestLimitError` (transient: retried within the store's deadline).
    Everything else is the wrapped body's."""

    def __init__(self, body: Any, end: float, what: str, limit: float) -> None:
        self._body, self._end, self._what, self._limit = body, end, what, limit

    async def read(self, *args: Any, **kwargs: Any) -> Any:
        import asyncio
        left = self._end - asyncio.get_running_loop().time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._body.read(*args, **kwargs), left)
        except asyncio.TimeoutError:
            self.close()
            raise RequestLimitError(f"{self._what} did not arrive within {self._limit:g} s") from None

    def close(self) -> None:
        with suppress(Exception):
            self._body.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)

    async def __aenter__(self) -> BoundedBody:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


def _drop_expect(request: Any, **_: Any) -> None:
    if "Expect" in request.headers:
        del request.headers["Expect"]


_CLIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs",
                    "fsspec", "google", "azure"}


def from_client(e: BaseException) -> bool:
    """Raised by the storage client libraries (not by the code producing the bytes)."""
    return type(e).__module__.split(".")[0] in _CLIENT_PACKAGES


def abandon(f: Any) -> None:
    """Throw away a failed upload: abort the multipart upload and make sure neither
    ``close()`` nor garbage collection completes it with partial data."""
    with suppress(Exception):
        f.discard()
    with suppress(Exception):
        f.closed = True
