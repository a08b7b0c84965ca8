"""Two dependent services rolled through the Consul fake by real agents (in-process,
supervisord stubbed), max_parallel 2: a host passing A's gate leaves B's ready queue and
comes back at its end under the same key name (entries of one staged release share a
number on Consul; coord.FollowCoordinator). Hosts that follow only the entries ahead of
theirs must see such an entry made again as a change of place, and the last hosts of a
group must complete the item without following the whole queue. Against
tests/fakeconsul.py only, never a real Consul (docs/consul.md)."""

from __future__ import annotations

import threading
import uuid

from cluster import wait_for
from fakeconsul import FakeConsul
from test_store_traffic import InstantSupervisor

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.store import open_store

HOSTS = 5


def test_two_dependent_services_roll_through_with_max_parallel_two(workdir):
    fake = FakeConsul().start()
    url = f"consul://{fake.address}/dc-{uuid.uuid4().hex[:12]}"
    store = open_store(url)
    store.start(timeout=15)
    for svc, after in (("A", ()), ("B", ("A",))):
        ops.service_set(store, svc, program=svc, quorum=3, max_parallel=2,
                        health=HealthCheck("none"), healthy_secs=0.0, depends_on=list(after))
    releases = {}
    for svc in "AB":
        for version in ("1", "2"):
            path, sha = build_release(workdir / "artifacts", svc, version)
            releases[svc, version] = (f"file://{path}", sha, path.stat().st_size)
    agents = {}
    for i in range(HOSTS):
        host = f"h{i}"
        for svc in "AB":
            rd = ReleaseDir(workdir / host, svc)
            for version in ("1", "2"):
                rurl, sha, size = releases[svc, version]
                install_release([rurl], sha, rd.releases, version, rd.cache, size=size,
                                file_root=str(workdir))
            rd.point_current("1")
        cfg = AgentConfig(host=host, rack="r0", store=url, root=workdir / host,
                          services={"A": {}, "B": {}}, session_timeout=10.0,
                          start_timeout=5.0, poll_interval=5.0)
        agents[host] = Agent(cfg, supervisor=InstantSupervisor())
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents.values()]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(len(store.children(f"current/{s}")) == HOSTS for s in "AB"),
                 60, "every host to register both services")
        for svc in "AB":
            rurl, sha, size = releases[svc, "2"]
            ops.stage(store, svc, "2", sha256=sha, urls=[rurl], size=size)
        items = ops.deploy(store, ["B", "A"])
        assert [i.service for i in items] == ["A", "B"]
        wait_for(lambda: not store.children("deploy"), 90, "the deploy queue to empty")
        assert all(a.local.get(s).active == "2" for a in agents.values() for s in "AB")
        done = {s: [store.get(f"history/{i.node}")[0] for i in items if i.service == s]
                for s in "AB"}
        assert all(b'"done"' in d[0] for d in done.values()), done
    finally:
        for agent in agents.values():
            agent.stopping.set()
            agent.wake.set()
        for thread in threads:
            thread.join(timeout=20)
        store.stop()
        fake.close()
