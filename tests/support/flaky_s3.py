"""S3 for tests: moto's server mode behind a proxy that injects S3's transient 503 errors.

moto is a test double for S3 (named as such in the README); boto3 talks to it over real HTTP, so
the code under test uses its real client, retry configuration and pagination.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from tests.helpers import free_port


class FlakyProxy(ThreadingHTTPServer):
    """Forwards to moto's server, answering every third request with S3's 503 SlowDown first."""

    def __init__(self, upstream: str):
        self.upstream, self.count, self.injected, self.list_pages = upstream, 0, 0, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), self._handler())

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                with proxy.lock:
                    proxy.count += 1
                    fail = proxy.count % 3 == 0
                    proxy.injected += fail
                if fail:
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                proxy.list_pages += "list-type=2" in self.path
                length = int(self.headers.get("Content-Length") or 0)
                resp = requests.request(self.command, proxy.upstream + self.path, data=self.rfile.read(length),
                                        headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                                        timeout=30)
                self.send_response(resp.status_code)
                for key, value in resp.headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        return Handler
