#!/usr/bin/env python3
"""Store traffic and makespan of a rolling deploy at data-center scale (issue 9).

For each N in ``--hosts``: a fresh ZooKeeper (one server, or a 3-server ensemble on loopback
with ``--ensemble``) and N hosts, each a real :class:`Agent` (its own kazoo session, its own
run loop and reconcile cycle, real fetch of a tiny release over file://, real local state on
disk). Only supervisord is simulated: a process table in which a start takes
``--switch-secs`` and a stop is instant. All hosts are threads of this one process.

Per N, one JSON line:

- ``makespan_s``: from just before the deploy item is queued to ZooKeeper's timestamp of its
  history node; ``bound_s`` = ceil(N / k) × (stop + start + healthy_secs) with
  k = min(max_parallel, online − quorum) (docs/design.md §8), stop = 0 and
  start = switch_secs here; ``ratio`` = makespan / bound.
- ``requests_per_upgrade``: requests under ``/dc`` counted by ZooKeeper itself (``mntr``
  per-namespace counters, no pings) from the deploy's start until 1 s after its end, minus
  this bench's own requests, divided by N. ``client_requests_per_upgrade``: the same from the
  agents' own counters (:class:`OpCounter`; it counts ``sync`` as a read and a multi as one
  write, ZooKeeper counts ``exists`` as a read, not ``sync``, and each op of a multi).
- ``idle_requests_per_s_per_host``: the same server count over ``--idle-secs`` with no deploy
  running (after the deploy, the fleet on the released version), per second and host.
- ``notifications_per_upgrade``: watch events delivered to the agents' store clients during
  the deploy, per host (``server_notifications_per_upgrade``: the servers' count).
- ``zk_cpu_s``: CPU seconds of the ZooKeeper server(s) during the deploy (``/proc``).
- ``clients_cpu_s``: CPU seconds of this process (all N agents) over ``deploy_wall_s``, the
  deploy's window: when the two are close, the simulated hosts saturated the one core their
  threads share, and the makespan is that core's limit as much as the protocol's.

Progress goes to stderr (structlog); agents' own logs are shown from level warning up.

    python bench/scale.py [--hosts 10,30,100] [--ensemble] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.waiting import wait_for
from supervisor_dcdeploy.lab.zkserver import (RequestCount, ZooKeeperServer, cpu_seconds,
                                          free_port, namespace_requests)

SVC = "A"
NAMESPACE = "dc"
# Every agent connects from 127.0.0.1: lift ZooKeeper's 60-connections-per-address limit.
# (mntr, for the counters, is in zkserver's 4lw.commands.whitelist.)
ZK_OPTIONS = dict(heap_mb=1024, extra_config={"maxClientCnxns": "0"})
SETTLE_SECS = 1.0  # after the deploy's end: the last hosts' follow-up cycles are its cost

# Lazy: bound at first use, after configure_logging() (a .bind() here would freeze
# structlog's default configuration, which prints to stdout).
log = structlog.get_logger("bench.scale", bench="scale")


def configure_logging() -> None:
    """Bench progress at info; the hundreds of agents only from warning up."""
    levels = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50,
              "exception": 40}

    def quiet_agents(_logger, method: str, event: dict) -> dict:
        if "bench" not in event and levels.get(method, 20) < 30:
            raise structlog.DropEvent
        return event

    structlog.configure(
        processors=[quiet_agents, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


class SimSupervisor:
    """One host's supervisord as the agent sees it (``state``, ``stop``, ``start``): a
    process table of one program, where a start takes ``switch_secs`` and a stop is
    instant. ``starts`` counts completed starts (the bench's progress)."""

    def __init__(self, switch_secs: float) -> None:
        self.switch_secs = switch_secs
        self.running = True
        self.starting = False
        self.starts = 0

    def state(self, program: str) -> str:
        if self.starting:
            return "STARTING"
        return "RUNNING" if self.running else "STOPPED"

    def stop(self, program: str) -> None:
        self.running = False

    def start(self, program: str) -> None:
        self.starting = True
        time.sleep(self.switch_secs)
        self.running, self.starting = True, False
        self.starts += 1


class Fleet:
    """ZooKeeper server(s), the bench's own store session and N agents in threads."""

    def __init__(self, workdir: Path, n: int, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.n = n
        self.args = args
        self.servers: list[ZooKeeperServer] = []
        self.agents: list[Agent] = []
        self.threads: list[threading.Thread] = []
        self.store = None

    # -- ZooKeeper ---------------------------------------------------------------------
    def start_zookeeper(self) -> None:
        if self.args.ensemble:
            peers = {sid: ("127.0.0.1", free_port(), free_port()) for sid in (1, 2, 3)}
            self.servers = [ZooKeeperServer(self.workdir / f"zk{sid}", free_port(),
                                            server_id=sid, peers=peers, **ZK_OPTIONS)
                            for sid in peers]
        else:
            self.servers = [ZooKeeperServer(self.workdir / "zk", free_port(), **ZK_OPTIONS)]
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_serving(120)
        self.endpoints = [(s.host, s.client_port) for s in self.servers]
        self.url = "zk://" + ",".join(f"{h}:{p}" for h, p in self.endpoints) + "/" + NAMESPACE
        self.store = open_store(self.url)
        self.store.start(timeout=30)

    def server_counts(self) -> RequestCount:
        return namespace_requests(self.endpoints, NAMESPACE)

    def zk_cpu(self) -> float:
        return sum(s.cpu_seconds() for s in self.servers)

    # -- hosts -------------------------------------------------------------------------
    def boot(self) -> None:
        args = self.args
        quorum = self.quorum
        ops.service_set(self.store, SVC, program=SVC, quorum=quorum,
                        max_parallel=args.max_parallel, health=HealthCheck("none"),
                        healthy_secs=args.healthy_secs)
        artifacts = self.workdir / "artifacts"
        self.releases = {}
        for version in ("1", "2"):
            path, sha = build_release(artifacts, SVC, version)
            self.releases[version] = (f"file://{path}", sha, path.stat().st_size)
        url1, sha1, size1 = self.releases["1"]
        for i in range(self.n):
            host = f"h{i:04d}"
            root = self.workdir / "hosts" / host
            rd = ReleaseDir(root, SVC)
            install_release([url1], sha1, rd.releases, "1", rd.cache, size=size1,
                            file_root=artifacts)
            rd.point_current("1")
            cfg = AgentConfig(host=host, rack=f"r{i % 10}", store=self.url, root=root,
                              services={SVC: {}}, session_timeout=args.session_timeout,
                              start_timeout=30.0, poll_interval=args.poll_interval,
                              extra={"file_root": str(artifacts)})
            agent = Agent(cfg, supervisor=SimSupervisor(args.switch_secs))  # type: ignore[arg-type]
            if not agent.connect(timeout=30):
                raise RuntimeError(f"{host} could not open its store session")
            thread = threading.Thread(target=agent.run, name=f"agent-{host}", daemon=True)
            thread.start()
            self.agents.append(agent)
            self.threads.append(thread)
            if (i + 1) % 50 == 0:
                log.info("boot.progress", hosts=i + 1, of=self.n)
        wait_for(lambda: len(self.store.children(f"current/{SVC}")) == self.n,
                 60 + self.n, f"all {self.n} hosts registered in current/{SVC}")

    @property
    def quorum(self) -> int:
        return self.args.quorum if self.args.quorum is not None else \
            self.n - self.args.max_parallel

    def client_ops(self) -> tuple[int, int]:
        """(requests, notifications) the agents' store clients counted so far."""
        requests = notes = 0
        for agent in self.agents:
            counter = agent.store.ops
            requests += counter.total
            notes += counter.notifications
        return requests, notes

    def stop(self) -> None:
        for agent in self.agents:
            agent.stopping.set()
            agent.wake.set()
        for thread in self.threads:
            thread.join(timeout=30)
        if self.store is not None:
            try:
                self.store.stop()
            except Exception:  # noqa: BLE001 - tearing down: the server goes next anyway
                pass
        for server in self.servers:
            server.kill()


class Snapshot:
    def __init__(self, fleet: Fleet) -> None:
        self.t = time.monotonic()
        self.server = fleet.server_counts()
        self.client, self.notifications = fleet.client_ops()
        self.bench = fleet.store.ops.total
        self.cpu = fleet.zk_cpu()
        self.clients_cpu = cpu_seconds(os.getpid())  # every agent is a thread of this process


def delta(before: Snapshot, after: Snapshot) -> dict[str, float]:
    server = after.server - before.server
    bench = after.bench - before.bench  # our own reads in /dc, counted by our client
    return {"secs": after.t - before.t, "server": server.total - bench,
            "server_reads": server.reads, "server_writes": server.writes,
            "server_notifications": server.notifications,
            "client": after.client - before.client,
            "notifications": after.notifications - before.notifications,
            "cpu": after.cpu - before.cpu, "clients_cpu": after.clients_cpu - before.clients_cpu,
            "bench": bench}


def measure_idle(fleet: Fleet, args: argparse.Namespace) -> dict[str, float]:
    time.sleep(max(2 * args.poll_interval, 2.0))  # let the last wake-ups pass
    log.info("idle.start", hosts=fleet.n, secs=args.idle_secs)
    before = Snapshot(fleet)
    time.sleep(args.idle_secs)
    return delta(before, Snapshot(fleet))


def idle_report(n: int, idle: dict[str, float], args: argparse.Namespace) -> dict:
    per_host_s = n * idle["secs"]
    return {
        "idle_requests_per_s_per_host": round(idle["server"] / per_host_s, 3),
        "client_idle_requests_per_s_per_host": round(idle["client"] / per_host_s, 3),
        "idle_notifications_per_s_per_host": round(idle["notifications"] / per_host_s, 3),
        "zk_cpu_s_idle": round(idle["cpu"], 2),
        "clients_cpu_s_idle": round(idle["clients_cpu"], 2), "idle_secs": args.idle_secs,
        "poll_interval": args.poll_interval, "ensemble": args.ensemble,
    }


def idle_only(fleet: Fleet, args: argparse.Namespace) -> dict:
    """``--skip-deploy``: the booted fleet on version 1, nothing staged, for fleets too
    large to deploy to in the time at hand. Deploy keys are null."""
    idle = measure_idle(fleet, args)
    return {"hosts": fleet.n, "makespan_s": None, "bound_s": None, "ratio": None,
            "requests_per_upgrade": None, "notifications_per_upgrade": None,
            "zk_cpu_s": None, "deployed": False, **idle_report(fleet.n, idle, args)}


def wait_gone(store, path: str, timeout: float) -> None:
    """Block until ``path`` no longer exists, woken by a watch (one read per change)."""
    gone = threading.Event()
    deadline = time.monotonic() + timeout
    while store.exists(path, gone.set) is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{path} still there after {timeout:g}s")
        gone.wait(min(remaining, 5.0))
        gone.clear()


def run_one(n: int, args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-scale-"))
    fleet = Fleet(workdir, n, args)
    try:
        log.info("zookeeper.start", hosts=n, ensemble=args.ensemble)
        fleet.start_zookeeper()
        log.info("fleet.boot", hosts=n)
        fleet.boot()
        store = fleet.store
        if args.skip_deploy:
            return idle_only(fleet, args)
        url2, sha2, size2 = fleet.releases["2"]
        ops.stage(store, SVC, "2", sha256=sha2, urls=[url2], size=size2)
        log.info("fleet.staged", hosts=n, version="2")
        wait_for(lambda: len(store.children(f"staging/{SVC}")) == n, 120 + n,
                 f"all {n} hosts fetched 2 and joined the ready queue")
        log.info("deploy.start", hosts=n)
        before = Snapshot(fleet)
        start = time.time()
        (item,) = ops.deploy(store, [SVC])
        progress = threading.Event()

        def report() -> None:
            while not progress.wait(10):
                done = sum(a.sup.starts for a in fleet.agents)  # type: ignore[attr-defined]
                log.info("deploy.progress", hosts=n, upgraded=done,
                         elapsed_s=round(time.time() - start, 1))

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            wait_gone(store, f"deploy/{item.node}", timeout=args.deploy_timeout)
        finally:
            progress.set()
        end = store.client.get(f"{store.root}/history/{item.node}")[1].ctime / 1e3
        time.sleep(SETTLE_SECS)
        after = Snapshot(fleet)
        upgraded = sum(a.local.get(SVC).active == "2" for a in fleet.agents)
        log.info("deploy.done", hosts=n, upgraded=upgraded, makespan_s=round(end - start, 2))
        # Idle: the fleet on the released version, nothing queued.
        idle = measure_idle(fleet, args)
        deploy = delta(before, after)
        k = min(args.max_parallel, n - fleet.quorum)
        bound = math.ceil(n / k) * (0.0 + args.switch_secs + args.healthy_secs)
        makespan = end - start
        return {
            "hosts": n, "makespan_s": round(makespan, 2), "bound_s": round(bound, 2),
            "ratio": round(makespan / bound, 3),
            "requests_per_upgrade": round(deploy["server"] / n, 1),
            "idle_requests_per_s_per_host": round(idle["server"] / (n * idle["secs"]), 3),
            "notifications_per_upgrade": round(deploy["notifications"] / n, 1),
            "zk_cpu_s": round(deploy["cpu"], 2),
            # cross-checks and context
            "client_requests_per_upgrade": round(deploy["client"] / n, 1),
            "server_reads_per_upgrade": round(deploy["server_reads"] / n, 1),
            "server_writes_per_upgrade": round(deploy["server_writes"] / n, 1),
            "server_notifications_per_upgrade": round(deploy["server_notifications"] / n, 1),
            # All N hosts' agents share this one process, and so one core (the GIL): when
            # this is close to the deploy's duration, the makespan measures that core's
            # saturation, not what N separate hosts would see.
            "clients_cpu_s": round(deploy["clients_cpu"], 2),
            "deploy_wall_s": round(deploy["secs"], 2),
            "upgraded": upgraded, "k": k, "quorum": fleet.quorum,
            "switch_secs": args.switch_secs, "healthy_secs": args.healthy_secs,
            "deployed": True, **idle_report(n, idle, args),
        }
    finally:
        fleet.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def host_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list "
                                         "of numbers (e.g. 10,30,100)") from None
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: every fleet needs >= 2 hosts")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options; also for a test that calls :func:`run_one` directly (e.g.
    ``run_one(10, parse_args(["--idle-secs", "60"]))`` and asserts on the counts)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=host_counts, default=[10, 30, 100, 300])
    parser.add_argument("--ensemble", action="store_true",
                        help="a 3-server ZooKeeper ensemble on loopback (default: one server)")
    parser.add_argument("--switch-secs", type=float, default=1.0,
                        help="how long a simulated start takes (a stop is instant)")
    parser.add_argument("--healthy-secs", type=float, default=0.0)
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--quorum", type=int, help="default: hosts - max_parallel")
    parser.add_argument("--idle-secs", type=float, default=30.0,
                        help="the idle window; make it several poll intervals")
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="the agents' periodic wake-up (agent.conf poll_interval)")
    parser.add_argument("--session-timeout", type=float, default=10.0)
    parser.add_argument("--deploy-timeout", type=float, default=1800.0)
    parser.add_argument("--skip-deploy", action="store_true",
                        help="boot and measure idle only (deploy keys null): for fleets too "
                             "large to deploy to in the time at hand")
    parser.add_argument("--json", action="store_true", help="one JSON line per N only")
    args = parser.parse_args(argv)
    for n in args.hosts:
        quorum = args.quorum if args.quorum is not None else n - args.max_parallel
        if args.max_parallel < 1 or not 0 <= quorum < n:
            parser.error(f"--hosts {n}: need max_parallel >= 1 and 0 <= quorum < hosts "
                         f"(quorum {quorum})")
    if args.switch_secs <= 0 or args.idle_secs <= 0:
        parser.error("--switch-secs and --idle-secs must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    # A SIGTERM (a kill of this bench) unwinds through the finally blocks, which stop the
    # agents and kill the ZooKeeper servers this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for n in args.hosts:
        result = run_one(n, args)
        if args.json or not result["deployed"]:
            print(json.dumps(result), flush=True)
        else:
            print(f"\n{n} hosts: makespan {result['makespan_s']} s, bound {result['bound_s']} s,"
                  f" ratio {result['ratio']}\n  requests per upgrade "
                  f"{result['requests_per_upgrade']} (server; clients "
                  f"{result['client_requests_per_upgrade']}), idle "
                  f"{result['idle_requests_per_s_per_host']} requests/s per host (clients "
                  f"{result['client_idle_requests_per_s_per_host']})\n  notifications per "
                  f"upgrade {result['notifications_per_upgrade']}, ZooKeeper CPU "
                  f"{result['zk_cpu_s']} s during the deploy", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
