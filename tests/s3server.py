"""A real S3-compatible server for the tests: moto's server mode in its own process.

A separate process, so that a client killed by a test does not take it down, and so
that a test can pause it (SIGSTOP) to play a server that went away, then resume it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Dict, Optional

_STARTUP_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, polled until it answers."""

    def __init__(self, env: Optional[Dict[str, str]] = None, port: Optional[int] = None) -> None:
        self.port = port or free_port()  # a port of a stopped server: its restart (moto keeps nothing)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=dict(os.environ, **(env or {})),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _STARTUP_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)

    def options(self, **extra: Any) -> Dict[str, Any]:
        """storage_options for s3fs: fake credentials, this endpoint, short client timeouts."""
        opts: Dict[str, Any] = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                                "client_kwargs": {"endpoint_url": self.endpoint},
                                "config_kwargs": {"connect_timeout": 2, "read_timeout": 2,
                                                  "retries": {"max_attempts": 1}}}
        opts.update(extra)
        return opts

    def aws_env(self) -> Dict[str, str]:
        """The environment variables that point boto/s3fs (a child, the CLI) at this server."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
