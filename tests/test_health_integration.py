"""Through the real agent, on real ZooKeeper and real supervisord: a health check written
into the store runs nothing; a check defined in the hosts' agent.conf gates a deploy
(docs/protocol.md, "Health checks")."""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from pathlib import Path

import pytest
from cluster import Cluster, wait_for

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.lab.hostenv import host_rpc
from supervisor_dcdeploy.model import DeployItem, HealthCheck, dumps


def pids(cluster: Cluster) -> dict[tuple[str, str], int]:
    """Every host's supervisord children (the agent and the services) by name."""
    return {(h, p["name"]): p["pid"] for h, layout in cluster.hosts.items()
            for p in host_rpc(layout).supervisor.getAllProcessInfo()}


def item_state(cluster: Cluster) -> list[dict]:
    return [json.loads(cluster.store.get(f"deploy/{node}")[0])
            for node in sorted(cluster.store.children("deploy"))]


@pytest.fixture
def marker() -> Path:
    path = Path("/tmp") / f"pwned-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


def test_a_health_command_in_the_store_runs_nothing(workdir, store, store_url, marker):
    cluster = Cluster(workdir, store, store_url, 3, {"A": {"quorum": 1, "max_parallel": 1}})
    try:
        cluster.boot({"A": "1"})
        cluster.stage("A", "2")
        wait_for(lambda: len(cluster.store.children("staging/A")) == 3, 60,
                 "every host to fetch 2 and join the ready queue")
        before = pids(cluster)
        assert all(pid > 0 for pid in before.values())

        # The attack of issue 8: a shell command as the health check, and a deploy that
        # would make every host run it after switching.
        evil = {"program": "A", "quorum": 1, "max_parallel": 3,
                "health": {"kind": "cmd", "target": f"touch {marker}"}}
        cluster.store.set("services/A", dumps(evil))
        # The item is signed by the operator's key, so what stops the attack below is the
        # health rule, not the signature check.
        item = ops._sign(DeployItem(node="item-", seq=-1, service="A", version="2"),
                         cluster.signer, None, [])
        cluster.store.create("deploy/item-", item.to_json(), sequential=True)

        def reported(host: str) -> bool:
            svc = cluster.host_status(host).get("services", {}).get("A", {})
            return any("services/A" in p and "health.target" in p
                       for p in svc.get("invalid") or [])

        wait_for(lambda: all(reported(h) for h in cluster.hosts), 30,
                 "every host to report the refused health command")
        problems = ops.status(cluster.store)["problems"]
        assert any("services/A" in p and "never run" in p for p in problems)
        assert not marker.exists()
        assert cluster.all_on("A", "1") and pids(cluster) == before

        # The same through the new form: it can only name a local check, and no host
        # defines one called "ready": each host says so, and the deploy fails at the gate
        # with that reason instead of stopping what runs.
        ops.service_set(cluster.store, "A", program="A", quorum=1, max_parallel=3,
                        health=HealthCheck(kind="cmd", check="ready"), signer=cluster.signer)
        wait_for(lambda: all("[check:ready]" in (cluster.host_status(h)["services"]["A"]
                                                 .get("health_problem") or "")
                             for h in cluster.hosts), 30,
                 "every host to report the undefined local check")
        wait_for(lambda: item_state(cluster)[0]["state"] == "failed", 30,
                 "the deploy to fail at the gate")
        item = item_state(cluster)[0]
        assert "cannot check 2" in item["reason"] and "[check:ready]" in item["reason"]
        assert not marker.exists()
        assert cluster.all_on("A", "1") and pids(cluster) == before
        assert sorted(cluster.store.children("current/A")) == sorted(cluster.hosts)
        assert all(cluster.host_status(h)["services"]["A"]["process"] == "RUNNING"
                   for h in cluster.hosts)
        assert ops.abort(cluster.store)
    finally:
        cluster.stop_all()


def test_a_local_argv_check_gates_a_deploy(workdir, store, store_url):
    check = HealthCheck(kind="cmd", check="ready", timeout=5.0)
    cluster = Cluster(workdir, store, store_url, 3,
                      {"A": {"quorum": 1, "max_parallel": 1, "health": check}})
    probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)"
    argv = shlex.join([sys.executable, "-c", probe]) + " http://127.0.0.1:{port}/health"
    for layout in cluster.hosts.values():
        layout.agent_sections["check:ready"] = {"argv": argv, "timeout": "4"}
    try:
        cluster.boot({"A": "1"})
        assert all(cluster.host_status(h)["services"]["A"].get("health_problem") is None
                   for h in cluster.hosts)
        cluster.stage("A", "2")
        wait_for(lambda: len(cluster.store.children("staging/A")) == 3, 60,
                 "every host ready to roll 2")
        ops.deploy(cluster.store, ["A"])
        wait_for(cluster.queue_empty, 90, "the deploy of 2 to complete")
        assert cluster.all_on("A", "2")

        # A release whose /health answers 500 fails the local check: the first host rolls
        # back and the item fails with the check's reason.
        cluster.stage("A", "3", broken=True)
        wait_for(lambda: len(cluster.store.children("staging/A")) == 3, 60,
                 "every host ready to roll 3")
        ops.deploy(cluster.store, ["A"])
        wait_for(lambda: item_state(cluster) and item_state(cluster)[0]["state"] == "failed",
                 90, "the broken release to fail its check")
        reason = item_state(cluster)[0]["reason"]
        assert "check 'ready'" in reason and "exited 1" in reason
        wait_for(lambda: cluster.all_on("A", "2"), 30, "every host back on 2")
    finally:
        cluster.stop_all()
