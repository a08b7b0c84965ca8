"""Property (issue 8): whatever is written into any node of the store while a deploy runs,
no agent crashes, no cycle raises, no service drops below its quorum, and the CLI's read
paths do not raise. Real agents under real supervisord on a real ZooKeeper; hypothesis draws
which node kinds get which random or mutated values (supervisor_dcdeploy/lab/storefuzz.py).

bench/fuzz_store.py runs the same cases in the thousands.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.model import HealthCheck as Check
from supervisor_dcdeploy.lab.storefuzz import KINDS, Fuzzer, fuzz_cluster, fuzz_prober


@pytest.fixture
def fuzzer(workdir, store, store_url):
    cluster, quorum = fuzz_cluster(workdir, store, store_url, hosts=3, poll_interval=0.2)
    prober = fuzz_prober(cluster)
    try:
        yield Fuzzer(cluster, quorum, prober, case_timeout=60.0)
    finally:
        prober.stop()
        cluster.stop_all()


# The cluster is shared by the examples on purpose: each example restores what it wrote.
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# A seed, not st.randoms(): which nodes exist (the choices) depends on the running deploy, so
# the number of draws differs between runs, which hypothesis refuses from its own randoms.
@given(seed=st.integers(0, 2**32),
       kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True))
def test_random_store_values_never_crash_an_agent_or_break_quorum(fuzzer, seed, kinds):
    before = dict(fuzzer.tally.summary(), problems=len(fuzzer.tally.problems))
    fuzzer.round(random.Random(seed), kinds)
    after = fuzzer.tally.summary()
    new = {k: after[k] - before[k] for k in after if k != "cases"}
    assert new == {"agent_crashes": 0, "cycle_errors": 0, "services_below_quorum": 0,
                   "cli_errors": 0}, fuzzer.tally.problems[before["problems"]:]


def test_the_quorum_measure_sees_a_real_break(fuzzer):
    """The measure above can fail: a *valid* spec (quorum 0, every host at once; what a store
    writer could do before signatures) takes A below the quorum of 2 the fuzzer checks."""
    ops.service_set(fuzzer.store, "A", program="A", quorum=0, max_parallel=3,
                    health=Check(kind="http", path="/health", port="port", timeout=1.0),
                    healthy_secs=1.0)
    for _ in range(100):  # rounds with no write: each awaits two cycles of every agent
        fuzzer.round(random.Random(0), [])
        if fuzzer.tally.services_below_quorum:
            break
    assert fuzzer.tally.services_below_quorum > 0, "every host switched, the prober saw no dip"
    assert fuzzer.tally.agent_crashes == 0 and fuzzer.tally.cycle_errors == 0
