"""A slow-drip S3 endpoint for the tests: a tiny HTTP proxy in its own process in front of
a real S3 server (moto), forwarding every request, but sending the body of each GET of
an object whose key ends with ``suffix`` one byte at a time, ``gap`` seconds apart: the
headers come at once and every socket read gets a byte before the client's
``read_timeout``, so only a bound on the whole request can end it.

    python tests/dripserver.py PORT UPSTREAM SUFFIX GAP
"""

from __future__ import annotations

import http.client
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}


def handler(upstream: str, suffix: str, gap: float) -> type[BaseHTTPRequestHandler]:
    target = urllib.parse.urlsplit(upstream)

    class Drip(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(size) if size else None
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))  # a HEAD: the object's size
            self.end_headers()
            path = urllib.parse.urlsplit(self.path)
            slow = self.command == "GET" and not path.query and path.path.endswith(suffix)
            if not slow:
                self.wfile.write(data)
                return
            for i in range(len(data)):  # a byte now and then: each read is answered in time
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(gap)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args: object) -> None:
            pass

    return Drip


def main() -> None:
    port, upstream, suffix, gap = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    server = ThreadingHTTPServer(("127.0.0.1", port), handler(upstream, suffix, gap))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
