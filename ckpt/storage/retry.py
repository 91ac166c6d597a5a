"""Retrying transient object-store errors with backoff, within a bounded total time.

A network hiccup, a throttled request or a 5xx must not fail a save that a second try
would complete; a server that stays away must fail it in bounded time with a clear
error, never hang the training loop. Only errors that a retry can cure count as
transient: connection failures and timeouts, HTTP 5xx and throttling (``SlowDown``,
``503``, which ``s3fs`` turns into ``EBUSY``/``EREMOTEIO``). A missing object, a
permission error or a bad request is raised at once.
"""

from __future__ import annotations

import errno
import random
import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: Total time one operation may spend retrying (each try is bounded by the client's timeouts).
DEFAULT_DEADLINE = 60.0
_FIRST_DELAY = 0.2
_MAX_DELAY = 5.0
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH,
                     getattr(errno, "EREMOTEIO", errno.EIO)}
#: Exception class names (botocore, aiohttp, urllib3, requests) that mean "the network", not the request.
_TRANSIENT_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
                    "ProtocolError", "ResponseStreamingError", "IncompleteReadError", "ConnectionError",
                    "ReadTimeout", "ConnectTimeout")


def transient(e: BaseException) -> bool:
    """Could trying again succeed? (Looks through the cause chain: s3fs wraps botocore.)"""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)):
            return False
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return True
        if isinstance(cur, OSError) and cur.errno in _TRANSIENT_ERRNOS:
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(cur).__mro__):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def call(fn: Callable[[], T], *, deadline: float = DEFAULT_DEADLINE) -> T:
    """``fn()``, tried again after transient errors with jittered exponential backoff
    until ``deadline`` seconds have passed; the last error is raised as it is."""
    start = time.monotonic()
    delay = _FIRST_DELAY
    while True:
        try:
            return fn()
        except Exception as e:
            left = deadline - (time.monotonic() - start)
            if not transient(e) or left <= 0:
                raise
            time.sleep(min(delay * (0.5 + random.random()), left))
            delay = min(delay * 2, _MAX_DELAY)
