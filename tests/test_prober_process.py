"""The testbed prober's process ends with its harness, also when the harness is killed with
SIGKILL and never sets the stop event: a real-time process sampling forever is what it
would leave otherwise (docs/testbed.md, "Prober coverage under machine stalls")."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

HARNESS = textwrap.dedent("""
    import http.server, sys, threading
    from supervisor_dcdeploy.lab.testbed.history import HistoryWriter
    from supervisor_dcdeploy.lab.testbed.recorder import Endpoint, Prober

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"version": "1"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ep = Endpoint("h1", "a", "127.0.0.1", server.server_address[1])
    prober = Prober(HistoryWriter(None), [ep], rate=50.0).start()
    print(prober._proc.pid, flush=True)
    sys.stdin.read()  # until the test kills this process
""")


def test_the_prober_process_ends_when_its_harness_is_killed():
    harness = subprocess.Popen([sys.executable, "-c", HARNESS], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = harness.stdout.readline()
        assert line.strip().isdigit(), f"the harness printed {line!r}, not the prober's pid"
        pid = int(line)
        pidfd = os.pidfd_open(pid)  # readable once that process has exited
    finally:
        harness.kill()  # SIGKILL: no stop event is ever set
        harness.wait()
    try:
        ready, _, _ = select.select([pidfd], [], [], 30.0)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, f"the prober (pid {pid}) still runs 30 s after its harness was killed"
    finally:
        os.close(pidfd)
