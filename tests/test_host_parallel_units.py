"""``deploy --host-parallel N`` as the agent acts on it (issue 10 item 1): the pure rule
(:func:`decisions.host_room`) and the pool that runs switches beside the cycle
(:class:`SwitchRunner`). End to end: tests/test_host_parallel.py."""

from __future__ import annotations

import threading

import pytest

from supervisor_dcdeploy import decisions as d
from supervisor_dcdeploy.agent.switches import SwitchRunner
from supervisor_dcdeploy.waiting import wait_for
from test_waves_gate import item, view

QUEUE_2 = [item(1, "a", host_parallel=2), item(2, "b", host_parallel=2),
           item(3, "c", host_parallel=2)]
QUEUE_1 = [item(1, "a"), item(2, "b"), item(3, "c")]


@pytest.mark.parametrize("queue,svc,busy,ok,reason", [
    # default 1: nothing else may switch
    (QUEUE_1, "b", {}, True, "host_parallel 1: 0 other services switching here"),
    (QUEUE_1, "b", {"a": 1}, False, "host_parallel 1: this host is switching a"),
    # --host-parallel 2: one other may switch, not two
    (QUEUE_2, "b", {"a": 2}, True, "host_parallel 2: 1 other service switching here"),
    (QUEUE_2, "b", {"a": 2, "c": 2}, False, "host_parallel 2: this host is switching a, c"),
    # a running switch whose item allowed 1 is not overruled by this item's 2
    (QUEUE_2, "b", {"a": 1}, False, "host_parallel 1: this host is switching a"),
    # ... and this item's 1 holds even when the running one allowed 2
    (QUEUE_1, "b", {"a": 2}, False, "host_parallel 1: this host is switching a"),
    # the service itself is not counted
    (QUEUE_1, "b", {"b": 1}, True, "host_parallel 1: 0 other services switching here"),
])
def test_host_room(queue, svc, busy, ok, reason):
    v = view(svc, queue, current={"h0": "1", "h1": "1"}, staging=["h0"])
    decision = d.host_room(v, busy)
    assert (decision.ok, decision.reason) == (ok, reason)


def test_may_take_down_applies_host_room_with_the_running_switches_limits():
    v = view("b", QUEUE_2, current={"h0": "1", "h1": "1"}, staging=["h0"])
    assert d.may_take_down(v, "h0", "1", switching_here={"a": 2})
    refused = d.may_take_down(v, "h0", "1", switching_here={"a": 1})
    assert not refused and refused.reason == "host_parallel 1: this host is switching a"


# -- the runner -------------------------------------------------------------------------

def test_runner_runs_switches_at_once_counts_them_until_taken_and_wakes():
    woken = threading.Event()
    made: list[str] = []
    runner = SwitchRunner(2, lambda: made.append(threading.current_thread().name) or
                          object(), woken.set)  # type: ignore[arg-type,func-returns-value]
    both = threading.Barrier(3, timeout=20)  # both jobs and the test: they run together
    go = threading.Event()

    def job(name):
        def run():
            assert runner.supervisor() is not None  # the thread's own client
            both.wait()
            assert go.wait(20)
            return name
        return run

    try:
        assert runner.supervisor() is None  # not a switch thread
        runner.submit("a", 2, job("a"))
        runner.submit("b", 1, job("b"))
        both.wait()  # fails (BrokenBarrierError) unless both run at the same time
        assert runner.busy() == {"a": 2, "b": 1}
        assert runner.running("a") and runner.take("a") is None
        with pytest.raises(ValueError, match="already running"):
            runner.submit("a", 2, job("a"))
        go.set()
        wait_for(lambda: not runner.running("a") and not runner.running("b"), 20,
                 "both switches to end")
        assert woken.is_set()
        assert runner.busy() == {"a": 2, "b": 1}  # ended, not taken: still counted
        assert runner.take("a").result() == "a"
        assert runner.take("a") is None  # once
        assert runner.busy() == {"b": 1}
        assert runner.take("b").result() == "b"
        assert len(made) == 2 and len(set(made)) == 2  # one client per thread
    finally:
        go.set()
        runner.shutdown()


