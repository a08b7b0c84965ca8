"""``deploy --host-parallel N`` and the deploy-level rack overrides end to end (issue 10):
real ZooKeeper, one supervisord + agent per host, the sample service.

Judged on the switch windows the agents record (each host's ``switch`` timing, copied
into the done item's history record: the switch's start just after the gate commit, to
the health check having held) and on an independent prober for quorum (S1).
"""

from __future__ import annotations

import time

import pytest
from cluster import Cluster, Prober, wait_for

from supervisor_dcdeploy import ops

# Recorded seconds are rounded to 1 ms (three of them per window): two windows count as
# overlapping only beyond this. It is the records' resolution, not a performance bound.
EPS = 0.005


def windows(dc: Cluster, nodes: dict[str, str]) -> dict[tuple[str, str], tuple[float, float]]:
    """(host, service) -> (start, end) of its switch, from the items' history records."""
    records = {r["item"]: r for r in dc.history()}
    out = {}
    for svc, node in nodes.items():
        timings = records[node].get("timings") or []
        for t in timings:
            total = t["stop_s"] + t["start_s"] + t["healthy_s"]
            out[(t["host"], svc)] = (t["at"] - total, t["at"])
    return out


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def ready_everywhere(dc: Cluster, services) -> None:
    wait_for(lambda: all(set(ops.status(dc.store)["services"][s]["staging"]) == set(dc.hosts)
                         for s in services), 120, "every host ready for the staged versions")


def deploy_and_judge(dc: Cluster, services, quorum: int, **deploy_args):
    """Deploy ``services`` (staged and ready), wait for the end, check S1 on the prober;
    returns {service: item node} and the switch windows."""
    prober = Prober(dc.endpoints(), hz=40.0, timeout=1.0).start()
    t0 = time.time()
    try:
        items = ops.deploy(dc.store, list(services), signer=dc.signer, **deploy_args)
        wait_for(dc.queue_empty, 240, "the deploy to finish")
    finally:
        t1 = time.time()
        prober.stop()
    judged = [s for s in prober.samples if t0 <= s.t <= t1]
    assert len(judged) > 10, "the prober hardly ran"
    for svc in services:
        worst = min(prober.serving(s, svc) for s in judged)
        assert worst >= quorum, f"S1 {svc}: only {worst} serving"
    nodes = {i.service: i.node for i in items}
    win = windows(dc, nodes)
    assert {h for h, _ in win} == set(dc.hosts), f"switch timings missing: {sorted(win)}"
    return nodes, win, judged


# -- --host-parallel --------------------------------------------------------------------

HP_HOSTS = 3
HP_QUORUM = 1
# Two independent services, each may take 2 of 3 hosts down at once: by pigeonhole one
# host is among the first two of both ready queues, so it is offered both switches at once.
HP_SPEC = {"quorum": HP_QUORUM, "max_parallel": 2, "healthy_secs": 1.0}


@pytest.fixture
def hp_dc(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, HP_HOSTS, {"x": HP_SPEC, "y": HP_SPEC}, racks=1)
    try:
        yield c
    finally:
        c.stop_all()


def test_host_parallel_2_switches_two_services_of_a_host_at_once_default_never(
        hp_dc, record_property):
    dc = hp_dc
    dc.boot({"x": "1", "y": "1"})

    # --host-parallel 2: some host has both services down at the same time.
    for svc in ("x", "y"):
        dc.stage(svc, "2")
    ready_everywhere(dc, ("x", "y"))
    nodes, win, judged = deploy_and_judge(dc, ("x", "y"), HP_QUORUM, host_parallel=2)
    both = {h: overlap(win[(h, "x")], win[(h, "y")]) for h in dc.hosts}
    record_property("hp2_overlap_s", {h: round(v, 3) for h, v in both.items()})
    record_property("hp2_prober_both_down_samples", sum(
        1 for s in judged for h in dc.hosts
        if s.versions[(h, "x")] is None and s.versions[(h, "y")] is None))
    assert any(v > EPS for v in both.values()), \
        f"no host switched x and y at once with --host-parallel 2: {win}"
    assert all(dc.all_on(s, "2") for s in ("x", "y"))

    # Default (1): no host ever has both down at once.
    for svc in ("x", "y"):
        dc.stage(svc, "3")
    ready_everywhere(dc, ("x", "y"))
    nodes, win, judged = deploy_and_judge(dc, ("x", "y"), HP_QUORUM)
    both = {h: overlap(win[(h, "x")], win[(h, "y")]) for h in dc.hosts}
    record_property("hp1_overlap_s", {h: round(v, 3) for h, v in both.items()})
    assert all(v <= EPS for v in both.values()), \
        f"a host switched x and y at once with the default host_parallel 1: {both} {win}"
    assert all(dc.all_on(s, "3") for s in ("x", "y"))


# -- deploy-level rack overrides ----------------------------------------------------------

RACK_HOSTS = 4  # h0 h2 in r0, h1 h3 in r1
RACK_QUORUM = 1
# The spec has no rack policy and lets 2 of 4 hosts go at once: only the deploy's
# override keeps one host per rack and rack r1 first.
RACK_SPEC = {"quorum": RACK_QUORUM, "max_parallel": 2, "healthy_secs": 1.0}


@pytest.fixture
def rack_dc(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, RACK_HOSTS, {"z": RACK_SPEC}, racks=2)
    try:
        yield c
    finally:
        c.stop_all()


def test_deploy_rack_overrides_are_obeyed(rack_dc, record_property):
    dc = rack_dc
    dc.boot({"z": "1"})
    dc.stage("z", "2")
    ready_everywhere(dc, ("z",))
    nodes, win, _ = deploy_and_judge(dc, ("z",), RACK_QUORUM, max_down_per_rack=1,
                                     rack_order=["r1", "r0"])
    record = next(r for r in dc.history() if r["item"] == nodes["z"])
    assert record["max_down_per_rack"] == 1 and record["rack_order"] == ["r1", "r0"]
    by_rack = {r: [win[(h, "z")] for h in dc.hosts if dc.hosts[h].rack == r]
               for r in ("r0", "r1")}
    record_property("windows", {f"{h}": [round(x, 3) for x in w] for (h, _), w in win.items()})
    # --rack-order r1,r0: no r0 host starts its switch before every r1 host ended its own.
    r1_end = max(end for _, end in by_rack["r1"])
    r0_start = min(start for start, _ in by_rack["r0"])
    assert r0_start >= r1_end - EPS, \
        f"rack r0 started at {r0_start:.3f}, before rack r1 was done at {r1_end:.3f}"
    # --max-down-per-rack 1: the two hosts of a rack never switch at once.
    for r, (a, b) in by_rack.items():
        assert overlap(a, b) <= EPS, f"rack {r}: two hosts switching at once: {a} {b}"
    assert dc.all_on("z", "2")
