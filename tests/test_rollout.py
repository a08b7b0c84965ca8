"""End to end: real ZooKeeper, real supervisord processes, the real agent on every host.

Properties are asserted on what an independent prober recorded (>= 20 Hz) and on what the
store holds, never on log lines."""

from __future__ import annotations

import json
import uuid

import pytest
from cluster import Cluster, wait_for
from kazoo.security import Permissions
from fakeconsul import FakeConsul

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.localstate import read_state
from supervisor_dcdeploy.store import open_store

SERVICES = {"A": {"quorum": 3, "max_parallel": 2, "healthy_secs": 0.5},
            "B": {"quorum": 3, "max_parallel": 2, "healthy_secs": 0.5, "depends_on": ["A"]}}


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 5, SERVICES)
    try:
        yield c
    finally:
        c.stop_all()


def switch_slot(prober, host: str, svc: str, hold: float) -> tuple[float, float] | None:
    """(take-down, end of the healthy hold) of ``host``'s switch of ``svc`` from 1 to 2, as
    the prober saw it: the first sample not answering 1 after serving it, and the first
    sample answering 2 plus the hold."""
    seen = prober.seen(host, svc)
    down = next((t for (_, prev), (t, now) in zip(seen, seen[1:])
                 if prev == "1" and now != "1"), None)
    up = next((t for t, version in seen if version == "2"), None)
    return (down, up + hold) if down is not None and up is not None else None


def history_by_service(cluster: Cluster) -> dict[str, dict]:
    return {h["service"]: h for h in cluster.history()}


def item_done_time(cluster: Cluster, node: str) -> float:
    """When the agent moved the item to history (its wall clock, same machine)."""
    return json.loads(cluster.store.get(f"history/{node}")[0])["updated"]


@pytest.fixture(params=["zookeeper", "consul-fake", "zookeeper-tls-auth"])
def any_cluster(request, workdir, store_url):
    """The same data center on the real ZooKeeper, on the Consul backend against an
    in-process fake of Consul's HTTP API (not a real Consul: docs/consul.md), and on a
    ZooKeeper with mutual TLS, `dcdeploy init`'s ACLs and one credential per host (the
    operator's for the test's own writes)."""
    fake = None
    url = store_url
    host_url = None
    if request.param == "consul-fake":
        fake = FakeConsul().start()
        url = f"consul://{fake.address}/dc-{uuid.uuid4().hex[:12]}"
    elif request.param == "zookeeper-tls-auth":
        secure = request.getfixturevalue("secure_root")
        secure.init([f"h{i}" for i in range(5)])
        url, host_url = secure.url("operator"), secure.url
    st = open_store(url)
    st.start(timeout=15)
    # Switches held healthy for 1.5 s, so two hosts' switches overlap even on a loaded
    # machine and the parallelism check below can see it.
    c = Cluster(workdir, st, url, 5, {svc: {**spec, "healthy_secs": 1.5}
                                      for svc, spec in SERVICES.items()},
                host_store_url=host_url)
    c.owner_id = secure.digest if host_url else None  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop_all()
        st.stop()
        if fake is not None:
            fake.close()


