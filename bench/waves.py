#!/usr/bin/env python3
"""Parallel waves: the makespan of a deploy of many services against the DAG bound, and
against the same deploy with the queue in series (issue 10, "Measure").

10 local hosts (real supervisord + agent each, real single-node ZooKeeper), every service on
every host; services in two chains (x1 <- x2 <- x3, y1 <- y2) plus three independent ones
(z1, z2, z3). The switch cost (stop + start through supervisord) is measured first, as in
bench/rollout.py, then:

    per-service bound = ceil(N / k) * (switch + healthy_secs), k = min(max_parallel, N - quorum)
    dag_bound_s       = the longest chain of per-service bounds (here 3 of them)

``makespan_s``: the deploy of every service to version 2 (items with ``after``, as
``dcdeploy deploy`` writes them), from the creation of the first item to the creation of
the last history node (ZooKeeper's timestamps). ``series_makespan_s``: the same deploy to
version 3 with items in series (``ops.deploy(in_series=True)``: no ``after``).
``predicted_s``: ``policy.plan`` on the fleet before the deploy, with the measured switch
cost given as each service's timing (no recorded history here).

    python bench/waves.py [--hosts 10] [--max-parallel 1] [--healthy-secs 1] [--json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import add_calibration_program, measure_switch  # noqa: E402

from supervisor_dcdeploy import ops, policy  # noqa: E402
from supervisor_dcdeploy.lab.localdc import Cluster, wait_for  # noqa: E402
from supervisor_dcdeploy.snapshot import read_queue  # noqa: E402
from supervisor_dcdeploy.store import open_store  # noqa: E402
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port  # noqa: E402

CHAINS = [["x1", "x2", "x3"], ["y1", "y2"], ["z1"], ["z2"], ["z3"]]


def deploy_and_time(dc: Cluster, names: list[str], version: str, log, *,
                    in_series: bool, host_parallel: int | None) -> float:
    """Deploy ``version`` of every service; seconds from the first item's creation to the
    last history node's (ZooKeeper's clock)."""
    store = dc.store
    for name in names:
        dc.stage(name, version)
    wait_for(lambda: all(sorted(ops.status(store)["services"][s]["staging"]) ==
                         sorted(dc.hosts) for s in names), 180, f"every host ready for {version}")
    items = ops.deploy(store, names, signer=dc.signer, in_series=in_series,
                       host_parallel=host_parallel)
    client = store.client
    start = min(client.get(f"{store.root}/deploy/{i.node}")[1].ctime for i in items) / 1e3
    log(f"deploying {len(items)} services to {version} "
        f"({'in series' if in_series else 'in waves'}) ...")
    deadline = time.monotonic() + 900
    last = None
    while not dc.queue_empty():
        line = " ".join(f"{s}:{sum(dc.version(h, s) == version for h in dc.hosts)}"
                        for s in names)
        if line != last:
            log(f"  {line}")
            last = line
        if time.monotonic() > deadline:
            raise TimeoutError(f"the deploy to {version} did not finish in 900 s")
        time.sleep(0.5)
    wait_for(lambda: all(dc.all_on(s, version) for s in names), 30, "convergence")
    end = max(client.get(f"{store.root}/history/{i.node}")[1].ctime for i in items) / 1e3
    return end - start


def predicted(dc: Cluster, names: list[str], specs: dict, switch: float, healthy: float,
              host_parallel: int) -> dict:
    """``policy.plan`` on the fleet as it is now, for a deploy of every service to 2."""
    queue = [policy.DeployItem(node=f"item-{i:010d}", seq=i, service=s, version="2",
                               after=tuple(sorted(specs[s]["depends_on"])))
             for i, s in enumerate(names)]
    services = {}
    for s in names:
        services[s] = policy.ServiceState(
            name=s, quorum=specs[s]["quorum"], max_parallel=specs[s]["max_parallel"],
            depends_on=tuple(specs[s]["depends_on"]),
            racks={h: dc.hosts[h].rack for h in dc.hosts},
            online={h: "1" for h in dc.hosts}, target="2")
    timings = [policy.SwitchTiming(service=s, host="h0", version="1", stop_s=switch / 2,
                                   start_s=switch / 2, healthy_s=healthy) for s in names]
    return policy.plan(policy.GateView(services, queue, host_parallel), timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--max-parallel", type=int, default=1)
    parser.add_argument("--quorum", type=int, help="default: hosts - max_parallel")
    parser.add_argument("--healthy-secs", type=float, default=1.0)
    parser.add_argument("--host-parallel", type=int, default=1)
    parser.add_argument("--no-series", action="store_true",
                        help="skip the deploy in series (series_makespan_s: null)")
    parser.add_argument("--json", action="store_true")
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
        add_calibration_program(dc, names[0])
        log(f"booting {n} hosts with services {', '.join(names)}")
        dc.boot({s: "1" for s in names}, timeout=180)
        switch = measure_switch(dc)
        k = min(args.max_parallel, n - quorum)
        per_service = math.ceil(n / k) * (switch + args.healthy_secs)
        dag_bound = max(len(chain) for chain in CHAINS) * per_service
        plan = predicted(dc, names, specs, switch, args.healthy_secs, args.host_parallel)
        assert not read_queue(store)[0], "the queue must be empty before the deploy"
        makespan = deploy_and_time(dc, names, "2", log, in_series=False,
                                   host_parallel=args.host_parallel)
        series = None
        if not args.no_series:
            series = deploy_and_time(dc, names, "3", log, in_series=True,
                                     host_parallel=args.host_parallel)
        result = {"hosts": n, "services": len(names), "makespan_s": round(makespan, 3),
                  "dag_bound_s": round(dag_bound, 3), "ratio": round(makespan / dag_bound, 3),
                  "series_makespan_s": round(series, 3) if series is not None else None,
                  "predicted_s": round(plan["total_s"], 3)}
        if series is not None:
            # The series run's seconds per batch (coordination and a loaded machine
            # included), and the waves run against the chain at that pace: what waves cost
            # beyond what every switch costs anyway.
            batches = len(names) * math.ceil(n / k)
            per_batch = series / batches
            result["series_per_batch_s"] = round(per_batch, 3)
            result["ratio_vs_series_pace"] = round(
                makespan / (max(len(c) for c in CHAINS) * math.ceil(n / k) * per_batch), 3)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"\nhosts {n}, services {len(names)} (chains "
                  f"{' '.join('<-'.join(c) for c in CHAINS)}), max_parallel "
                  f"{args.max_parallel}, quorum {quorum}, host_parallel {args.host_parallel}")
            print(f"switch cost (stop + start, measured) {switch:.3f} s, healthy "
                  f"{args.healthy_secs:g} s, per-service bound {per_service:.2f} s")
            print(f"makespan {makespan:.2f} s, DAG bound {dag_bound:.2f} s, ratio "
                  f"{makespan / dag_bound:.2f}; in series {result['series_makespan_s']} s; "
                  f"predicted (plan) {plan['total_s']:.2f} s")
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
