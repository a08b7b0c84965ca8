"""``deploy --host-parallel N`` and the deploy-level rack overrides end to end (issue 10):
real ZooKeeper, one supervisord + agent per host, the sample service.

Judged on the switch windows the agents record (each host's ``switch`` timing, copied
into the done item's history record: the switch's start just after the gate commit, to
the health check having held) and on an independent prober for quorum (S1).
"""

from __future__ import annotations

import threading
import time

import pytest
from cluster import Cluster, Prober, wait_for

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.store import layout

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
    want = {(h, svc) for h in dc.hosts for svc in services}
    assert set(win) == want, f"switch timings missing: {sorted(want - set(win))}"
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


# -- the same, event by event: real agents and ZooKeeper, supervisord stubbed ------------

class TwoPrograms:
    """supervisord with programs A and B as the agent sees it: ``start`` of a program
    blocks until the test sets its ``finish``, so a switch stays in progress (its service
    down) for as long as the test wants, and ``in_start`` says it got there."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = {"A": True, "B": True}
        self.stops = {"A": 0, "B": 0}
        self.in_start = {p: threading.Event() for p in self.running}
        self.finish = {p: threading.Event() for p in self.running}

    def state(self, program: str) -> str:
        with self.lock:
            return "RUNNING" if self.running[program] else "STOPPED"

    def stop(self, program: str) -> None:
        with self.lock:
            self.running[program] = False
            self.stops[program] += 1

    def start(self, program: str) -> None:
        self.in_start[program].set()
        self.finish[program].wait(60)
        with self.lock:
            self.running[program] = True


class PairBed:
    """Hosts h0 and h1, each with services A and B on 1 (2 installed), quorum 1,
    ``max_parallel`` 1, h0 ready for 2 in both ready queues. Only h0's agent runs after
    that (h1 keeps its presences: it holds the quorum)."""

    def __init__(self, workdir, store, store_url) -> None:
        self.store = store
        self.agents: dict[str, Agent] = {}
        for svc in ("A", "B"):
            ops.service_set(store, svc, program=svc, quorum=1, max_parallel=1,
                            health=HealthCheck("none"), healthy_secs=0.0)
        releases = {}
        for svc in ("A", "B"):
            for version in ("1", "2"):
                path, sha = build_release(workdir / "artifacts", svc, version)
                releases[svc, version] = (f"file://{path}", sha, path.stat().st_size)
            url, sha, size = releases[svc, "2"]
            ops.stage(store, svc, "2", sha256=sha, urls=[url], size=size)
        for host in ("h0", "h1"):
            for svc in ("A", "B"):
                rd = ReleaseDir(workdir / host, svc)
                for version in ("1", "2"):
                    url, sha, size = releases[svc, version]
                    install_release([url], sha, rd.releases, version, rd.cache, size=size,
                                    file_root=workdir / "artifacts")
                rd.point_current("1")
            cfg = AgentConfig(host=host, rack="r0", store=store_url, root=workdir / host,
                              services={"A": {}, "B": {}}, session_timeout=10.0,
                              start_timeout=5.0, poll_interval=0.5)
            agent = Agent(cfg, supervisor=TwoPrograms())  # type: ignore[arg-type]
            assert agent.connect(timeout=15)
            self.agents[host] = agent
        for host in ("h0", "h1"):  # h0 first into both ready queues
            for _ in range(2):
                self.agents[host].cycle()
        for svc in ("A", "B"):
            assert [e.host for e in ops.read_staging(store, svc, [])] == ["h0", "h1"]
            # h1 will not cycle again: out of the ready queues, it only holds the quorum
            # (else h0, back in a queue at the end of it, would wait behind it for ever).
            for entry in ops.read_staging(store, svc, []):
                if entry.host == "h1":
                    store.delete(layout.ready_entry(svc, entry.node))
        self.h0 = self.agents["h0"]
        self.sup: TwoPrograms = self.h0.sup  # type: ignore[assignment]
        self.thread = threading.Thread(target=self.h0.run, daemon=True)

    def reason(self, svc: str) -> str:
        return self.h0.status[svc].get("reason") or ""

    def close(self) -> None:
        for sup in (a.sup for a in self.agents.values()):
            for event in sup.finish.values():  # type: ignore[attr-defined]
                event.set()
        self.h0.stopping.set()
        self.h0.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        for agent in self.agents.values():
            agent.shutdown()


@pytest.fixture
def pair(workdir, store, store_url):
    bed = PairBed(workdir, store, store_url)
    try:
        yield bed
    finally:
        bed.close()


def test_host_parallel_2_both_switches_in_progress_at_once(pair):
    ops.deploy(pair.store, ["A", "B"], host_parallel=2)
    pair.thread.start()
    # Both starts reached while neither may finish: two services of h0 down at once.
    for svc in ("A", "B"):
        assert pair.sup.in_start[svc].wait(30), f"{svc}'s switch never reached its start"
    assert pair.sup.stops == {"A": 1, "B": 1}
    # Both shown as switching (ready entry, no presence): the second gate, which left h0
    # no room, must not have made way in the first one's queue, else h0 looked offline
    # for it and its item could be completed while h0 was still down.
    for svc in ("A", "B"):
        assert [e.host for e in ops.read_staging(pair.store, svc, [])] == ["h0"], \
            f"h0's ready entry for {svc} went while its switch was in progress"
        assert "h0" not in pair.store.children(layout.presence_dir(svc))
    for svc in ("A", "B"):
        pair.sup.finish[svc].set()
    wait_for(lambda: all(pair.h0.local.get(s).active == "2" and
                         pair.h0.status[s].get("phase") == "serving" for s in ("A", "B")),
             30, "both services of h0 on 2 and serving")
    assert pair.h0.cycle_errors == 0


def test_host_parallel_1_the_second_waits_for_the_first(pair):
    ops.deploy(pair.store, ["A", "B"])
    pair.thread.start()
    wait_for(lambda: any(e.is_set() for e in pair.sup.in_start.values()), 30,
             "one switch to reach its start")
    first = next(s for s, e in pair.sup.in_start.items() if e.is_set())
    second = "B" if first == "A" else "A"
    # The cycle goes on (it is not blocked in the switch) and refuses the other service
    # for host_parallel, while the first is still down.
    wait_for(lambda: pair.reason(second).startswith(
        f"host_parallel 1: this host is switching {first}"), 30,
        f"{second} to be refused for host_parallel while {first} switches")
    assert pair.sup.stops[second] == 0 and not pair.sup.in_start[second].is_set()
    assert pair.h0.status[first].get("phase") == "switching"
    pair.sup.finish[first].set()
    assert pair.sup.in_start[second].wait(30), f"{second} never switched after {first}"
    with pair.sup.lock:
        assert pair.sup.running[first], f"{second} went down before {first} was back"
    pair.sup.finish[second].set()
    wait_for(lambda: all(pair.h0.local.get(s).active == "2" and
                         pair.h0.status[s].get("phase") == "serving" for s in ("A", "B")),
             30, "both services of h0 on 2 and serving")
    assert pair.h0.cycle_errors == 0


def test_shutdown_lets_a_switch_in_progress_finish(pair):
    ops.deploy(pair.store, ["A"])
    pair.thread.start()
    assert pair.sup.in_start["A"].wait(30)
    pair.h0.stopping.set()
    pair.h0.wake.set()
    # The loop ends and its shutdown waits for the switch: it must not return meanwhile.
    stopper_done = threading.Event()
    threading.Thread(target=lambda: (pair.thread.join(60), stopper_done.set()),
                     daemon=True).start()
    assert not stopper_done.wait(0.5)  # a bound on waiting for nothing, not a sync
    pair.sup.finish["A"].set()
    assert stopper_done.wait(30) and not pair.thread.is_alive()
    assert pair.h0.local.get("A").active == "2" and pair.h0.local.get("A").verified
    assert not any(t.name.startswith("dcdeploy-switch") for t in threading.enumerate())