def test_rolling_deploy_keeps_quorum_and_dependency_order(any_cluster):
    cluster = any_cluster
    cluster.boot({"A": "1", "B": "1"})
    prober = cluster.prober().start()
    try:
        cluster.stage("A", "2")
        cluster.stage("B", "2")
        items = ops.deploy(cluster.store, ["B", "A"])  # order comes from depends_on
        assert [i.service for i in items] == ["A", "B"]
        wait_for(lambda: cluster.queue_empty(), 120, "the deploy queue to empty")
        wait_for(lambda: cluster.all_on("A", "2") and cluster.all_on("B", "2"), 30,
                 "every host on A 2 and B 2")
    finally:
        prober.stop()
    assert prober.rate() >= 20, f"prober sampled at {prober.rate():.1f} Hz"
    assert prober.max_gap() < 0.5
    # S1: never fewer than quorum serving, for each service, in any sample.
    for svc, spec in SERVICES.items():
        worst = min(prober.serving(s, svc) for s in prober.samples)
        assert worst >= spec["quorum"], f"{svc}: only {worst} serving at one point"
    # The rollout really ran hosts in parallel (2 at once) and took hosts down: some two
    # hosts' gate slots overlapped. A slot is held from the take-down (the host stops
    # answering on 1) until its healthy hold on 2 ends; with max_parallel 1 the next host
    # could only go down after that. (Both down in the same instant is timing luck: each is
    # down for well under a second, so it is not what is checked.)
    hold = cluster.services["A"]["healthy_secs"]
    slots = sorted(switch_slot(prober, host, "A", hold) for host in cluster.hosts)
    assert all(slots), slots
    assert any(b[0] < a[1] - 0.5 for a, b in zip(slots, slots[1:])), slots  # 0.5 s margin
    #  for the prober's view of "healthy" against the agent's (25 ms samples, check delays)
    # S2: no host served B 2 before A's deploy item was done.
    hist = history_by_service(cluster)
    assert hist["A"]["state"] == "done" and hist["B"]["state"] == "done"
    a_done = item_done_time(cluster, items[0].node)
    b_first = prober.first_seen("B", "2")
    assert b_first is not None and b_first > a_done
    # Every gate pass for B named B's item (the gate node records the last one).
    gate = json.loads(cluster.store.get("gate/B")[0])
    assert gate["item"] == items[1].node and gate["online"] - 1 >= gate["quorum"]
    # L1: converged, queue empty, released versions recorded.
    status = cluster.status()
    assert status["deploy"] == []
    for svc in SERVICES:
        assert status["services"][svc]["versions"] == {"2": 5}
        assert status["services"][svc]["released"] == "2"
    if cluster.owner_id:  # TLS + ACLs: each agent wrote as itself, its nodes are its own
        for host in cluster.hosts:
            acl = {a.id.id: a.perms for a in cluster.store.get_acl(f"current/A/{host}")}
            assert acl[cluster.owner_id(host)] == Permissions.ALL
        assert not any(a.id.scheme == "world" for a in cluster.store.get_acl("deploy"))


def test_host_killed_mid_deploy_others_finish_and_it_recovers(cluster):
    cluster.boot({"A": "1", "B": "1"})
    cluster.stage("A", "2")
    wait_for(lambda: all(cluster.host_status(h).get("services", {}).get("A", {})
                         .get("fetch", {}).get("state") == "installed" for h in cluster.hosts),
             60, "every host to install A 2")
    # Put the victim last in line so that it is still on 1 when killed.
    ops.deploy(cluster.store, ["A"])
    wait_for(lambda: sum(cluster.version(h, "A") == "2" for h in cluster.hosts) >= 1, 60,
             "a first host on A 2")
    victim = next(h for h in sorted(cluster.hosts, reverse=True)
                  if cluster.version(h, "A") == "1")
    cluster.kill(victim)
    assert cluster.version(victim, "A") is None
    # L2: the others finish without it.
    wait_for(lambda: cluster.queue_empty(), 90, "the deploy to finish without the victim")
    others = [h for h in cluster.hosts if h != victim]
    assert cluster.all_on("A", "2", others)
    assert history_by_service(cluster)["A"]["state"] == "done"
    # Recovery: it comes back on the most popular version.
    cluster.start(victim)
    wait_for(lambda: cluster.version(victim, "A") == "2", 60, f"{victim} back on A 2")
    wait_for(lambda: victim in cluster.store.children("current/A"), 30,
             f"{victim} registered again")
    # B was never deployed: it comes back on its only version.
    wait_for(lambda: cluster.version(victim, "B") == "1", 30, f"{victim} back on B 1")


@pytest.fixture
def serial_cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 5, {"A": {"quorum": 3, "max_parallel": 1,
                                                     "healthy_secs": 0.5}})
    try:
        yield c
    finally:
        c.stop_all()


