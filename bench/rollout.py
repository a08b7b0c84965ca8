#!/usr/bin/env python3
"""Rolling-deploy makespan against the lower bound of docs/design.md §8, and store operations per
host upgrade.

N local hosts (real supervisord + agent each) and a chain of services (s1 <- s2 <- ...),
against a real single-node ZooKeeper. The switch cost (stop + start of one program through
supervisord) is measured in the same run, on one of the hosts, before the deploy:

    bound = sum over services of ceil(N / k) * (stop + start + healthy_secs),
    k = min(max_parallel, online - quorum)

Makespan runs from the creation of the first deploy item to the creation of the last
history node (ZooKeeper's own timestamps). Store operations are what the agents' clients
sent during the deploy (reads + writes, from each agent's status.json), per host upgrade.

    python bench/rollout.py [--hosts 10] [--services 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from supervisor_dcdeploy.lab.hostenv import host_rpc
from supervisor_dcdeploy.lab.localdc import Cluster, wait_for
from supervisor_dcdeploy.store import open_store
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port


def store_ops(dc: Cluster) -> int:
    total = 0
    for host in dc.hosts:
        counts = dc.host_status(host).get("store_ops", {})
        total += counts.get("reads", 0) + counts.get("writes", 0)
    return total


CALIBRATION = "calib"  # the same app as a program the agent does not manage


def add_calibration_program(dc: Cluster, svc: str) -> None:
    layout = dc.hosts["h0"]
    layout.extra_programs += f"""
[program:{CALIBRATION}]
command = {layout.python} {layout.root}/{svc}/current/app.py --port {free_port()} --bind 127.0.0.1
autostart = false
autorestart = false
startsecs = 1
stopwaitsecs = 5
"""


def measure_switch(dc: Cluster, rounds: int = 3) -> float:
    """Median seconds for stopProcess + startProcess(wait) of the same app, on a program
    the agent leaves alone (it would restart a stopped service of its own)."""
    rpc = host_rpc(dc.hosts["h0"]).supervisor
    rpc.startProcess(CALIBRATION, True)
    times = []
    for _ in range(rounds):
        t = time.monotonic()
        rpc.stopProcess(CALIBRATION, True)
        rpc.startProcess(CALIBRATION, True)
        times.append(time.monotonic() - t)
    rpc.stopProcess(CALIBRATION, True)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--services", type=int, default=2)
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--quorum", type=int, help="default: hosts - max_parallel")
    parser.add_argument("--healthy-secs", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    n, quorum = args.hosts, args.quorum if args.quorum is not None else \
        args.hosts - args.max_parallel
    if n < 2 or quorum >= n or args.services < 1:
        parser.error("need hosts >= 2, services >= 1 and quorum < hosts")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-bench-"))
    zk = ZooKeeperServer(workdir / "zk", free_port())
    dc = None
    store = None
    try:
        zk.start()
        zk.wait_serving()
        url = f"zk://127.0.0.1:{zk.client_port}/dc"
        store = open_store(url)
        store.start()
        names = [f"s{i + 1}" for i in range(args.services)]
        services = {name: {"quorum": quorum, "max_parallel": args.max_parallel,
                           "healthy_secs": args.healthy_secs,
                           "depends_on": [names[i - 1]] if i else []}
                    for i, name in enumerate(names)}
        dc = Cluster(workdir, store, url, n, services, poll_interval=5.0)
        add_calibration_program(dc, names[0])
        log(f"booting {n} hosts with services {', '.join(names)} (a dependency chain)")
        dc.boot({name: "1" for name in names}, timeout=120)
        switch = measure_switch(dc)
        for name in names:
            dc.stage(name, "2")
        wait_for(lambda: all(len(store.children(f"staging/{s}")) == n for s in names), 120,
                 "every host ready to roll")
        ops_before = store_ops(dc)
        start = time.time()
        items = dc.deploy(names)
        log(f"deploying {len(items)} services over {n} hosts ...")
        last = None
        deadline = time.monotonic() + 600
        while not dc.queue_empty():
            line = ", ".join(f"{s}: {sum(dc.version(h, s) == '2' for h in dc.hosts)}/{n}"
                             for s in names)
            if line != last:
                log(f"  {line}")
                last = line
            if time.monotonic() > deadline:
                log("did not converge in 600 s")
                return 1
            time.sleep(0.5)
        wait_for(lambda: all(dc.all_on(s, "2") for s in names), 30, "convergence")
        client = store.client  # ZooKeeper's own timestamp of the last history node
        end = max(client.get(f"{store.root}/history/{i.node}")[1].ctime for i in items) / 1e3
        # Agents publish their counters with their next cycle: wait until all have.
        wait_for(lambda: all((dc.hosts[h].root / "status.json").stat().st_mtime > end + 0.5
                             for h in dc.hosts), 30, "every agent's counters after the deploy")
        ops_after = store_ops(dc)
        makespan = end - start
        k = min(args.max_parallel, n - quorum)
        bound = args.services * math.ceil(n / k) * (switch + args.healthy_secs)
        upgrades = n * args.services
        result = {"hosts": n, "services": args.services, "makespan_s": round(makespan, 3),
                  "bound_s": round(bound, 3), "ratio": round(makespan / bound, 3),
                  "store_ops_per_upgrade": round((ops_after - ops_before) / upgrades, 1)}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"\nhosts {n}, services {args.services} (chain), max_parallel "
                  f"{args.max_parallel}, quorum {quorum}, k = {k}")
            print(f"switch cost (stop + start, measured) {switch:.3f} s, healthy "
                  f"{args.healthy_secs:g} s")
            print(f"makespan {makespan:.2f} s, lower bound {bound:.2f} s, "
                  f"ratio {makespan / bound:.2f}, coordination overhead "
                  f"{makespan - bound:.2f} s")
            print(f"store operations per host upgrade: {result['store_ops_per_upgrade']}")
        return 0
    finally:
        if dc is not None:
            dc.stop_all()
        if store is not None:
            store.stop()
        zk.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
