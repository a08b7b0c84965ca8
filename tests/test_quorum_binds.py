"""Scenarios where quorum, not ``max_parallel``, is what stops a take-down (issue 14, item 1).

In tests/test_rollout.py ``max_parallel`` alone keeps quorum (3 of 5, 2 at a time), so a
product without its quorum check would still pass there. Here quorum is the binding limit:

* real hosts (real ZooKeeper, one supervisord + agent per host, the sample service), judged on
  what an independent prober recorded, every endpoint sampled at >= 20 Hz, a timeout counting
  as not serving:
  - quorum 4 of 5 with ``max_parallel`` 3: one host at a time, never fewer than 4 serving;
  - one host ``kill -9``ed, its session expired: 4 online with quorum 4, so the deploy item is
    ``blocked`` for quorum, nobody switches, and it proceeds only once the host is back;
* the agent's own gate code on real ZooKeeper, several agents in one process with a stub
  supervisord (no service process), judged on the record of the stubs' stops and starts:
  - two hosts reach the gate commit with the same read: exactly one passes, and the other
    does not pass on its next cycle either;
  - a third host's presence goes away (its session closed, not a gate pass) while a host is
    between the cycle's read and the gate: the gate's synced, fresh read sees it.

``bench/mutants.py`` runs this file against copies of the package with the quorum check
removed and with the fresh read before the gate removed: each must fail here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cluster import Cluster, Prober, wait_for

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.lab.sample import build_release

QUORUM = 4
HOSTS = 5
SPEC = {"quorum": QUORUM, "max_parallel": 3, "healthy_secs": 1.0}
MIN_HZ = 20.0
# The prober asks every endpoint in one round, in parallel, each with a 0.2 s timeout. A round
# where an endpoint times out lasts up to that timeout; that endpoint is then recorded as not
# serving (None), so such a gap is itself a "down" sample, never an unobserved stretch.
MAX_GAP = 0.3


# -- the prober's record ----------------------------------------------------------------

def check_coverage(prober: Prober, t0: float, t1: float) -> dict[str, float]:
    """Every endpoint sampled at >= 20 Hz over [t0, t1], the whole judged window (not the
    prober's own lifetime: a prober that died early fails), with no gap over MAX_GAP,
    counting the edges of the window. Returns what was measured."""
    times = [s.t for s in prober.samples if t0 <= s.t <= t1]
    assert times, "no prober samples in the judged window"
    gaps = [b - a for a, b in zip([t0, *times], [*times, t1])]
    rate = len(times) / (t1 - t0)
    assert rate >= MIN_HZ, f"prober sampled every endpoint at {rate:.1f} Hz over the window"
    assert max(gaps) <= MAX_GAP, f"prober gap of {max(gaps):.3f} s"
    return {"window_s": round(t1 - t0, 2), "rate_hz": round(rate, 1),
            "max_gap_s": round(max(gaps), 3)}


def check_s1(prober: Prober, svc: str, t0: float, t1: float) -> int:
    """S1 at every sample of [t0, t1]: at least quorum hosts answer. Returns the minimum."""
    judged = [s for s in prober.samples if t0 <= s.t <= t1]
    worst = min(judged, key=lambda s: prober.serving(s, svc))
    serving = prober.serving(worst, svc)
    down = sorted(h for (h, s), v in worst.versions.items() if s == svc and v is None)
    assert serving >= QUORUM, (f"S1: only {serving} of {HOSTS} serving {svc} at "
                               f"t={worst.t:.3f} (not answering: {', '.join(down)})")
    return serving


def switch_slots(prober: Prober, hosts, svc: str, hold: float) -> list[tuple[float, float, str]]:
    """Each host's switch from 1 to 2 as the prober saw it: (first sample not answering 1
    after answering it, first sample answering 2 plus the healthy hold, host).

    That interval lies inside the host's real gate slot, which runs from its gate pass (before
    the stop) to its re-registration (after supervisord's startsecs and the hold), so two
    real slots that never overlap give measured slots that never overlap."""
    out = []
    for host in hosts:
        seen = prober.seen(host, svc)
        down = next((t for (_, prev), (t, now) in zip(seen, seen[1:])
                     if prev == "1" and now != "1"), None)
        up = next((t for t, version in seen if version == "2"), None)
        assert down is not None and up is not None, f"{host} never seen switching 1 -> 2"
        out.append((down, up + hold, host))
    return sorted(out)


def check_one_at_a_time(slots: list[tuple[float, float, str]]) -> None:
    for (_, end, a), (start, _, b) in zip(slots, slots[1:]):
        assert start > end, (f"{b} went down {end - start:.2f} s before {a}'s switch slot "
                             f"ended: two hosts switching at once ({slots})")


# -- real hosts -------------------------------------------------------------------------

@pytest.fixture
def dc(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, HOSTS, {"A": SPEC})
    try:
        yield c
    finally:
        c.stop_all()


def ready_hosts(cluster: Cluster) -> set[str]:
    return set(ops.status(cluster.store)["services"]["A"]["staging"])


def gate_version(cluster: Cluster) -> int:
    return cluster.store.get("gate/A")[1]


def boot_ready(cluster: Cluster) -> None:
    """Every host serving A 1 and in the ready queue for A 2: with ``max_parallel`` 3 the
    first three could go at once, were it not for quorum."""
    cluster.boot({"A": "1"})
    cluster.stage("A", "2")
    wait_for(lambda: ready_hosts(cluster) == set(cluster.hosts), 60,
             "every host ready to roll to A 2")


def test_quorum_4_of_5_switches_one_host_at_a_time(dc, record_property):
    boot_ready(dc)
    gate_before = gate_version(dc)
    prober = dc.prober().start()
    t0 = time.time()
    try:
        ops.deploy(dc.store, ["A"])
        wait_for(dc.queue_empty, 120, "the deploy to finish")
        wait_for(lambda: dc.all_on("A", "2"), 30, "every host on A 2")
    finally:
        t1 = time.time()
        prober.stop()
    for key, value in check_coverage(prober, t0, t1).items():
        record_property(key, value)  # in the junit report, for bench/mutants.py
    worst = check_s1(prober, "A", t0, t1)
    record_property("min_serving", worst)
    assert worst == QUORUM, "no host was ever seen down"
    check_one_at_a_time(switch_slots(prober, dc.hosts, "A", SPEC["healthy_secs"]))
    assert gate_version(dc) - gate_before == HOSTS, "one gate pass per host"


def agent_status(cluster: Cluster, host: str) -> dict:
    return cluster.host_status(host).get("services", {}).get("A", {})


def test_dead_host_blocks_take_downs_until_it_returns(dc, record_property):
    boot_ready(dc)
    victim = "h4"
    live = [h for h in dc.hosts if h != victim]
    dc.kill(victim)  # supervisord, the agent and the service, by pid
    assert dc.version(victim, "A") is None, f"{victim}'s service still answers"
    wait_for(lambda: victim not in dc.store.children("current/A"), 30,
             f"{victim}'s presence to go with its session")
    gate_before = gate_version(dc)
    prober = dc.prober().start()
    t0 = time.time()
    try:
        (item,) = ops.deploy(dc.store, ["A"])
        # 4 online, quorum 4: nobody may go. Fail fast if someone does.
        wait_for(lambda: dc.status()["deploy"][0]["state"] == "blocked"
                 or gate_version(dc) != gate_before, 30, "the deploy item to show blocked")
        shown = dc.status()["deploy"][0]
        assert gate_version(dc) == gate_before, "a host passed the gate with 4 of 5 online"
        assert shown["item"] == item.node and shown["state"] == "blocked"
        assert shown["reason"].startswith("quorum: 4 online, quorum 4"), shown
        # Every live agent, on three cycles of its own, looked at the item and stayed: the
        # first max_parallel of the ready queue for quorum, the others for their place in it
        # (status.json is rewritten each cycle: its cycle count moves).
        front = dc.status()["services"]["A"]["staging"][: SPEC["max_parallel"]]
        assert len(front) == 3 and victim not in front, front
        cycles: dict[str, set[int]] = {h: set() for h in live}

        def stayed_three_times() -> bool:
            if gate_version(dc) != gate_before:
                return True  # someone went: fail at once, below
            for host in live:
                status = dc.host_status(host)
                reason = status.get("services", {}).get("A", {}).get("reason") or ""
                want = "quorum: 4 online, quorum 4" if host in front else "queue position"
                if reason.startswith(want):
                    cycles[host].add(status["cycles"])
            return all(len(seen) >= 3 for seen in cycles.values())

        wait_for(stayed_three_times, 30, "every live agent to stay 3 cycles for quorum "
                 "(or its queue position)", interval=0.05)
        assert gate_version(dc) == gate_before, "a host passed the gate with 4 of 5 online"
        assert dc.status()["deploy"][0]["state"] == "blocked"
        blocked_until = time.time()
        dc.start(victim)
        wait_for(dc.queue_empty, 120, "the deploy to finish once the host is back")
        wait_for(lambda: dc.all_on("A", "2"), 30, "every host on A 2")
    finally:
        t1 = time.time()
        prober.stop()
    for key, value in check_coverage(prober, t0, t1).items():
        record_property(key, value)
    record_property("min_serving", check_s1(prober, "A", t0, t1))
    record_property("blocked_s", round(blocked_until - t0, 2))
    # Nothing moved while blocked: every live host answered 1 at every sample.
    for sample in prober.samples:
        if t0 <= sample.t <= blocked_until:
            assert all(sample.versions[(h, "A")] == "1" for h in live), sample
    back = prober.first_seen("A", "1", {victim})
    assert back is not None, f"{victim} never seen serving again"
    slots = switch_slots(prober, dc.hosts, "A", SPEC["healthy_secs"])
    assert slots[0][0] > back, "a take-down before the dead host was back"
    check_one_at_a_time(slots)


# -- the gate code itself, several agents in one process ---------------------------------

class StubSupervisor:
    """One host's supervisord as the agent sees it (state, stop, start), recording each stop
    and start in a log shared by all hosts. ``hold_state`` makes the next ``state()`` call
    wait (a slow supervisord) until released; ``start()`` waits until ``finish`` is set, so a
    host that passed the gate stays mid-switch (out of ``current``) for the test."""

    def __init__(self, host: str, log: list, lock: threading.Lock) -> None:
        self.host = host
        self.log = log
        self.lock = lock
        self.running = True
        self.stops = 0
        self.hold_state: tuple[threading.Event, threading.Event] | None = None
        self.in_start = threading.Event()
        self.finish = threading.Event()

    def state(self, program: str) -> str:
        hold, self.hold_state = self.hold_state, None
        if hold is not None:
            hold[0].set()
            hold[1].wait(30)
        return "RUNNING" if self.running else "STOPPED"

    def stop(self, program: str) -> None:
        with self.lock:
            self.running = False
            self.stops += 1
            self.log.append((time.monotonic(), self.host, "stop"))

    def start(self, program: str) -> None:
        self.in_start.set()
        self.finish.wait(60)
        with self.lock:
            self.running = True
            self.log.append((time.monotonic(), self.host, "start"))


class CommitTogether:
    """Wraps the racers' ``store.commit``: each one's first commit waits until every racer
    has reached its own, then all go at once. So all of them made their (synced, fresh) read
    before any commits: the same instant for the gate, whatever the scheduler does."""

    def __init__(self, agents: dict[str, Agent]) -> None:
        self.barrier = threading.Barrier(len(agents), timeout=20)
        self.reached: list[str] = []
        for host, agent in agents.items():
            agent.store.commit = self._wrap(host, agent.store.commit)  # type: ignore

    def _wrap(self, host: str, commit):
        def first_together(ops_):
            if host not in self.reached:
                self.reached.append(host)
                self.barrier.wait()
            return commit(ops_)
        return first_together


def most_down_at_once(log: list) -> int:
    down: set[str] = set()
    worst = 0
    for _, host, what in sorted(log):
        (down.add if what == "stop" else down.discard)(host)
        worst = max(worst, len(down))
    return worst


class GateBed:
    """Five agents (real ``Agent`` objects, each with its own ZooKeeper session) on A 1 with
    A 2 installed and every host in the ready queue, quorum 4 and ``max_parallel`` 3, and a
    deploy of A 2 queued. Cycles are driven by the test, each in its own thread."""

    def __init__(self, workdir: Path, store, store_url: str) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.log: list = []
        self.threads: list[threading.Thread] = []
        self.closed: set[str] = set()
        ops.service_set(store, "A", program="A", quorum=QUORUM, max_parallel=3,
                        health=HealthCheck("none"), healthy_secs=0.1)
        releases = {}
        for version in ("1", "2"):
            path, sha = build_release(workdir / "artifacts", "A", version)
            releases[version] = (f"file://{path}", sha, path.stat().st_size)
        ops.stage(store, "A", "2", sha256=releases["2"][1], urls=[releases["2"][0]],
                  size=releases["2"][2])
        self.agents: dict[str, Agent] = {}
        for i in range(HOSTS):
            host = f"h{i}"
            root = workdir / host
            rd = ReleaseDir(root, "A")
            for version, (url, sha, size) in releases.items():
                install_release([url], sha, rd.releases, version, rd.cache, size=size,
                                file_root=workdir / "artifacts")
            rd.point_current("1")
            cfg = AgentConfig(host=host, rack="r0", store=store_url, root=root,
                              services={"A": {}}, session_timeout=4.0, start_timeout=5.0)
            agent = Agent(cfg, supervisor=StubSupervisor(host, self.log, self.lock))
            assert agent.connect(timeout=15)
            self.agents[host] = agent
        # First cycle registers and joins the ready queue (in host order); the second sees
        # itself there and, with no deploy queued, stays.
        for _ in range(2):
            for agent in self.agents.values():
                agent.cycle()
        assert len(store.children("current/A")) == HOSTS
        assert [e.host for e in ops.read_staging(store, "A", [])] == list(self.agents)
        (self.item,) = ops.deploy(store, ["A"])

    def sup(self, host: str) -> StubSupervisor:
        return self.agents[host].sup  # type: ignore[return-value]

    def cycle(self, host: str) -> threading.Thread:
        thread = threading.Thread(target=self.agents[host].cycle, name=f"cycle-{host}",
                                  daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def settle(self, host: str, thread: threading.Thread) -> None:
        """Until the cycle ended, or the host is mid-switch (it passed the gate)."""
        wait_for(lambda: not thread.is_alive() or self.sup(host).in_start.is_set(), 30,
                 f"{host}'s cycle to end or reach its switch")

    def reason(self, host: str) -> str:
        return self.agents[host].status["A"].get("reason") or ""

    def gate(self) -> int:
        return self.store.get("gate/A")[1]

    def shutdown(self, host: str) -> None:
        """The host's agent ends its session (its presence and queue entry go with it)."""
        if host not in self.closed:
            self.closed.add(host)
            self.agents[host].shutdown()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.sup.finish.set()  # type: ignore[attr-defined]
        for thread in self.threads:
            thread.join(timeout=10)
        for host in self.agents:
            self.shutdown(host)


@pytest.fixture
def bed(workdir, store, store_url):
    b = GateBed(workdir, store, store_url)
    try:
        yield b
    finally:
        b.close()


def test_two_hosts_racing_for_the_gate_exactly_one_passes(bed):
    racers = ["h0", "h1"]  # both ready, both among the first max_parallel 3
    gate_before = bed.gate()
    together = CommitTogether({h: bed.agents[h] for h in racers})
    go = threading.Barrier(len(racers), timeout=20)

    def race(host: str) -> None:
        go.wait()
        bed.agents[host].cycle()

    threads = {h: threading.Thread(target=race, args=(h,), daemon=True) for h in racers}
    for thread in threads.values():
        thread.start()
    bed.threads.extend(threads.values())
    for host, thread in threads.items():
        bed.settle(host, thread)
    assert sorted(together.reached) == racers, \
        f"only {together.reached} reached the gate commit"
    passed = [h for h in racers if bed.sup(h).stops]
    assert len(passed) == 1, f"{passed or 'nobody'} passed the gate"
    (winner,) = passed
    (loser,) = set(racers) - {winner}
    assert bed.gate() == gate_before + 1
    assert winner not in bed.store.children("current/A")
    # The loser's next cycles, and the third host in the first max_parallel: all refuse
    # for quorum while the winner is mid-switch.
    for host in (loser, "h2", loser):
        bed.settle(host, bed.cycle(host))
        assert bed.sup(host).stops == 0, f"{host} passed the gate too"
        assert bed.reason(host).startswith("quorum: 4 online, quorum 4"), bed.reason(host)
    assert bed.gate() == gate_before + 1
    assert most_down_at_once(bed.log) == HOSTS - QUORUM


def test_presence_lost_between_read_and_gate_blocks_the_take_down(bed):
    host, departing = "h0", "h4"
    gate_before = bed.gate()
    # h0 reads its cycle's view (5 online), then waits on a slow supervisord ...
    reached, release = threading.Event(), threading.Event()
    bed.sup(host).hold_state = (reached, release)
    thread = bed.cycle(host)
    assert reached.wait(20), f"{host}'s cycle never asked supervisord"
    # ... meanwhile h4 goes away without passing the gate (its session ends).
    bed.shutdown(departing)
    wait_for(lambda: departing not in bed.store.children("current/A"), 20,
             f"{departing}'s presence to go")
    release.set()
    bed.settle(host, thread)
    assert bed.sup(host).stops == 0, f"{host} took itself down with 4 online, quorum 4"
    assert bed.gate() == gate_before
    assert len(bed.store.children("current/A")) == QUORUM
    # Its status says why it stayed (the gate's read, not the cycle's, which allowed it) ...
    assert bed.reason(host).startswith("quorum: 4 online, quorum 4"), bed.reason(host)
    # ... and so does its next cycle, which reads 4 online from the start.
    bed.settle(host, bed.cycle(host))
    assert bed.sup(host).stops == 0, f"{host} took itself down with 4 online, quorum 4"
    assert bed.reason(host).startswith("quorum: 4 online, quorum 4"), bed.reason(host)
    assert most_down_at_once(bed.log) == 0
