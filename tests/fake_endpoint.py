"""A real HTTP server on localhost that plays an OpenAI-compatible endpoint in tests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeEndpoint:
    """Answers every POST with `status` and `body`: a fixed JSON value, or a callable of
    (request JSON, request headers) that returns one. `requests` keeps (path, headers, JSON)
    of each request; `url` is the base URL (…/v1)."""

    def __init__(self, status, body):
        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                headers = dict(self.headers)
                requests.append((self.path, headers, json.loads(self.rfile.read(length))))
                payload = body(requests[-1][2], headers) if callable(body) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(payload).encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
