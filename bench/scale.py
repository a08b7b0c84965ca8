#!/usr/bin/env python3
"""Store traffic and makespan of a rolling deploy at data-center scale (issue 9).

For each N in ``--hosts``: a fresh ZooKeeper (one server, or a 3-server ensemble on loopback
with ``--ensemble``) and N hosts, each a real :class:`Agent` (its own kazoo session, its own
run loop and reconcile cycle, real fetch of a tiny release over file://, real local state on
disk). Only supervisord is simulated: a process table in which a start takes
``--switch-secs`` and a stop is instant. The hosts are threads of ``--procs`` worker
processes (default: one per core), so that Python's GIL in one process does not become
the fleet's limit.

Per N, one JSON line:

- ``makespan_s``: from just before the deploy item is queued to ZooKeeper's timestamp of its
  history node; ``bound_s``: docs/design.md §8's ceil(N / k) × (stop + start + healthy_secs)
  with k = min(max_parallel, online − quorum), from the switches as they were measured in
  the same run (see :func:`lower_bound`); ``ratio`` = makespan / bound.
  ``bound_nominal_s``: the same with stop = 0 and start = ``--switch-secs``.
  ``handoff_ms_*``: the rest of each round, from a switch's end to the stop it let through
  (see :func:`handoffs`).
- ``requests_per_upgrade``: requests under ``/dc`` counted by ZooKeeper itself (``mntr``
  per-namespace counters, no pings) from the deploy's start until 1 s after its end, minus
  this bench's own requests, divided by N. ``client_requests_per_upgrade``: the same from the
  agents' own counters (:class:`OpCounter`; it counts ``sync`` as a read and a multi as one
  write, ZooKeeper counts ``exists`` as a read, not ``sync``, and each op of a multi).
  ``requests_per_upgrade_less_idle``: the same less what the idle rate below sends over the
  deploy's window (the periodic access check; since a notification or an accepted request
  spares it, agent/access.py, hosts hardly make it during a deploy, so this now
  subtracts checks that were not made: read the raw count).
- ``idle_requests_per_s_per_host``: the same server count over ``--idle-secs`` with no deploy
  running (after the deploy, the fleet on the released version), per second and host.
- ``notifications_per_upgrade``: watch events delivered to the agents' store clients during
  the deploy, per host (``server_notifications_per_upgrade``: the servers' count).
- ``zk_cpu_s``: CPU seconds of the ZooKeeper server(s) during the deploy (``/proc``).
- ``clients_cpu_s``: CPU seconds of the worker processes (all N agents) over
  ``deploy_wall_s``, the deploy's window; ``cpu_util``: the whole machine's CPU busy share
  over that window (``/proc/stat``, every process, other users' too), with ``cores`` and
  ``loadavg``; ``timer_late_ms_p50``/``_p99``: how late a 10 ms sleep of the bench's own
  idle process woke during the deploy (the scheduling delay every hop pays). When
  ``cpu_util`` is near 1 the makespan is this machine's limit as much as the protocol's.

Progress goes to stderr (structlog); agents' own logs are shown from level warning up.

    python bench/scale.py [--hosts 10,30,100] [--procs K] [--ensemble] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import structlog

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.store import StoreUnavailable, open_store
from supervisor_dcdeploy.waiting import wait_for

# The lab (building releases, running ZooKeeper): imported here only, in one place.
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.lab.zkserver import (RequestCount, ZooKeeperServer, free_port,
                                              namespace_requests)

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
    instant. ``starts`` counts completed starts (the bench's progress); ``switches`` holds
    each stop-to-started duration as this host lived it (the bound's switch time)."""

    def __init__(self, switch_secs: float) -> None:
        self.switch_secs = switch_secs
        self.running = True
        self.starting = False
        self.starts = 0
        self.stopped_at: float | None = None
        self.switches: list[float] = []
        self.stops: list[float] = []  # time.monotonic(): one clock for every process here
        self.dones: list[float] = []

    def state(self, program: str) -> str:
        if self.starting:
            return "STARTING"
        return "RUNNING" if self.running else "STOPPED"

    def stop(self, program: str) -> None:
        self.running = False
        self.stopped_at = time.monotonic()
        self.stops.append(self.stopped_at)

    def start(self, program: str) -> None:
        self.starting = True
        time.sleep(self.switch_secs)
        self.running, self.starting = True, False
        self.starts += 1
        if self.stopped_at is not None:
            self.dones.append(time.monotonic())
            self.switches.append(self.dones[-1] - self.stopped_at)
            self.stopped_at = None


