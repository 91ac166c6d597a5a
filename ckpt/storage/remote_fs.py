"""The fsspec side of a remote run directory: opening the filesystem for a URL, object
locations shown as URLs, and one fix to the S3 client (uploads never wait forever)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Mapping, Optional, Tuple

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


def never_wait_for_continue(fs: Any) -> None:
    """Drop ``Expect: 100-continue`` from S3 uploads: aiohttp waits for the server's
    "100 Continue" with no timeout at all, so an upload to an endpoint that stopped
    answering (SIGSTOPped, a dead load balancer) hung forever, past every client timeout."""
    events = getattr(getattr(getattr(fs, "s3", None), "meta", None), "events", None)
    if events is not None:
        events.register("before-send.s3", _drop_expect, unique_id="ckpt-drop-expect")


def _drop_expect(request: Any, **_: Any) -> None:
    if "Expect" in request.headers:
        del request.headers["Expect"]
