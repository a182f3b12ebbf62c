"""S3 for tests: moto's server mode behind a proxy that injects S3's transient 503 errors.

moto is a test double for S3 (named as such in the README); boto3 talks to it over real HTTP, so
the code under test uses its real client, retry configuration and pagination.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from tests.helpers import free_port

# S3's transient errors, as boto3's standard retry mode tells them apart: throttling (SlowDown) is backed off
# at a 1 s scale, the others at 50 ms. One injected error in four is throttling, so both paths run without
# the suite spending its minutes in throttling back-off.
TRANSIENT_ERRORS = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "ServiceUnavailable", "Service is unable to handle request."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
)


class FlakyProxy(ThreadingHTTPServer):
    """Forwards to moto's server, answering every third request with one of S3's transient errors first."""

    def __init__(self, upstream: str):
        self.upstream, self.count, self.injected, self.list_pages = upstream, 0, 0, 0
        self.injected_codes: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), self._handler())

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1, so that boto3's "Expect: 100-continue" on uploads is answered at once (an HTTP/1.0 server
            # leaves the client waiting a second for it on every PUT); one request per connection keeps it simple.
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _respond(self, status: int, headers: dict[str, str], body: bytes):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _forward(self):
                payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.count += 1
                    fail = proxy.count % 3 == 0
                    if fail:
                        status, code, message = TRANSIENT_ERRORS[proxy.injected % len(TRANSIENT_ERRORS)]
                        proxy.injected += 1
                        proxy.injected_codes[code] = proxy.injected_codes.get(code, 0) + 1
                if fail:
                    self._respond(status, {}, f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode())
                    return
                proxy.list_pages += "list-type=2" in self.path
                resp = requests.request(self.command, proxy.upstream + self.path, data=payload,
                                        headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "expect")},
                                        timeout=30)
                self._respond(resp.status_code,
                              {k: v for k, v in resp.headers.items()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length")},
                              resp.content)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        return Handler
