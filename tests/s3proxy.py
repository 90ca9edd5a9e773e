"""An HTTP proxy in front of a local S3 server (moto) that injects S3's transient failures and
counts the requests by method: for the flaky-storage test and the request-count benchmark."""

from __future__ import annotations

import collections
import http.client
import http.server
import threading
from urllib.parse import urlparse


class FlakyProxy:
    """An HTTP proxy in front of the moto server that answers ``503 SlowDown`` to ``burst``
    consecutive requests from each request number in ``episodes`` on (a throttling episode), and
    drops the connection (no answer: a reset) of every ``drop``-th request; everything else goes
    through unchanged."""

    def __init__(self, target: str, *, episodes=(60,), burst: int = 6, drop: int = 37):
        t = urlparse(target)
        proxy = self
        self.count, self.failed, self.dropped = 0, 0, 0
        self.methods: collections.Counter = collections.Counter()  # (method, path has "/fingerprint/")
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        if n == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self):
                body = self._body()
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                    proxy.methods[(self.command, "/fingerprint/" in self.path)] += 1
                if n % drop == 0:
                    proxy.dropped += 1
                    self.close_connection = True
                    self.connection.shutdown(2)  # a reset: no answer at all
                    return
                if any(e <= n < e + burst for e in episodes):
                    proxy.failed += 1
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(t.hostname, t.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = r.getheader("Content-Length") if self.command == "HEAD" else None  # the object's
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
