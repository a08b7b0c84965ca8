"""Parallel waves and rack budgets end to end (issue 10, items 1 and 2): real ZooKeeper, one
supervisord + agent per host, the sample service, judged on an independent prober (every
endpoint at >= 20 Hz, a timeout counting as not serving) and on the store's history.

6 hosts in 2 racks (h0 h2 h4 in r0, h1 h3 h5 in r1); services a -> b (b depends on a), c
and d independent, deployed together. a, b and c have ``max_down_per_rack`` 1 (with
``max_parallel`` 2: one host of each rack at a time); d has ``--rack-order r1,r0``.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from cluster import Cluster, wait_for
from test_quorum_binds import check_coverage

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.policy import Policy

HOSTS = 6
QUORUM = 3
HOLD = 0.5
K = 1
BUDGET = {"quorum": QUORUM, "max_parallel": 2, "healthy_secs": HOLD,
          "policy": Policy(max_down_per_rack=K)}
SERVICES = {"a": BUDGET, "b": {**BUDGET, "depends_on": ["a"]}, "c": BUDGET,
            "d": {"quorum": QUORUM, "max_parallel": 2, "healthy_secs": HOLD,
                  "policy": Policy(rack_order=True, rack_names=("r1", "r0"))}}


@pytest.fixture
def dc(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, HOSTS, SERVICES, racks=2)
    try:
        yield c
    finally:
        c.stop_all()


def rack(host: str) -> str:
    return f"r{int(host[1:]) % 2}"


def first_down(prober, host: str, svc: str) -> float | None:
    """The first sample where ``host`` stopped answering version 1 of ``svc``."""
    seen = prober.seen(host, svc)
    return next((t for (_, prev), (t, now) in zip(seen, seen[1:])
                 if prev == "1" and now != "1"), None)


def first_up(prober, host: str, svc: str) -> float | None:
    return next((t for t, v in prober.seen(host, svc) if v == "2"), None)


def done_at(dc: Cluster, node: str) -> float:
    """When the agent moved the item to history (its wall clock, same machine)."""
    return json.loads(dc.store.get(f"history/{node}")[0])["updated"]


def test_independent_items_roll_at_once_edges_and_rack_budgets_hold(dc, record_property):
    dc.boot({svc: "1" for svc in SERVICES})
    for svc in SERVICES:
        dc.stage(svc, "2")
    wait_for(lambda: all(set(ops.status(dc.store)["services"][s]["staging"]) == set(dc.hosts)
                         for s in SERVICES), 90, "every host ready for every service's 2")
    prober = dc.prober(hz=60.0).start()  # 24 endpoints on a shared machine: margin over 20
    t0 = time.time()
    try:
        items = {i.service: i.node for i in dc.deploy(sorted(SERVICES))}
        wait_for(dc.queue_empty, 240, "the deploy to finish")
        wait_for(lambda: all(dc.all_on(s, "2") for s in SERVICES), 30, "every host on 2")
    finally:
        t1 = time.time()
        prober.stop()
    for key, value in check_coverage(prober, t0, t1).items():
        record_property(key, value)
    judged = [s for s in prober.samples if t0 <= s.t <= t1]

    # S1 for every service: at least quorum hosts answer at every sample.
    for svc in SERVICES:
        worst = min(prober.serving(s, svc) for s in judged)
        assert worst >= QUORUM, f"S1 {svc}: only {worst} serving"

    # At most K hosts of one rack down at once, for each service with a rack budget.
    for svc in ("a", "b", "c"):
        for sample in judged:
            down = Counter(rack(h) for (h, s), v in sample.versions.items()
                           if s == svc and v is None)
            assert max(down.values(), default=0) <= K, \
                f"{svc}: {dict(down)} hosts down per rack at t={sample.t:.3f}"

    done = {svc: done_at(dc, node) for svc, node in items.items()}
    starts = {svc: min(first_down(prober, h, svc) for h in dc.hosts) for svc in SERVICES}
    record_property("makespan_s", round(max(done.values()) - t0, 2))

    # S2 for the edge a -> b: no host serves b 2 before a's item is done.
    first_b = prober.first_seen("b", "2")
    assert first_b is not None and first_b >= done["a"], \
        f"b 2 served at {first_b:.3f}, a's item done at {done['a']:.3f}"

    # a, c and d roll at the same time: each started before the others were done.
    for x in ("a", "c", "d"):
        for y in ("a", "c", "d"):
            assert starts[x] < done[y], f"{x} started after {y}'s item was done: in series"

    # --rack-order r1,r0 for d: no r0 host goes down before every r1 host serves d 2.
    r1_done = max(first_up(prober, h, "d") for h in dc.hosts if rack(h) == "r1")
    r0_first = min(first_down(prober, h, "d") for h in dc.hosts if rack(h) == "r0")
    assert r0_first > r1_done, (f"d: rack r0 started at {r0_first:.3f}, before rack r1 was "
                                f"done at {r1_done:.3f}")


# -- the operator's flags (no hosts needed) -------------------------------------------

SHA = "c" * 64


def test_cli_policy_flags_and_host_parallel_are_stored(run, store):
    assert run("service", "set", "a", "--quorum", "1")[0] == 0
    code, out, err = run("service", "set", "b", "--quorum", "1", "--depends-on", "a",
                         "--max-down-per-rack", "2", "--rack-order", "r1,r0")
    assert code == 0, err
    spec = json.loads(store.get("services/b")[0])
    assert spec["max_down_per_rack"] == 2 and spec["rack_order"] == ["r1", "r0"]
    assert run("service", "set", "c", "--quorum", "1", "--rack-order")[0] == 0
    assert json.loads(store.get("services/c")[0])["rack_order"] is True
    assert "max_down_per_rack" not in json.loads(store.get("services/a")[0])
    for svc in ("a", "b", "c"):
        assert run("stage", svc, "2", "--url", "file:///x", "--sha256", SHA)[0] == 0
    code, out, err = run("deploy", "c", "b", "a", "--host-parallel", "2")
    assert code == 0, err
    items = {json.loads(store.get(f"deploy/{n}")[0])["service"]:
             json.loads(store.get(f"deploy/{n}")[0]) for n in store.children("deploy")}
    assert items["b"]["after"] == ["a"] and items["a"]["after"] == [] \
        and items["c"]["after"] == []
    assert {i["host_parallel"] for i in items.values()} == {2}


@pytest.mark.parametrize("argv,fragment", [
    (("service", "set", "x", "--quorum", "1", "--max-down-per-rack", "0"),
     "--max-down-per-rack"),
    (("service", "set", "x", "--quorum", "1", "--rack-order", "r1,r1"), "names a rack twice"),
    (("service", "set", "x", "--quorum", "1", "--rack-order", "r 1"), "not a valid name"),
    (("deploy", "x", "--host-parallel", "0"), "host_parallel"),
])
def test_cli_refuses_bad_policy_values(run, argv, fragment):
    code, _, err = run(*argv)
    assert code != 0 and fragment in err, err


def test_pause_stops_every_item_and_resume_continues_them(run, store):
    """Independent items roll at the same time, so pausing only the first would let the
    others go on taking hosts down."""
    for svc in ("a", "c"):
        assert run("service", "set", svc, "--quorum", "1")[0] == 0
        assert run("stage", svc, "2", "--url", "file:///x", "--sha256", SHA)[0] == 0
    assert run("deploy", "a", "c")[0] == 0

    def states():
        return sorted(json.loads(store.get(f"deploy/{n}")[0])["state"]
                      for n in store.children("deploy"))

    code, out, err = run("pause")
    assert code == 0, err
    assert states() == ["paused", "paused"]
    code, out, err = run("resume")
    assert code == 0, err
    assert states() == ["rolling", "rolling"]