def lower_bound(switches: Sequence[float], n: int, k: int, healthy_secs: float) -> float:
    """docs/design.md §8's lower bound of one item's makespan, from the switches measured:
    at most k hosts are down at once and host i is down for at least its switch (stop +
    start) plus ``healthy_secs``, so the makespan is at least the sum of those over k; and
    some slot runs ceil(n / k) switches in series, each at least the shortest. With equal
    switches s both are ceil(n / k) × (s + healthy_secs) when k divides n."""
    if not switches or k < 1:
        raise ValueError("a bound needs the measured switches and k >= 1")
    each = [s + healthy_secs for s in switches]
    return max(sum(each) / k, math.ceil(n / k) * min(each))


def handoffs(stops: Sequence[float], dones: Sequence[float], k: int) -> list[float]:
    """The coordination time of each round: with k slots, the i-th stop of the fleet (in
    time order, i >= k) waited for the (i - k)-th switch to finish; the gap between the two
    is the hand-off (the switched host re-registering and leaving the queue, the next host
    notified, its cycle, sync and gate commit). Negative gaps cannot occur when at most k
    hosts are down at once."""
    stops, dones = sorted(stops), sorted(dones)
    return [stops[i] - dones[i - k] for i in range(k, len(stops)) if i - k < len(dones)]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def split_hosts(n: int, procs: int) -> list[list[int]]:
    """Host indices 0..n-1 dealt to ``procs`` workers (none left empty), in turn."""
    procs = max(1, min(procs, n))
    return [list(range(i, n, procs)) for i in range(procs)]


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (idle and iowait are
    not busy)."""
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


def handoff_report(gaps: list[float]) -> dict[str, float | None]:
    if not gaps:
        return {"handoff_ms_mean": None, "handoff_ms_p50": None, "handoff_ms_p90": None}
    return {"handoff_ms_mean": round(1e3 * sum(gaps) / len(gaps), 1),
            "handoff_ms_p50": round(1e3 * percentile(gaps, 0.5), 1),
            "handoff_ms_p90": round(1e3 * percentile(gaps, 0.9), 1)}


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LatenessProbe:
    """How late a 10 ms sleep of this (otherwise idle) process wakes up: the machine's
    scheduling delay, which every hop of the protocol (agent thread, kazoo thread, the
    ZooKeeper server's threads) pays too on a loaded machine."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.late: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lateness", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(self.period)
            self.late.append(time.monotonic() - t0 - self.period)

    def __enter__(self) -> "LatenessProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float | None]:
        late = sorted(self.late)
        if not late:
            return {"timer_late_ms_p50": None, "timer_late_ms_p99": None}
        return {"timer_late_ms_p50": round(1e3 * late[len(late) // 2], 1),
                "timer_late_ms_p99": round(1e3 * late[min(len(late) - 1,
                                                          int(len(late) * 0.99))], 1)}


# -- a worker process: a slice of the hosts ------------------------------------------------

def worker_main(conn, workdir: str, url: str, hosts: list[int], args: argparse.Namespace,
                release1: tuple[str, str, int]) -> None:
    """Boot these hosts (threads of this process) and answer the parent's requests on
    ``conn``: "counts", then "stop". Runs in a spawned process (no kazoo state inherited)."""
    configure_logging()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(workdir)
    artifacts = work / "artifacts"
    url1, sha1, size1 = release1
    agents: list[Agent] = []
    threads: list[threading.Thread] = []
    try:
        for i in hosts:
            host = f"h{i:04d}"
            root = work / "hosts" / host
            rd = ReleaseDir(root, SVC)
            install_release([url1], sha1, rd.releases, "1", rd.cache, size=size1,
                            file_root=artifacts)
            rd.point_current("1")
            cfg = AgentConfig(host=host, rack=f"r{i % 10}", store=url, root=root,
                              services={SVC: {}}, session_timeout=args.session_timeout,
                              start_timeout=30.0, poll_interval=args.poll_interval,
                              extra={"file_root": str(artifacts)})
            agent = Agent(cfg, supervisor=SimSupervisor(args.switch_secs))  # type: ignore[arg-type]
            if not agent.connect(timeout=30):
                raise RuntimeError(f"{host} could not open its store session")
            thread = threading.Thread(target=agent.run, name=f"agent-{host}", daemon=True)
            thread.start()
            agents.append(agent)
            threads.append(thread)
        conn.send(("booted", len(agents)))
        while True:
            command = conn.recv()
            if command == "counts":
                conn.send(worker_counts(agents))
            elif command == "stop":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for agent in agents:
            agent.stopping.set()
            agent.wake.set()
        for thread in threads:
            thread.join(timeout=30)
        try:
            conn.send(("stopped", len(agents)))
        except (OSError, ValueError):
            pass


THREAD_KINDS = {"agent-": "agent", "(zk_loop)": "kazoo_connection",
                "(_thread_worker)": "kazoo_callbacks"}


def thread_kind(name: str) -> str:
    """What a worker thread does, from its name: the agents' run loops (``agent-<host>``,
    named here), kazoo's connection threads (which receive every notification and reply)
    and kazoo's callback threads (Python 3.10+ puts the target's name in the default
    thread name); ``other`` is the rest (fetch threads, the main thread)."""
    for mark, kind in THREAD_KINDS.items():
        if mark in name:
            return kind
    return "other"


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads by :func:`thread_kind`, from
    ``/proc/self/task/<tid>/stat`` (utime + stime). Threads that ended are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys([*THREAD_KINDS.values(), "other"], 0.0)
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except (OSError, TypeError):
            continue
        out[thread_kind(thread.name)] += (int(fields[11]) + int(fields[12])) / tick
    return out


def worker_counts(agents: list[Agent]) -> dict:
    counts = {"requests": 0, "notifications": 0, "wakeups": 0, "cycles": 0, "starts": 0,
              "upgraded": 0, "switches": [], "stops": [], "dones": [], "cpu": own_cpu(),
              "thread_cpu": thread_cpu()}
    for agent in agents:
        counts["requests"] += agent.store.ops.total
        counts["notifications"] += agent.store.ops.notifications
        counts["wakeups"] += getattr(agent.coord, "wakeups", 0)
        counts["cycles"] += agent.cycles
        sup = agent.sup
        counts["starts"] += sup.starts  # type: ignore[attr-defined]
        counts["switches"] += sup.switches  # type: ignore[attr-defined]
        counts["stops"] += sup.stops  # type: ignore[attr-defined]
        counts["dones"] += sup.dones  # type: ignore[attr-defined]
        counts["upgraded"] += agent.local.get(SVC).active == "2"
    return counts


class Fleet:
    """ZooKeeper server(s), the bench's own store session and N agents in worker
    processes."""

    def __init__(self, workdir: Path, n: int, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.n = n
        self.args = args
        self.servers: list[ZooKeeperServer] = []
        self.workers: list[tuple[multiprocessing.process.BaseProcess, object]] = []
        self.store = None
        self._pipe = threading.Lock()  # the progress reporter asks too

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
        ops.service_set(self.store, SVC, program=SVC, quorum=self.quorum,
                        max_parallel=args.max_parallel, health=HealthCheck("none"),
                        healthy_secs=args.healthy_secs)
        artifacts = self.workdir / "artifacts"
        self.releases = {}
        for version in ("1", "2"):
            path, sha = build_release(artifacts, SVC, version)
            self.releases[version] = (f"file://{path}", sha, path.stat().st_size)
        spawn = multiprocessing.get_context("spawn")
        for hosts in split_hosts(self.n, args.procs):
            parent, child = spawn.Pipe()
            proc = spawn.Process(target=worker_main, name="scale-worker", daemon=True,
                                 args=(child, str(self.workdir), self.url, hosts, args,
                                       self.releases["1"]))
            proc.start()
            self.workers.append((proc, parent))
        for proc, conn in self.workers:
            if not conn.poll(300 + self.n):  # type: ignore[attr-defined]
                raise RuntimeError(f"worker {proc.pid} did not boot its hosts")
            tag, _ = conn.recv()  # type: ignore[attr-defined]
            if tag != "booted":
                raise RuntimeError(f"worker {proc.pid}: {tag}")
        log.info("boot.workers", hosts=self.n, procs=len(self.workers))
        wait_for(lambda: len(self.store.children(f"current/{SVC}")) == self.n,
                 60 + self.n, f"all {self.n} hosts registered in current/{SVC}")

    @property
    def quorum(self) -> int:
        return self.args.quorum if self.args.quorum is not None else \
            self.n - self.args.max_parallel

    def counts(self) -> dict:
        """The agents' own counters, summed over the workers, and the workers' CPU."""
        total: dict = {"requests": 0, "notifications": 0, "wakeups": 0, "cycles": 0,
                       "starts": 0, "upgraded": 0, "switches": [], "stops": [], "dones": [],
                       "cpu": 0.0, "thread_cpu": {}}
        with self._pipe:
            for _, conn in self.workers:
                conn.send("counts")  # type: ignore[attr-defined]
            for _, conn in self.workers:
                for key, value in conn.recv().items():  # type: ignore[attr-defined]
                    if key == "thread_cpu":
                        for kind, secs in value.items():
                            total[key][kind] = total[key].get(kind, 0.0) + secs
                    else:
                        total[key] += value
        return total

    def stop(self) -> None:
        with self._pipe:
            for proc, conn in self.workers:
                try:
                    conn.send("stop")  # type: ignore[attr-defined]
                except (OSError, ValueError):
                    pass
        for proc, _ in self.workers:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
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
        self.agents = fleet.counts()
        self.bench = fleet.store.ops.total
        self.cpu = fleet.zk_cpu()
        self.machine = cpu_times()


def delta(before: Snapshot, after: Snapshot) -> dict[str, float]:
    server = after.server - before.server
    bench = after.bench - before.bench  # our own reads in /dc, counted by our client
    busy = after.machine[0] - before.machine[0]
    jiffies = after.machine[1] - before.machine[1]
    a, b = after.agents, before.agents
    return {"secs": after.t - before.t, "server": server.total - bench,
            "server_reads": server.reads, "server_writes": server.writes,
            "server_notifications": server.notifications,
            "client": a["requests"] - b["requests"],
            "notifications": a["notifications"] - b["notifications"],
            "wakeups": a["wakeups"] - b["wakeups"], "cycles": a["cycles"] - b["cycles"],
            "switches": _new_switches(b["switches"], a["switches"]),
            "cpu": after.cpu - before.cpu, "clients_cpu": a["cpu"] - b["cpu"],
            "thread_cpu": {kind: round(secs - b["thread_cpu"].get(kind, 0.0), 2)
                           for kind, secs in a["thread_cpu"].items()},
            "cpu_util": busy / jiffies if jiffies else 0.0, "bench": bench}


def _new_switches(before: list[float], after: list[float]) -> list[float]:
    """The switches measured between two snapshots (each list is a multiset)."""
    left = list(after)
    for s in before:
        left.remove(s)
    return left


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
        "cpu_util_idle": round(idle["cpu_util"], 3),
        "poll_interval": args.poll_interval, "ensemble": args.ensemble, "procs": args.procs,
    }


def idle_only(fleet: Fleet, args: argparse.Namespace) -> dict:
    """``--skip-deploy``: the booted fleet on version 1, nothing staged, for fleets too
    large to deploy to in the time at hand. Deploy keys are null."""
    idle = measure_idle(fleet, args)
    return {"hosts": fleet.n, "makespan_s": None, "bound_s": None, "ratio": None,
            "requests_per_upgrade": None, "notifications_per_upgrade": None,
            "zk_cpu_s": None, "deployed": False, **idle_report(fleet.n, idle, args)}


def wait_gone(store, path: str, timeout: float) -> None:
    """Block until ``path`` no longer exists, woken by a watch (one read per change). A
    read that fails because the bench's own session lost its connection (a machine so
    loaded that its pings went unanswered) is asked again, at most once a second, until
    the deadline: the deploy goes on without the bench's session."""
    gone = threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            if store.exists(path, gone.set) is None:
                return
            wait = 5.0
        except StoreUnavailable as exc:
            log.warning("bench.store_unavailable", path=path, error=str(exc))
            wait = 1.0
        if remaining <= 0:
            raise TimeoutError(f"{path} still there after {timeout:g}s")
        gone.wait(min(remaining, wait))
        gone.clear()


def run_one(n: int, args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-scale-"))
    fleet = Fleet(workdir, n, args)
    try:
        log.info("zookeeper.start", hosts=n, ensemble=args.ensemble)
        fleet.start_zookeeper()
        log.info("fleet.boot", hosts=n, procs=args.procs)
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
                log.info("deploy.progress", hosts=n, upgraded=fleet.counts()["starts"],
                         elapsed_s=round(time.time() - start, 1),
                         loadavg=os.getloadavg()[0])

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            with LatenessProbe() as probe:
                wait_gone(store, f"deploy/{item.node}", timeout=args.deploy_timeout)
        finally:
            progress.set()
            reporter.join()
        end = store.client.get(f"{store.root}/history/{item.node}")[1].ctime / 1e3
        time.sleep(SETTLE_SECS)
        after = Snapshot(fleet)
        loadavg = os.getloadavg()[0]
        upgraded = after.agents["upgraded"]
        log.info("deploy.done", hosts=n, upgraded=upgraded, makespan_s=round(end - start, 2))
        # Idle: the fleet on the released version, nothing queued.
        idle = measure_idle(fleet, args)
        deploy = delta(before, after)
        k = min(args.max_parallel, n - fleet.quorum)
        switches = deploy["switches"]
        bound = lower_bound(switches, n, k, args.healthy_secs)
        nominal = math.ceil(n / k) * (0.0 + args.switch_secs + args.healthy_secs)
        makespan = end - start
        return {
            "hosts": n, "makespan_s": round(makespan, 2), "bound_s": round(bound, 2),
            "ratio": round(makespan / bound, 3),
            "requests_per_upgrade": round(deploy["server"] / n, 1),
            "idle_requests_per_s_per_host": round(idle["server"] / (n * idle["secs"]), 3),
            "notifications_per_upgrade": round(deploy["notifications"] / n, 1),
            "zk_cpu_s": round(deploy["cpu"], 2),
            # The machine during the deploy: every process's CPU (other users' too).
            "cpu_util": round(deploy["cpu_util"], 3), "cores": os.cpu_count(),
            "loadavg": round(loadavg, 1), **probe.report(),
            # the bound's inputs
            "bound_nominal_s": round(nominal, 2),
            "ratio_nominal": round(makespan / nominal, 3),
            "switch_mean_s": round(sum(switches) / len(switches), 3),
            "switch_max_s": round(max(switches), 3),
            # the rest of each round (the fleet switched once only: every stop and finish
            # the workers recorded belongs to this deploy)
            **handoff_report(handoffs(after.agents["stops"], after.agents["dones"], k)),
            # cross-checks and context
            # The count less the idle rate (the periodic access check) over the deploy's
            # window. The check is due only after store_check_secs without a notification
            # or an accepted request (agent/access.py), which a deploy hardly leaves, so
            # this subtracts checks that were not made; kept for comparison with older runs.
            "requests_per_upgrade_less_idle": round(
                (deploy["server"] - idle["server"] / idle["secs"] * deploy["secs"]) / n, 1),
            "client_requests_per_upgrade": round(deploy["client"] / n, 1),
            "server_reads_per_upgrade": round(deploy["server_reads"] / n, 1),
            "server_writes_per_upgrade": round(deploy["server_writes"] / n, 1),
            "server_notifications_per_upgrade": round(deploy["server_notifications"] / n, 1),
            "wakeups_per_upgrade": round(deploy["wakeups"] / n, 1),
            "cycles_per_upgrade": round(deploy["cycles"] / n, 1),
            "clients_cpu_s": round(deploy["clients_cpu"], 2),
            # where the workers' CPU went (threads alive at both ends of the window)
            "clients_cpu_s_by_thread": deploy["thread_cpu"],
            "clients_cpu_ms_per_upgrade": round(1e3 * deploy["clients_cpu"] / n, 1),
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
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                        help="worker processes the hosts are spread over (default: cores)")
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
    if args.procs < 1:
        parser.error("--procs must be >= 1")
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
                  f"{result['zk_cpu_s']} s during the deploy, machine CPU busy "
                  f"{result['cpu_util']:.0%} of {result['cores']} cores", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