def test_failed_health_check_halts_and_fix_resumes(serial_cluster):
    cluster = serial_cluster
    cluster.boot({"A": "1"})
    prober = cluster.prober().start()
    try:
        cluster.stage("A", "2", broken=True)
        wait_for(lambda: len(cluster.store.children("staging/A")) == 5, 60,
                 "every host ready for the broken release")
        (item,) = ops.deploy(cluster.store, ["A"])
        failed = wait_for(lambda: next((d for d in cluster.status()["deploy"]
                                        if d["state"] == "failed"), None), 60,
                          "the deploy to fail")
        failed_host = json.loads(cluster.store.get(f"deploy/{item.node}")[0])["host"]
        assert failed_host in cluster.hosts and failed_host in failed["reason"]
        wait_for(lambda: cluster.version(failed_host, "A") == "1", 30,
                 f"{failed_host} back on 1")
        wait_for(lambda: failed_host in cluster.store.children("current/A"), 30,
                 f"{failed_host} registered on 1 again")
        # S4: halted. Nobody else takes the broken version; nothing moves while failed.
        gate_version = cluster.store.get("gate/A")[1]
        assert cluster.status()["deploy"][0]["state"] == "failed"
        assert cluster.store.get("gate/A")[1] == gate_version
        # The operator stages a fixed release and resumes: the item retargets to it.
        cluster.stage("A", "3")
        item2, retarget = ops.resume(cluster.store)
        assert retarget == "3"
        wait_for(lambda: cluster.queue_empty(), 120, "the fixed deploy to finish")
        assert cluster.all_on("A", "3")
    finally:
        prober.stop()
    others = set(cluster.hosts) - {failed_host}
    assert prober.first_seen("A", "2", others) is None, "another host served the broken 2"
    assert min(prober.serving(s, "A") for s in prober.samples) >= 3
    assert history_by_service(cluster)["A"]["state"] == "done"
    assert history_by_service(cluster)["A"]["version"] == "3"


def test_store_outage_keeps_serving_and_deploy_completes(cluster, zk_server):
    cluster.boot({"A": "1"})
    cluster.stage("A", "2")
    wait_for(lambda: len(cluster.store.children("staging/A")) == 5, 60,
             "every host ready for A 2")
    prober = cluster.prober().start()
    try:
        ops.deploy(cluster.store, ["A"])
        wait_for(lambda: sum(cluster.version(h, "A") == "2" for h in cluster.hosts) >= 1, 60,
                 "a first host on A 2")
        zk_server.kill()
        outage_start = prober.samples[-1].t
        # L3: a host rebooted while the store is down starts its last known version. With
        # the store away no switch starts, and one under way finishes: wait for that, so
        # the victim's last known (verified) version is settled before it is killed.
        def local(host: str) -> dict:
            return read_state(cluster.hosts[host].root)["services"]["A"]

        wait_for(lambda: all(local(h)["verified"] for h in cluster.hosts), 30,
                 "switches under way to finish")
        victim = "h4"
        before = local(victim)["active"]
        assert cluster.version(victim, "A") == before
        cluster.kill(victim)
        cluster.start(victim)
        wait_for(lambda: cluster.version(victim, "A") == before, 30,
                 f"{victim} serving {before} again with the store down")
        # Stay away for longer than the session timeout (4 s): wait on the prober's clock.
        wait_for(lambda: prober.samples[-1].t - outage_start > 10, 30, "10 s of outage")
        outage_end = prober.samples[-1].t
        zk_server.start()
        zk_server.wait_serving()
        wait_for(lambda: cluster.queue_empty(), 120, "the deploy to complete after the outage")
        wait_for(lambda: cluster.all_on("A", "2"), 30, "every host on A 2")
    finally:
        prober.stop()
        if not zk_server.running:  # the server is shared by the session: never leave it down
            zk_server.start()
            zk_server.wait_serving()
    during = [s for s in prober.samples if outage_start <= s.t <= outage_end]
    assert during, "no samples during the outage"
    # No service went below quorum while the store was away (the rebooted host aside: the
    # test took it down itself), and the others never stopped serving.
    for sample in during:
        assert prober.serving(sample, "A") >= 3
        for host in set(cluster.hosts) - {victim}:
            assert sample.versions[(host, "A")] is not None or \
                sample.t - outage_start < 5, f"{host} stopped serving during the outage"
    assert history_by_service(cluster)["A"]["state"] == "done"
