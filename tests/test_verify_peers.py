"""Quorum verified by probes, end to end (issue 10 item 5): real ZooKeeper, supervisord
and agents. A host ``kill -9``ed while at the front of the ready queue keeps its presence
and its queue entry until its session expires; with ``verify_peers`` the next take-down
does not count it as online and does not leave it a ``max_parallel`` slot."""

from __future__ import annotations

import json

import pytest
from cluster import Cluster, wait_for

SERVICES = {"A": {"quorum": 2, "max_parallel": 2, "healthy_secs": 2.0, "verify_peers": True}}


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 5, SERVICES)
    for layout in c.hosts.values():
        # A long session: the dead host's presence outlives the whole check, so every
        # take-down below happens before it expires.
        layout.session_timeout = 30.0
        layout.agent_extra["probe_address"] = layout.address
    try:
        yield c
    finally:
        c.stop_all()


def test_killed_host_is_not_online_and_holds_no_slot(cluster):
    cluster.boot({"A": "1"})
    presences = {h: json.loads(cluster.store.get(f"current/A/{h}")[0])
                 for h in cluster.hosts}
    assert all(p["probe"].startswith("http://127.0.0.1:") for p in presences.values())
    cluster.stage("A", "2")
    wait_for(lambda: len(cluster.store.children("staging/A")) == 5, 60,
             "every host ready for 2")
    entries = sorted(cluster.store.children("staging/A"), key=lambda n: n.rpartition("-")[2])
    killed = entries[0].rpartition("-")[0]  # first in the queue: it holds a slot
    cluster.kill(killed)
    live = [h for h in cluster.hosts if h != killed]
    prober = cluster.prober().start()
    try:
        cluster.deploy(["A"])
        wait_for(lambda: cluster.all_on("A", "2", live), 90, "every live host on 2")

        def gates():
            return {h: cluster.host_status(h).get("services", {}).get("A", {}).get(
                "verify_peers") for h in live}
        # status.json is written at the end of the cycle that switched (after the hold)
        wait_for(lambda: all(g and g["passed"] for g in gates().values()), 30,
                 "every live host's status after its verified take-down")
        # Still before its session expired: its presence and queue entry are there.
        assert killed in cluster.store.children("current/A")
        assert any(n.startswith(f"{killed}-") for n in cluster.store.children("staging/A"))
    finally:
        prober.stop()
    gates = gates()
    # A host that passed the gate after our read may be silent too (it is stopping): the
    # commit then fails on the gate's version and the next try reads afresh.
    assert all(killed in g["silent"] for g in gates.values()), gates
    # Someone behind the dead host went on a slot it would have held: its place in the
    # queue was max_parallel or more, and below once the silent host was left out.
    assert any(g["position"] >= 2 > g["verified_position"] for g in gates.values()), gates
    assert all(g["probes"] >= 1 for g in gates.values())
    live_endpoints = [s for s in prober.samples]
    assert min(sum(1 for (h, svc), v in s.versions.items() if h in live and v is not None)
               for s in live_endpoints) >= SERVICES["A"]["quorum"]
