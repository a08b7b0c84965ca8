#!/usr/bin/env python3
"""Parallel waves: the makespan of a deploy of many services against the DAG bound, against
``dcdeploy plan``'s prediction, and against the same deploy with the queue in series (issue
10, "Measure"), with a breakdown of where the time goes.

10 local hosts (real supervisord + agent each, real single-node ZooKeeper), every service on
every host; services in two chains (x1 <- x2 <- x3, y1 <- y2) plus three independent ones
(z1, z2, z3). The switch cost is measured first on a program the agents leave alone (stop,
then start, through supervisord's XML-RPC, as the agent does, then the time until the app
first answers: a switch's ``healthy_secs`` begin only then, docs/design.md §8), then:

    per-service bound = ceil(N / k) * (stop + start + ready + healthy_secs),
                        k = min(max_parallel, N - quorum)
    dag_bound_s       = the longest chain of per-service bounds (here 3 of them)

Then three deploys of every service (items with ``after``, as ``dcdeploy deploy`` writes
them), each from the creation of its items to the creation of its last history node
(ZooKeeper's timestamps):

1. a warm-up to version 2 in waves (``warmup_makespan_s``), so that the fleet has switch
   timings in its history, as a fleet that has deployed before has;
2. ``dcdeploy plan --json`` for every service (``predicted_s``: its ``total_s``, from the
   timings the agents recorded in 1), then the measured deploy to version 3 in waves
   (``makespan_s``), each item carrying its prediction as ``dcdeploy deploy`` records it;
3. the same to version 4 in series (``series_makespan_s``; items without ``after``).

``breakdown`` (from the history records of 2: the gate's ``started_at``, each host's
``stop_s``/``start_s``/``healthy_s`` and ``at``, ZooKeeper's creation time of the history
node): per item, the first take-down after the items it waits for were done, the switches
against the calibrated model, the idle time between one host's switch and the next
(``handoff``), and the time from the last switch to the item's completion (``tail``); for
the chain that ends last, those summed, which add up to the makespan. ``per_switch_ratio``
(recorded switch over calibrated) separates the machine's load from the protocol's latency.
``cpu`` (for the measured deploy and the series one): CPU seconds used during it by
kind of process, summed over the hosts (every agent; every supervisord itself; the
services, live ones and the stopped ones their supervisord reaped; ZooKeeper; this bench),
the same per switch (``ms_per_switch``), the agents' cycles per switch, and the machine's
busy share of its cores (every process on it, other users' too): how much of the machine
the product's own processes take beside the services it starts. ``--keep`` leaves the
work directory (every supervisord's and agent's log) for a closer look. ``--host-parallel
N`` deploys with it and asks ``dcdeploy plan --host-parallel N`` for the prediction.
``load`` is the 1-minute load average before and after each deploy. On a shared machine
the load moves within minutes, so the calibration taken before the deploys can be off
for the deploy itself: ``dag_bound_recorded_s`` is the same bound with each item's switch
at its recorded mean in the measured deploy, and ``ratio_recorded`` the makespan over it,
which is the coordination alone.

    python bench/waves.py [--hosts 10] [--max-parallel 1] [--healthy-secs 1]
                          [--host-parallel 1] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import CALIBRATION  # noqa: E402

from supervisor_dcdeploy import ops  # noqa: E402
from supervisor_dcdeploy.cli import main as cli  # noqa: E402
from supervisor_dcdeploy.lab.hostenv import descendants, host_rpc  # noqa: E402
from supervisor_dcdeploy.lab.localdc import Cluster, get_version, wait_for  # noqa: E402
from supervisor_dcdeploy.snapshot import read_queue  # noqa: E402
from supervisor_dcdeploy.store import open_store  # noqa: E402
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port  # noqa: E402

CHAINS = [["x1", "x2", "x3"], ["y1", "y2"], ["z1"], ["z2"], ["z3"]]
PROGRESS_SECS = 5.0  # how often the progress line asks every endpoint (80 HTTP requests)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# -- where the CPU goes -------------------------------------------------------------------
# On one machine every host's agent, supervisord and services share the cores: how much CPU
# each kind of process used during a deploy, per switch, tells the product's part (agent,
# supervisord) from the services' own start cost and from the store.
CPU_KINDS = ("agent", "supervisord", "service", "zookeeper", "bench", "other")


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid`` (``/proc/<pid>/stat``): utime +
    stime, and cutime + cstime, which hold the processes it waited for (a supervisord's
    stopped services)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tck, (int(f[13]) + int(f[14])) / tck


def _kind(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    if b"supervisor_dcdeploy.agent" in cmd:
        return "agent"
    return "service" if b"app.py" in cmd else "other"


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (``/proc/stat``; idle and iowait are not
    busy): every process, other users' too."""
    with open("/proc/stat") as fh:
        fields = [float(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def fleet_cpu(dc: Cluster, zk_pid: int) -> dict:
    """CPU seconds used so far, by kind: every host's agent, supervisord, services (live
    ones, and the stopped ones its supervisord reaped), ZooKeeper, this bench; plus the
    agents' cycles (their status.json) and the machine's busy jiffies."""
    out = dict.fromkeys(CPU_KINDS, 0.0)
    cycles = 0
    for name, proc in dc.procs.items():
        own, reaped = _proc_cpu(proc.pid)
        out["supervisord"] += own
        out["service"] += reaped  # supervisord's children that ended: stopped services
        for pid in descendants(proc.pid):
            try:
                kind = _kind(pid)
                own, reaped = _proc_cpu(pid)
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile: its parent reaps it, counted next time
            out[kind] += own + reaped
        try:
            cycles += json.loads((dc.hosts[name].root / "status.json").read_text())["cycles"]
        except (OSError, ValueError, KeyError):
            pass
    out["zookeeper"] = sum(_proc_cpu(zk_pid))
    out["bench"] = sum(_proc_cpu(os.getpid()))
    return {"cpu": out, "cycles": cycles, "machine": machine_busy(), "t": time.monotonic()}


def cpu_report(before: dict, after: dict, switches: int) -> dict:
    """What each kind used between ``before`` and ``after``: seconds, and ms per switch;
    the agents' cycles per switch; the machine's busy share of its cores."""
    secs = {k: after["cpu"][k] - before["cpu"][k] for k in CPU_KINDS}
    busy = after["machine"][0] - before["machine"][0]
    total = after["machine"][1] - before["machine"][1]
    return {"wall_s": round(after["t"] - before["t"], 2),
            "cpu_s": {k: round(v, 2) for k, v in secs.items()},
            "ms_per_switch": {k: round(1e3 * v / switches, 1) for k, v in secs.items()},
            "cycles_per_switch": round((after["cycles"] - before["cycles"]) / switches, 2),
            "machine_busy": round(busy / total, 3) if total else None,
            "cores": os.cpu_count()}


def add_calibration(dc: Cluster, svc: str) -> int:
    """The app of ``svc`` as one more program on h0 that the agent leaves alone (it would
    restart a stopped service of its own); returns its port."""
    layout = dc.hosts["h0"]
    port = free_port()
    layout.extra_programs += f"""
[program:{CALIBRATION}]
command = {layout.python} {layout.root}/{svc}/current/app.py --port {port} --bind 127.0.0.1
autostart = false
autorestart = false
startsecs = 1
stopwaitsecs = 5
"""
    return port


def calibrate(dc: Cluster, port: int, rounds: int = 3) -> tuple[float, float, float]:
    """Median seconds of stopProcess(wait), of startProcess(wait) (supervisord's RUNNING,
    after ``startsecs``), and from RUNNING to the app's first healthy answer (asked every
    10 ms): what every switch must wait for before its ``healthy_secs`` begin."""
    rpc = host_rpc(dc.hosts["h0"]).supervisor
    rpc.startProcess(CALIBRATION, True)
    stops, starts, readies = [], [], []
    for _ in range(rounds):
        t = time.monotonic()
        rpc.stopProcess(CALIBRATION, True)
        stops.append(time.monotonic() - t)
        t = time.monotonic()
        rpc.startProcess(CALIBRATION, True)
        starts.append(time.monotonic() - t)
        t = time.monotonic()
        while get_version("127.0.0.1", port, timeout=1.0) is None:
            if time.monotonic() - t > 30:
                raise TimeoutError("the calibration app never answered")
            time.sleep(0.01)
        readies.append(time.monotonic() - t)
    rpc.stopProcess(CALIBRATION, True)
    return statistics.median(stops), statistics.median(starts), statistics.median(readies)


def plan_json(url: str, names: list[str], host_parallel: int) -> dict:
    """``dcdeploy plan --json NAMES --host-parallel N`` as an operator runs it before
    ``deploy --host-parallel N``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli(["--store", url, "plan", "--json", *names, "--host-parallel",
                  str(host_parallel)])
    if rc:
        raise RuntimeError(f"dcdeploy plan exited {rc}")
    return json.loads(out.getvalue())


def stage_all(dc: Cluster, names: list[str], version: str) -> None:
    for name in names:
        dc.stage(name, version)
    wait_for(lambda: all(sorted(ops.status(dc.store)["services"][s]["staging"]) ==
                         sorted(dc.hosts) for s in names), 180, f"every host ready for {version}")


def deploy_and_time(dc: Cluster, names: list[str], version: str, log, *, in_series: bool,
                    host_parallel: int | None, predicted: dict | None = None,
                    staged: bool = False, zk_pid: int | None = None) -> dict:
    """Deploy ``version`` of every service (staged first unless ``staged``). Returns the
    item nodes, ``t0`` (the items' creation), ``end`` (the last history node's creation)
    and each item's ``done``, ZooKeeper's clock, and the load average before and after."""
    store = dc.store
    if not staged:
        stage_all(dc, names, version)
    before = load1()
    cpu0 = fleet_cpu(dc, zk_pid) if zk_pid else None
    items = ops.deploy(store, names, signer=dc.signer, in_series=in_series,
                       host_parallel=host_parallel, predicted=predicted)
    client = store.client
    start = min(client.get(f"{store.root}/deploy/{i.node}")[1].ctime for i in items) / 1e3
    log(f"deploying {len(items)} services to {version} "
        f"({'in series' if in_series else 'in waves'}), load {before} ...")
    deadline = time.monotonic() + 900
    next_line = 0.0
    while not dc.queue_empty():
        if time.monotonic() >= next_line:  # every endpoint asked: not too often
            log("  " + " ".join(f"{s}:{sum(dc.version(h, s) == version for h in dc.hosts)}"
                                for s in names))
            next_line = time.monotonic() + PROGRESS_SECS
        if time.monotonic() > deadline:
            raise TimeoutError(f"the deploy to {version} did not finish in 900 s")
        time.sleep(0.25)
    cpu = cpu_report(cpu0, fleet_cpu(dc, zk_pid), len(names) * len(dc.hosts)) \
        if cpu0 else None
    wait_for(lambda: all(dc.all_on(s, version) for s in names), 30, "convergence")
    end = max(client.get(f"{store.root}/history/{i.node}")[1].ctime for i in items) / 1e3
    done = {i.node: client.get(f"{store.root}/history/{i.node}")[1].ctime / 1e3
            for i in items}
    return {"items": items, "t0": start, "end": end, "done": done,
            "load": [before, load1()], "makespan": end - start, "cpu": cpu}


# -- the breakdown ------------------------------------------------------------------------

def _switches(record: dict) -> list[dict]:
    out = []
    for t in record.get("timings") or []:
        dur = t["stop_s"] + t["start_s"] + t["healthy_s"]
        out.append({"host": t["host"], "start": t["at"] - dur, "end": t["at"], "dur": dur,
                    "stop_s": t["stop_s"], "start_s": t["start_s"],
                    "healthy_s": t["healthy_s"]})
    return sorted(out, key=lambda s: s["start"])


def _holes(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The gaps inside the union of ``intervals`` (sorted by start)."""
    holes = []
    reach = None
    for a, b in intervals:
        if reach is not None and a > reach:
            holes.append((reach, a))
        reach = b if reach is None else max(reach, b)
    return holes


def breakdown(run: dict, records: dict[str, dict], model: dict, hosts: list[str]) -> dict:
    """Where the makespan of ``run`` went (see the module's docstring)."""
    t0 = run["t0"]
    items = run["items"]
    node_of = {i.service: i.node for i in items}
    everyone = {i.node: _switches(records[i.node]) for i in items}
    per_switch = sum(model.values())

    def busy(host: str, t: float) -> bool:
        return any(s["host"] == host and s["start"] <= t < s["end"]
                   for sw in everyone.values() for s in sw)

    out = {}
    for item in items:
        rec, sw = records[item.node], everyone[item.node]
        deps = [node_of[s] for s in (item.after or ()) if s in node_of]
        ready = max((run["done"][d] for d in deps), default=t0)
        holes = _holes([(s["start"], s["end"]) for s in sw])
        # A hole where every host still to switch was busy switching another service
        # is the hosts' capacity (host_parallel), not the protocol's latency.
        no_free = sum(1 for a, _ in holes
                      if not any(not busy(h, a) for h in hosts
                                 if not any(s["host"] == h and s["end"] <= a for s in sw)))
        last = max(s["end"] for s in sw)
        out[item.service] = {
            "item": item.node, "after": deps,
            "ready_s": round(ready - t0, 3),
            "first_takedown_after_ready_s": round(rec["started_at"] - ready, 3),
            "first_switch_after_ready_s": round(sw[0]["start"] - ready, 3),
            "switches": len(sw),
            "switch_mean_s": round(statistics.fmean(s["dur"] for s in sw), 3),
            "switch_model_s": round(per_switch, 3),
            "stop_mean_s": round(statistics.fmean(s["stop_s"] for s in sw), 3),
            "start_mean_s": round(statistics.fmean(s["start_s"] for s in sw), 3),
            "healthy_mean_s": round(statistics.fmean(s["healthy_s"] for s in sw), 3),
            "switching_s": round(last - sw[0]["start"] - sum(b - a for a, b in holes), 3),
            "handoff_s": round(sum(b - a for a, b in holes), 3),
            "handoffs": len(holes),
            "handoff_max_s": round(max((b - a for a, b in holes), default=0.0), 3),
            "handoffs_no_free_host": no_free,
            "tail_s": round(run["done"][item.node] - last, 3),
            "done_s": round(run["done"][item.node] - t0, 3),
            "predicted_s": rec.get("predicted_s"),
            "actual_s": round(run["done"][item.node] - rec["started_at"], 3)}
    # The chain that ends last, from t0 to its end: every second is in one of these.
    chain = max(CHAINS, key=lambda c: run["done"][node_of[c[-1]]])
    parts = {"start_latency_s": out[chain[0]]["first_switch_after_ready_s"],
             "switching_s": 0.0, "handoff_s": 0.0, "tail_s": 0.0, "dependency_wake_s": 0.0}
    for i, svc in enumerate(chain):
        parts["switching_s"] += out[svc]["switching_s"]
        parts["handoff_s"] += out[svc]["handoff_s"]
        parts["tail_s"] += out[svc]["tail_s"]
        if i:
            parts["dependency_wake_s"] += out[svc]["first_switch_after_ready_s"]
    all_sw = [s for sw in everyone.values() for s in sw]
    mean = statistics.fmean(s["dur"] for s in all_sw)
    return {"chain": chain, "chain_parts": {k: round(v, 3) for k, v in parts.items()},
            "switch_mean_s": round(mean, 3), "switch_model_s": round(per_switch, 3),
            "per_switch_ratio": round(mean / per_switch, 3),
            "stop_mean_s": round(statistics.fmean(s["stop_s"] for s in all_sw), 3),
            "start_mean_s": round(statistics.fmean(s["start_s"] for s in all_sw), 3),
            "healthy_mean_s": round(statistics.fmean(s["healthy_s"] for s in all_sw), 3),
            "model": {k: round(v, 3) for k, v in model.items()},
            "items": out}


# -- the store's own record: ZooKeeper's transaction log ----------------------------------
# Every write the agents made, with the server's time (ms), read from the log files in the
# data directory (the format is ZooKeeper's, big-endian jute: a file header, then per
# transaction a checksum, a length, the header and the record, and a 0x42). Only the
# paths are taken: each record of the types below starts with its path.
TXN_NAMES = {1: "create", 2: "delete", 5: "set", 13: "check", 15: "create", 19: "create",
             21: "create"}
TXN_MULTI = 14


def _path_of(buf: bytes) -> str:
    (n,) = struct.unpack_from(">i", buf, 0)
    return buf[4:4 + n].decode()


def zk_txns(data_dir: Path) -> list[tuple[float, list[tuple[str, str]]]]:
    """[(server time in seconds, [(op, path), ...])] for every write, in order."""
    out = []
    files = sorted((data_dir / "version-2").glob("log.*"), key=lambda f: int(f.suffix[1:], 16))
    for f in files:
        raw = f.read_bytes()
        pos = 16  # magic, version, dbid
        while pos + 12 <= len(raw):
            _, length = struct.unpack_from(">qi", raw, pos)
            if length <= 0:
                break
            body = raw[pos + 12: pos + 12 + length]
            pos += 12 + length + 1  # the trailing 0x42
            _, _, _, ms, kind = struct.unpack_from(">qiqqi", body, 0)
            rec = body[32:]
            ops = []
            try:
                if kind == TXN_MULTI:
                    (count,) = struct.unpack_from(">i", rec, 0)
                    at = 4
                    for _ in range(count):
                        sub, n = struct.unpack_from(">ii", rec, at)
                        if sub in TXN_NAMES:
                            ops.append((TXN_NAMES[sub], _path_of(rec[at + 8: at + 8 + n])))
                        at += 8 + n
                elif kind in TXN_NAMES:
                    ops.append((TXN_NAMES[kind], _path_of(rec)))
            except (struct.error, UnicodeDecodeError):
                continue  # a record this reader does not know: its time is all we lose
            if ops:
                out.append((ms / 1e3, ops))
    return out


def handoffs(run: dict, records: dict[str, dict], txns: list, root: str) -> dict:
    """Each handoff between two switches of one item (host A's switch ended, host B's
    began), cut at the store's record of A's presence coming back (``rejoin``), B's gate
    commit (``gate``) and B leaving its other ready queues (``make_way``):

    ``after_switch``  A: from healthy to its presence written (local state, the commit)
    ``to_gate``       from A's presence to B's gate commit (notification, B's cycle, sync)
    ``make_way``      B: leaving the other queues, one delete each
    ``to_stop``       B: from there to its switch's start (preparing the symlinks)

    Seconds per item, summed over its handoffs, and the mean over all."""
    totals: dict[str, dict[str, float]] = {}
    for item in run["items"]:
        sw = _switches(records[item.node])
        svc = item.service
        parts = {"after_switch": 0.0, "to_gate": 0.0, "make_way": 0.0, "to_stop": 0.0,
                 "unmatched": 0}
        for a, b in zip(sw, sw[1:]):
            if b["start"] < a["end"]:
                continue  # overlapping switches (max_parallel > 1): no handoff
            pres = f"{root}/current/{svc}/{a['host']}"
            back = next((t for t, ops in txns if t >= a["end"] - 0.05 and
                         ("create", pres) in ops), None)
            mine = f"{root}/current/{svc}/{b['host']}"
            gate = next((t for t, ops in txns if a["end"] - 0.05 <= t <= b["start"] + 0.05
                         and ("delete", mine) in ops), None)
            if back is None or gate is None:
                parts["unmatched"] += 1
                continue
            prefix = f"{root}/staging/"
            way = [t for t, ops in txns if gate <= t <= b["start"] + 0.05 and
                   any(op == "delete" and p.startswith(prefix) and
                       p.rsplit("/", 1)[1].rpartition("-")[0] == b["host"] for op, p in ops)]
            left = max(way, default=gate)
            parts["after_switch"] += back - a["end"]
            parts["to_gate"] += gate - back
            parts["make_way"] += left - gate
            parts["to_stop"] += b["start"] - left
        totals[svc] = {k: round(v, 3) for k, v in parts.items()}
    n = sum(max(0, len(_switches(records[i.node])) - 1) for i in run["items"])
    mean = {k: round(sum(t[k] for t in totals.values()) / max(1, n), 3)
            for k in ("after_switch", "to_gate", "make_way", "to_stop")}
    return {"per_item": totals, "mean": mean}


def history_records(store, nodes) -> dict[str, dict]:
    records = {r["item"]: r for r in ops.history(store, 200)}
    return {n: records[n] for n in nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--max-parallel", type=int, default=1)
    parser.add_argument("--quorum", type=int, help="default: hosts - max_parallel")
    parser.add_argument("--healthy-secs", type=float, default=1.0)
    parser.add_argument("--host-parallel", type=int, default=1)
    parser.add_argument("--no-warmup", action="store_true",
                        help="no warm-up deploy: the plan has no history (its fallback)")
    parser.add_argument("--no-series", action="store_true",
                        help="skip the deploy in series (series_makespan_s: null)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="leave the work directory (every host's logs) and say where")
    parser.add_argument("--dump", help="write the history records and the store's writes "
                                       "of every deploy to this JSON file")
    args = parser.parse_args(argv)
    n = args.hosts
    quorum = args.quorum if args.quorum is not None else n - args.max_parallel
    if n < 2 or not 0 <= quorum < n:
        parser.error("need hosts >= 2 and 0 <= quorum < hosts")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    names = [s for chain in CHAINS for s in chain]
    specs = {s: {"quorum": quorum, "max_parallel": args.max_parallel,
                 "healthy_secs": args.healthy_secs,
                 "depends_on": [chain[chain.index(s) - 1]] if chain.index(s) else []}
             for chain in CHAINS for s in chain}
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-waves-"))
    zk = ZooKeeperServer(workdir / "zk", free_port())
    dc = None
    store = None
    try:
        zk.start()
        zk.wait_serving()
        url = f"zk://127.0.0.1:{zk.client_port}/dc"
        store = open_store(url)
        store.start()
        dc = Cluster(workdir, store, url, n, specs, poll_interval=5.0)
        port = add_calibration(dc, names[0])
        log(f"booting {n} hosts with services {', '.join(names)}")
        dc.boot({s: "1" for s in names}, timeout=180)
        stop_s, start_s, ready_s = calibrate(dc, port)
        switch = stop_s + start_s + ready_s
        k = min(args.max_parallel, n - quorum)
        per_service = math.ceil(n / k) * (switch + args.healthy_secs)
        dag_bound = max(len(chain) for chain in CHAINS) * per_service
        assert not read_queue(store)[0], "the queue must be empty before the deploy"
        result: dict = {"hosts": n, "services": len(names)}
        warm = None
        if not args.no_warmup:
            warm = deploy_and_time(dc, names, "2", log, in_series=False,
                                   host_parallel=args.host_parallel)
            log(f"warm-up makespan {warm['makespan']:.2f} s, load {warm['load']}")
        measured = "2" if warm is None else "3"
        stage_all(dc, names, measured)  # the plan predicts for the staged versions
        plan = plan_json(url, names, args.host_parallel)
        log(f"plan: total {plan['total_s']} s "
            f"({sorted({i['timing_source'] for i in plan['items']})})")
        predicted = {i["service"]: i["predicted_s"] for i in plan["items"]}
        run = deploy_and_time(dc, names, measured, log, in_series=False,
                              host_parallel=args.host_parallel, predicted=predicted,
                              staged=True, zk_pid=zk.proc.pid)
        log(f"makespan {run['makespan']:.2f} s, load {run['load']}")
        series = None
        if not args.no_series:
            series = deploy_and_time(dc, names, str(int(measured) + 1), log, in_series=True,
                                     host_parallel=args.host_parallel, zk_pid=zk.proc.pid)
        makespan = run["makespan"]
        model = {"stop_s": stop_s, "start_s": start_s, "ready_s": ready_s,
                 "healthy_s": args.healthy_secs}
        result.update({
            "makespan_s": round(makespan, 3), "dag_bound_s": round(dag_bound, 3),
            "ratio": round(makespan / dag_bound, 3),
            "series_makespan_s": round(series["makespan"], 3) if series else None,
            "predicted_s": round(plan["total_s"], 3) if plan["total_s"] is not None else None,
            "predicted_over_makespan": round(plan["total_s"] / makespan, 3)
            if plan["total_s"] is not None else None,
            "timing_source": sorted({i["timing_source"] for i in plan["items"]}),
            "warmup_makespan_s": round(warm["makespan"], 3) if warm else None,
            "load": {"warmup": warm["load"] if warm else None, "waves": run["load"],
                     "series": series["load"] if series else None}})
        bd = breakdown(run, history_records(store, [i.node for i in run["items"]]), model,
                       sorted(dc.hosts))
        result["per_switch_ratio"] = bd["per_switch_ratio"]
        # The same bound with each item's switches at what they cost in this deploy (the
        # recorded mean) instead of the calibration taken once before it: what is left
        # over is the protocol's coordination alone, whatever the load did meanwhile.
        recorded = max(sum(math.ceil(n / k) * bd["items"][s]["switch_mean_s"] for s in chain)
                       for chain in CHAINS)
        result["dag_bound_recorded_s"] = round(recorded, 3)
        result["ratio_recorded"] = round(makespan / recorded, 3)
        if series is not None:
            sbd = breakdown(series, history_records(store, [i.node for i in series["items"]]),
                            model, sorted(dc.hosts))
            result["series_per_switch_ratio"] = sbd["per_switch_ratio"]
            result["series_handoff_mean_s"] = round(statistics.fmean(
                i["handoff_s"] / i["handoffs"] for i in sbd["items"].values() if i["handoffs"]), 3)
        txns = zk_txns(zk.data_dir)
        bd["handoff_parts"] = handoffs(run, history_records(store, [i.node for i in run["items"]]),
                                       txns, store.root)
        result["breakdown"] = bd
        result["cpu"] = {"waves": run["cpu"], "series": series["cpu"] if series else None}
        if args.dump:
            Path(args.dump).write_text(json.dumps({
                "result": result, "txns": txns,
                "runs": {name: {"t0": r["t0"], "done": r["done"],
                                "records": history_records(store, [i.node for i in r["items"]])}
                         for name, r in (("warmup", warm), ("waves", run), ("series", series))
                         if r is not None}}))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"\nhosts {n}, services {len(names)} (chains "
                  f"{' '.join('<-'.join(c) for c in CHAINS)}), max_parallel "
                  f"{args.max_parallel}, quorum {quorum}, host_parallel {args.host_parallel}")
            print(f"switch cost (measured) stop {stop_s:.3f} s + start {start_s:.3f} s + "
                  f"ready {ready_s:.3f} s, healthy {args.healthy_secs:g} s, per-service "
                  f"bound {per_service:.2f} s")
            print(f"makespan {makespan:.2f} s (load {run['load']}), DAG bound "
                  f"{dag_bound:.2f} s, ratio {makespan / dag_bound:.3f}; predicted (plan) "
                  f"{result['predicted_s']} s; in series {result['series_makespan_s']} s")
            print(f"per switch: recorded {bd['switch_mean_s']} s, model "
                  f"{bd['switch_model_s']} s (ratio {bd['per_switch_ratio']})")
            print(f"chain {'<-'.join(bd['chain'])}: {bd['chain_parts']}")
            print(f"handoff, mean parts: {bd['handoff_parts']['mean']}")
            for svc, row in bd["items"].items():
                print(f"  {svc}: {row}")
        return 0
    finally:
        if dc is not None:
            dc.stop_all()
        if store is not None:
            store.stop()
        zk.kill()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
