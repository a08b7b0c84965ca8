#!/usr/bin/env python3
"""What ``verify_peers`` costs per take-down (issue 10 item 5), at 10, 100 and 300 hosts.

Each simulated host is a local HTTP listener answering its health check (all in one
child process, a thread per listener, so the probing side's CPU is its own); the gate
host's view lists them all as online with their probe
addresses, as their presences would. For each fleet size and quorum this runs
``peers.verify`` (the probing the gate does before its commit) ``--rounds`` times and
reports the probes sent and the seconds added, median and 95th percentile. Two cases:
every host answers, and one dead host (a closed port) at the front of the ready queue,
which must be heard before the gate may use its slot.

Not measured here: the store reads. Under ZooKeeper the mirror reads other hosts'
presences lazily, so the first verified take-down of a host reads each presence it has
not read yet (up to N - 1 reads, once; later changes arrive by watch).

    python bench/verify_peers.py                # a table
    python bench/verify_peers.py --json         # {"results": [...]} on stdout
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor_dcdeploy import peers  # noqa: E402
from supervisor_dcdeploy.policy import Policy  # noqa: E402
from supervisor_dcdeploy.decisions import ServiceView  # noqa: E402
from supervisor_dcdeploy.model import (CurrentEntry, DeployItem, ServiceSpec,  # noqa: E402
                                       StagedRelease, StagingEntry)


class Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def listeners(n: int) -> list[ThreadingHTTPServer]:
    out = []
    for _ in range(n):
        server = Server(("127.0.0.1", 0), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        out.append(server)
    return out


def serve(n: int) -> int:
    """Child mode: ``n`` listeners; their ports on one line of stdout; serve until stdin
    closes (the parent's end)."""
    servers = listeners(n)
    print(json.dumps([srv.server_address[1] for srv in servers]), flush=True)
    sys.stdin.read()
    return 0


class Remote:
    """The listeners in a child process, so the probing side's CPU is its own."""

    def __init__(self, n: int) -> None:
        import subprocess
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.ports = json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet(ports: list[int], quorum: int, dead_first: bool) -> tuple[ServiceView, str]:
    """Hosts h0..h(n-1) online on 1, the gate host last; the ready queue in host order
    with the gate host at position max_parallel - 1 (its own position never refuses)."""
    n = len(ports) + 1
    hosts = [f"h{i}" for i in range(n)]
    probes: dict[str, str | None] = {h: f"http://127.0.0.1:{port}/health"
                                     for h, port in zip(hosts, ports)}
    if dead_first:
        probes[hosts[0]] = f"http://127.0.0.1:{closed_port()}/health"
    gate_host = hosts[-1]
    probes[gate_host] = None
    spec = ServiceSpec("api", "api", quorum, max_parallel=2, policy=Policy(verify_peers=True))
    queue = ([hosts[0], gate_host] if dead_first else [gate_host])
    view = ServiceView(
        service="api", spec=spec,
        staged=StagedRelease("api", "2", "a" * 64, urls=("file:///x",), size=1),
        current={h: CurrentEntry(h, "1", probe=probes[h]) for h in hosts},
        staging=[StagingEntry(f"{h}-{i:010d}", i, h, "2") for i, h in enumerate(queue)],
        queue=[DeployItem("item-0000000001", 1, "api", "2", "rolling")])
    return view, gate_host


def measure(n: int, quorum_share: float, dead_first: bool, rounds: int) -> dict:
    remote = Remote(n - 1)
    try:
        quorum = max(1, int(round(quorum_share * n)) - 1)
        view, host = fleet(remote.ports, quorum, dead_first)
        peers.verify(view, host)  # warm up: thread pool, connections
        probes, secs, silent = [], [], []
        for _ in range(rounds):
            result = peers.verify(view, host)
            probes.append(result.probes)
            secs.append(result.seconds)
            silent.append(len(result.silent))
        secs.sort()
        return {"hosts": n, "quorum": quorum, "dead_first": dead_first, "rounds": rounds,
                "probes_median": statistics.median(probes), "probes_max": max(probes),
                "added_ms_median": round(1000 * statistics.median(secs), 2),
                "added_ms_p95": round(1000 * secs[int(0.95 * (len(secs) - 1))], 2),
                "silent_median": statistics.median(silent)}
    finally:
        remote.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument("--quorum-share", type=float, nargs="+", default=[0.5, 0.9],
                        help="quorum as a share of the hosts (default 0.5 and 0.9)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    if args.rounds < 1 or any(n < 2 for n in args.hosts):
        parser.error("--rounds 1 or more, --hosts 2 or more each")
    results = [measure(n, q, dead, args.rounds) for n in args.hosts
               for q in args.quorum_share for dead in (False, True)]
    if args.json:
        print(json.dumps({"results": results}))
        return 0
    print(f"{'hosts':>5} {'quorum':>6} {'dead first':>10} {'probes (median/max)':>20} "
          f"{'added ms (median/p95)':>22}")
    for r in results:
        print(f"{r['hosts']:>5} {r['quorum']:>6} {str(r['dead_first']):>10} "
              f"{r['probes_median']:>12g}/{r['probes_max']:<7} "
              f"{r['added_ms_median']:>12}/{r['added_ms_p95']:<9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