def test_runner_hands_back_what_a_switch_raised():
    runner = SwitchRunner(1, None, lambda: None)
    try:
        def boom():
            raise OSError("disk gone")
        runner.submit("a", 1, boom)
        wait_for(lambda: not runner.running("a"), 20, "the switch to end")
        with pytest.raises(OSError, match="disk gone"):
            runner.take("a").result()
    finally:
        runner.shutdown()


def test_shutdown_waits_for_a_switch_in_progress():
    runner = SwitchRunner(1, None, lambda: None)
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def switch():
        started.set()
        assert release.wait(20)
        ended.set()

    runner.submit("a", 1, switch)
    assert started.wait(20)
    stopper = threading.Thread(target=runner.shutdown)
    stopper.start()
    stopper.join(timeout=0.2)  # not a synchronization: shutdown must still be waiting
    assert stopper.is_alive() and not ended.is_set()
    release.set()
    stopper.join(timeout=20)
    assert not stopper.is_alive() and ended.is_set()
    assert not any(t.name.startswith("dcdeploy-switch") for t in threading.enumerate())
    with pytest.raises(RuntimeError):  # after shutdown: the agent switches inline instead
        runner.submit("b", 1, lambda: None)


# -- supervisord's states, once a cycle ---------------------------------------------------

class CountingSupervisor:
    """Every program RUNNING; counts the calls of each kind. ``all_fail``: the one call
    for every program fails (then each service asks for its own)."""

    def __init__(self, programs, all_fail: bool = False) -> None:
        self.programs = programs
        self.all_fail = all_fail
        self.calls = {"states": 0, "state": 0}

    def states(self) -> dict[str, str]:
        from supervisor_dcdeploy.supervisorctl_client import SupervisorError
        self.calls["states"] += 1
        if self.all_fail:
            raise SupervisorError("getAllProcessInfo: broken")
        return {p: "RUNNING" for p in self.programs}

    def state(self, program: str) -> str:
        self.calls["state"] += 1
        return "RUNNING"

    def stop(self, program: str) -> None:
        raise AssertionError("nothing is stopped here")

    def start(self, program: str) -> None:
        raise AssertionError("nothing is started here")


@pytest.mark.parametrize("all_fail,states,state", [(False, 2, 0), (True, 2, 6)])
def test_a_cycle_asks_supervisord_once_for_all_its_programs(tmp_path, store_url, all_fail,
                                                            states, state):
    """Each cycle reads every program's state in one call, not one per service (the
    agents' per-service calls were most of supervisord's CPU during bench/waves.py); when
    that call fails, each service asks for its own as before."""
    from supervisor_dcdeploy.agent.config import AgentConfig
    from supervisor_dcdeploy.agent.worker import Agent
    programs = ["A", "B", "C"]
    sup = CountingSupervisor(programs, all_fail)
    cfg = AgentConfig(host="h0", rack="r0", store=store_url, root=tmp_path,
                      services={p: {} for p in programs}, start_timeout=5.0)
    agent = Agent(cfg, supervisor=sup)  # type: ignore[arg-type]
    try:
        assert agent.connect(timeout=15)
        agent.cycle()
        agent.cycle()
        assert sup.calls == {"states": states, "state": state}
        assert {svc: s["process"] for svc, s in agent.status.items()} == \
            dict.fromkeys(programs, "RUNNING")
    finally:
        agent.shutdown()


def test_supervisor_states_by_the_names_state_takes():
    """``getAllProcessInfo`` answers name and group: a program in its own group is found
    by its name, one of a group by ``group:name``; malformed entries are left out."""
    from supervisor_dcdeploy.supervisorctl_client import Supervisor

    class Proxy:
        class supervisor:  # noqa: N801 - the XML-RPC namespace's name
            @staticmethod
            def getAllProcessInfo():  # noqa: N802 - supervisord's method name
                return [{"name": "api", "group": "api", "statename": "RUNNING"},
                        {"name": "w_0", "group": "workers", "statename": "STARTING"},
                        {"name": 7, "group": "x", "statename": "RUNNING"}]

    sup = Supervisor("unix:///nonexistent.sock")
    sup._proxy = Proxy()  # type: ignore[assignment]
    assert sup.states() == {"api": "RUNNING", "api:api": "RUNNING",
                            "workers:w_0": "STARTING"}
