"""Canaries, end to end (issue 10 item 3): real ZooKeeper, supervisord and agents.

A release that passes its health check at the switch and fails it a few seconds later:
only the canaries ever serve it, they go back to the old version, the item fails with
the host and the reason. Then a good release, resumed, holds after its canaries until
``approve``, and the deploy finishes. What hosts served is what the prober saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster import Cluster, wait_for

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.lab.sample import build_release

SERVICES = {"A": {"quorum": 2, "max_parallel": 1, "healthy_secs": 0.5}}


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 4, SERVICES)
    try:
        yield c
    finally:
        c.stop_all()


def stage_built(cluster: Cluster, version: str, **kwargs) -> None:
    path, sha = build_release(cluster.artifacts, "A", version, **kwargs)
    ops.stage(cluster.store, "A", version, sha256=sha, urls=[f"file://{path}"],
              size=Path(path).stat().st_size, signer=cluster.signer)


def item(cluster: Cluster, node: str) -> dict:
    return json.loads(cluster.store.get(f"deploy/{node}")[0])


def test_failing_canary_rolls_back_then_good_release_approved(cluster):
    cluster.boot({"A": "1"})
    racks = {h: layout.rack for h, layout in cluster.hosts.items()}
    prober = cluster.prober().start()
    try:
        # Healthy for 3 s after each start: it passes the switch's check (0.5 s) and
        # fails during the soak.
        stage_built(cluster, "2", broken_after=3.0)
        wait_for(lambda: len(cluster.store.children("staging/A")) == 4, 60,
                 "every host ready for 2")
        (queued,) = ops.deploy(cluster.store, ["A"], signer=cluster.signer, canary=2,
                               soak_secs=120)
        failed = wait_for(lambda: (d := item(cluster, queued.node))["state"] == "failed"
                          and d, 90, "the canary to fail the item")
        canaries = failed["canaries"]
        assert len(canaries) == 2 and {racks[h] for h in canaries} == {"r0", "r1"}
        assert failed["rollback"] is True
        assert failed["host"] in canaries and failed["host"] in failed["reason"]
        assert "during the soak" in failed["reason"]
        wait_for(lambda: all(cluster.version(h, "A") == "1" for h in canaries), 60,
                 "the canaries back on 1")
        wait_for(lambda: set(cluster.store.children("current/A")) == set(cluster.hosts), 60,
                 "every host registered again")
        assert item(cluster, queued.node)["state"] == "failed"
        others = set(cluster.hosts) - set(canaries)
        served_bad = {h for h in cluster.hosts if prober.first_seen("A", "2", {h})}
        assert served_bad and served_bad <= set(canaries), served_bad

        # A good release, resumed: new canaries, held after them until approved.
        stage_built(cluster, "3")
        wait_for(lambda: sum(n.rpartition("-")[0] in cluster.hosts
                             for n in cluster.store.children("staging/A")) >= 4, 60,
                 "every host ready for 3")
        _, retarget = ops.resume(cluster.store, signer=cluster.signer)
        assert retarget == "3"
        held = wait_for(lambda: (d := item(cluster, queued.node)).get("canaries_done_at")
                        and d, 90, "the canaries on 3 and the soak started")
        canaries3 = held["canaries"]
        assert all(cluster.version(h, "A") == "3" for h in canaries3)
        rest = set(cluster.hosts) - set(canaries3)
        # The soak is 120 s: the others hold (one cycle after the stamp, still on 1).
        status = cluster.status()
        assert status["deploy"][0]["state"] == "rolling"
        assert status["deploy"][0]["reason"].startswith("canary: soaking")
        assert status["deploy"][0]["canaries"] == canaries3
        assert all(cluster.version(h, "A") == "1" for h in rest)
        ops.approve(cluster.store, "A", signer=cluster.signer)
        wait_for(cluster.queue_empty, 120, "the approved deploy to finish")
        assert cluster.all_on("A", "3")
    finally:
        prober.stop()
    assert prober.first_seen("A", "3", rest) > prober.first_seen("A", "3", set(canaries3))
    assert min(prober.serving(s, "A") for s in prober.samples) >= SERVICES["A"]["quorum"]
    assert all(prober.first_seen("A", "2", {h}) is None for h in others)
    record = json.loads(cluster.store.get(f"history/{queued.node}")[0])
    assert record["state"] == "done" and record["approved"] is True
