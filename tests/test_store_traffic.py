"""Store traffic per host stays flat in the fleet's size (issue 9, item 2), counted by
ZooKeeper itself: ``mntr``'s per-namespace read and write request counters for this test's
root (session pings are not requests there).

Real agents (each its own ZooKeeper session, the real reconcile code and mirror); only
supervisord is a stub, as in test_quorum_binds.py, so ten hosts fit in one process.
Targets: at most 10 requests per host upgrade, at most 0.2 requests/s per host idle.
``DCDEPLOY_TRAFFIC_HOSTS`` runs it at another fleet size (30 for the numbers in the
report); the limits do not change with it.
"""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import urlsplit

import pytest
from cluster import wait_for

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.lab.zkserver import namespace_requests

HOSTS = int(os.environ.get("DCDEPLOY_TRAFFIC_HOSTS", "10"))
PER_UPGRADE = 10
IDLE_PER_HOST_S = 0.2
IDLE_SECS = 60.0


class InstantSupervisor:
    """supervisord for one program that is always running; stop and start are instant."""

    def __init__(self) -> None:
        self.running = True

    def state(self, program: str) -> str:
        return "RUNNING" if self.running else "STOPPED"

    def stop(self, program: str) -> None:
        self.running = False

    def start(self, program: str) -> None:
        self.running = True


@pytest.fixture
def fleet(workdir, store, store_url, zk_server):
    ops.service_set(store, "A", program="A", quorum=HOSTS - 1, max_parallel=1,
                    health=HealthCheck("none"), healthy_secs=0.0)
    releases = {}
    for version in ("1", "2"):
        path, sha = build_release(workdir / "artifacts", "A", version)
        releases[version] = (f"file://{path}", sha, path.stat().st_size)
    agents: dict[str, Agent] = {}
    threads = []
    for i in range(HOSTS):
        host = f"h{i:03d}"
        root = workdir / host
        rd = ReleaseDir(root, "A")
        for version, (url, sha, size) in releases.items():
            install_release([url], sha, rd.releases, version, rd.cache, size=size,
                            file_root=str(workdir))
        rd.point_current("1")
        cfg = AgentConfig(host=host, rack="r0", store=store_url, root=root,
                          services={"A": {}}, session_timeout=10.0, start_timeout=5.0,
                          poll_interval=5.0)
        agents[host] = Agent(cfg, supervisor=InstantSupervisor())
    for agent in agents.values():
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        threads.append(thread)
    namespace = urlsplit(store_url).path.strip("/")
    try:
        yield agents, releases, namespace
    finally:
        for agent in agents.values():
            agent.stopping.set()
            agent.wake.set()
        for thread in threads:
            thread.join(timeout=20)


def server_count(zk_server, namespace: str) -> int:
    return namespace_requests([("127.0.0.1", zk_server.client_port)], namespace).total


def test_requests_per_upgrade_and_idle_stay_within_targets(fleet, store, zk_server,
                                                           record_property):
    agents, releases, namespace = fleet
    # Every agent registered on 1 (its presence is in the store).
    wait_for(lambda: len(store.children("current/A")) == HOSTS, 60, "every host to register")
    own = store.ops.total  # this test's own session, subtracted from the server's count
    start = server_count(zk_server, namespace)

    ops.stage(store, "A", "2", sha256=releases["2"][1], urls=[releases["2"][0]],
              size=releases["2"][2])
    (item,) = ops.deploy(store, ["A"])
    # Observed through the agents' own state (no store reads by the test meanwhile).
    wait_for(lambda: all(a.local.get("A").active == "2" and
                         a.status["A"].get("phase") == "serving" for a in agents.values()),
             300, "every host to switch to 2")
    wait_for(lambda: store.exists(f"history/{item.node}") is not None, 60,
             "the deploy item to complete")
    deploy = server_count(zk_server, namespace) - start - (store.ops.total - own)
    per_upgrade = deploy / HOSTS
    notifications = sum(getattr(a.coord, "notifications", 0) for a in agents.values())
    record_property("requests_per_upgrade", round(per_upgrade, 2))
    record_property("notifications_per_upgrade", round(notifications / HOSTS, 1))
    print(f"hosts={HOSTS} requests_per_upgrade={per_upgrade:.2f} "
          f"notifications_per_upgrade={notifications / HOSTS:.1f}")

    # Idle: the fleet does nothing for IDLE_SECS (the measurement window, not a wait).
    idle_start = server_count(zk_server, namespace)
    time.sleep(IDLE_SECS)
    idle = server_count(zk_server, namespace) - idle_start
    idle_rate = idle / IDLE_SECS / HOSTS
    record_property("idle_requests_per_s_per_host", round(idle_rate, 3))
    print(f"hosts={HOSTS} idle_requests_per_s_per_host={idle_rate:.3f} ({idle} in "
          f"{IDLE_SECS:g}s)")

    assert per_upgrade <= PER_UPGRADE, \
        f"{per_upgrade:.1f} store requests per host upgrade (target {PER_UPGRADE})"
    assert idle_rate <= IDLE_PER_HOST_S, \
        f"{idle_rate:.3f} store requests/s per host idle (target {IDLE_PER_HOST_S})"


def test_mirror_is_rebuilt_after_the_session_is_lost(workdir, store, store_url):
    """A lost session takes the watches and our ephemerals: the next cycle loads the mirror
    again (never trusting a queue position or presence from before), registers again, and
    then follows changes made after the loss."""
    from kazoo.client import KazooClient

    ops.service_set(store, "A", program="A", quorum=1, max_parallel=1,
                    health=HealthCheck("none"), healthy_secs=0.0)
    path, sha = build_release(workdir / "artifacts", "A", "1")
    agents = {}
    for host in ("h0", "h1"):
        rd = ReleaseDir(workdir / host, "A")
        install_release([f"file://{path}"], sha, rd.releases, "1", rd.cache,
                        size=path.stat().st_size, file_root=str(workdir))
        rd.point_current("1")
        cfg = AgentConfig(host=host, rack="r0", store=store_url, root=workdir / host,
                          services={"A": {}}, session_timeout=4.0, start_timeout=5.0)
        agents[host] = Agent(cfg, supervisor=InstantSupervisor())
        assert agents[host].connect(timeout=15)
    try:
        for agent in agents.values():
            agent.cycle()
        assert sorted(store.children("current/A")) == ["h0", "h1"]
        h0 = agents["h0"]
        # Expire h0's session: a second client on its session id closes it.
        client = h0.store.client  # type: ignore[attr-defined]
        twin = KazooClient(hosts=",".join(f"{h}:{p}" for h, p in client.hosts),
                           client_id=client.client_id)
        twin.start(timeout=15)
        twin.stop()
        twin.close()
        wait_for(lambda: "h0" not in store.children("current/A"), 30, "h0's presence to go")
        wait_for(lambda: client.connected, 30, "h0's client to open a new session")
        h0.cycle()
        assert "h0" in store.children("current/A"), "h0 did not register again"
        # A change after the loss reaches h0's mirror through the new watches.
        agents["h1"].coord.unregister("A")
        store.sync()
        wait_for(lambda: (h0.cycle() or True) and
                 "h1" not in h0.coord.view("A", [], []).current, 30,
                 "h0's mirror to see h1 leave")
    finally:
        for agent in agents.values():
            agent.shutdown()
