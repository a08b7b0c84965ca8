#!/usr/bin/env python3
"""A tiny service shipped inside sample releases (demo, tests, testbed, benchmarks).

GET /        -> 200 {"service", "version", "host", "pid"}
GET /health  -> 200, or 500 when the release is marked broken (a failing health check),
               or from ``broken_after`` seconds after start (a release that fails later)
The version is read once, at start, from release.json next to this file, so a host serves
exactly the release that was started, whatever the ``current`` symlink says later.
Standard library only: the release must run with any Python 3. Other releases' apps
(bench/preload_app.py) ship this file beside theirs and reuse ``JsonHandler`` and ``Server``.
"""

import argparse
import json
import os
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.realpath(__file__))
with open(os.path.join(HERE, "release.json")) as fh:
    RELEASE = json.load(fh)
STARTED = time.monotonic()


class JsonHandler(BaseHTTPRequestHandler):
    """Answers in JSON and logs nothing."""

    def send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Handler(JsonHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/health"):
            after = RELEASE.get("broken_after")  # seconds after start: fails from then on
            late = after is not None and time.monotonic() - STARTED >= after
            code = 500 if RELEASE.get("broken") or late else 200
            body = {"healthy": code == 200}
        else:
            code = 200
            body = {"service": RELEASE["service"], "version": RELEASE["version"],
                    "host": os.environ.get("DCDEPLOY_HOST", socket.gethostname()),
                    "pid": os.getpid()}
        self.send_json(code, body)


class Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        # http.server resolves its own name at bind (getfqdn); with no reachable DNS that
        # stalls every start by ~10 s. The name is never used here.
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args()
    Server((args.bind, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
