"""The pure helpers of ``bench/scale.py``: its lower bound (docs/design.md §8) and how it
deals hosts to worker processes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "scale.py"
_spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
scale = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules.setdefault("bench_scale", scale)
_spec.loader.exec_module(scale)  # type: ignore[union-attr]


def test_equal_switches_give_the_design_bound():
    # 100 hosts, 2 at a time, 1 s each: 50 rounds of 1 s (+ healthy_secs each).
    assert scale.lower_bound([1.0] * 100, 100, 2, 0.0) == pytest.approx(50.0)
    assert scale.lower_bound([1.0] * 100, 100, 2, 0.5) == pytest.approx(75.0)


def test_a_slot_runs_ceil_n_over_k_switches():
    # 3 hosts, 2 slots: one slot switches twice, whatever the order.
    assert scale.lower_bound([1.0, 1.0, 1.0], 3, 2, 0.0) == pytest.approx(2.0)


def test_measured_switches_count_as_they_were():
    # A loaded machine stretched some switches: the total down time over k slots bounds it.
    switches = [1.0] * 8 + [3.0, 3.0]
    assert scale.lower_bound(switches, 10, 2, 0.0) == pytest.approx(sum(switches) / 2)
    assert scale.lower_bound(switches, 10, 2, 0.0) > math.ceil(10 / 2) * 1.0


def test_no_bound_without_switches():
    with pytest.raises(ValueError):
        scale.lower_bound([], 10, 2, 0.0)
    with pytest.raises(ValueError):
        scale.lower_bound([1.0], 10, 0, 0.0)


@pytest.mark.parametrize("n,procs", [(10, 2), (3, 8), (300, 7), (2, 1)])
def test_every_host_goes_to_exactly_one_worker(n, procs):
    slices = scale.split_hosts(n, procs)
    assert sorted(i for part in slices for i in part) == list(range(n))
    assert len(slices) == min(n, procs) and all(slices)


def test_procs_must_be_positive():
    with pytest.raises(SystemExit):
        scale.parse_args(["--hosts", "10", "--procs", "0"])


def test_each_round_s_hand_off_is_the_gap_from_a_finish_to_the_stop_it_let_through():
    # k = 2: hosts a and b stop at 0 and 0.1, finish at 1.0 and 1.1; c stops at 1.05
    # (let through by a's finish), d at 1.3 (by b's).
    gaps = scale.handoffs([0.0, 0.1, 1.05, 1.3], [1.0, 1.1, 2.05, 2.3], 2)
    assert gaps == pytest.approx([0.05, 0.2])
    # Order of recording does not matter (workers report in any order).
    assert scale.handoffs([1.3, 0.0, 1.05, 0.1], [2.3, 1.1, 1.0, 2.05], 2) == \
        pytest.approx([0.05, 0.2])
    assert scale.handoffs([0.0, 0.1], [1.0, 1.1], 2) == []


def test_worker_threads_are_told_apart_by_name():
    """``clients_cpu_s_by_thread``: the agents' loops (named by the bench), kazoo's
    connection and callback threads (Python puts the target's name in the default name),
    the rest; and the split reads this process's own threads."""
    assert scale.thread_kind("agent-h0042") == "agent"
    assert scale.thread_kind("Thread-87 (zk_loop)") == "kazoo_connection"
    assert scale.thread_kind("Thread-3 (_thread_worker)") == "kazoo_callbacks"
    assert scale.thread_kind("MainThread") == "other"
    split = scale.thread_cpu()
    assert set(split) == {"agent", "kazoo_connection", "kazoo_callbacks", "other"}
    assert split["other"] > 0 and split["agent"] == 0  # this test's own thread: other


def test_waiting_for_the_deploy_survives_the_bench_s_own_connection_loss():
    """At 300 hosts on a starved machine the bench's own session lost its connection and
    the whole run ended with it: the wait asks again once the store answers."""
    from supervisor_dcdeploy.store import StoreUnavailable

    class Flaky:
        def __init__(self) -> None:
            self.answers = [StoreUnavailable("zookeeper: ConnectionLoss"), 0, None]
            self.asked = 0

        def exists(self, path, watch=None):
            self.asked += 1
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            if answer is not None:
                watch()  # the node changed: look again
            return answer

    store = Flaky()
    scale.wait_gone(store, "deploy/item-0000000001", timeout=30)
    assert store.asked == 3


def test_waiting_for_the_deploy_still_times_out():
    class Stuck:
        def exists(self, path, watch=None):
            return 0

    with pytest.raises(TimeoutError):
        scale.wait_gone(Stuck(), "deploy/item-0000000001", timeout=0.05)
