"""The arithmetic of ``bench/proberstall/run.py`` (issue 14, item 4): the gap is P's (a
sample covers ``[t, t + dt]``), a sample's lateness is against its own schedule, and a
late prober wake-up is compared with the samplers' lateness at the same moments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "bench" / "proberstall" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("proberstall_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probes(host: str, starts: list[float], dt: float) -> list[dict]:
    return [{"kind": "probe", "t": t, "host": host, "service": "a", "ok": True, "dt": dt}
            for t in starts]


def test_a_stall_shows_as_lateness_gap_and_excess_over_the_samplers(bench):
    period, dt = 0.040, 0.002
    on_time = [100 + i * period for i in range(20)]
    # h1's 11th sample is 50 ms late; the ones after it keep their period from it
    stalled = on_time[:10] + [t + 0.050 for t in on_time[10:]]
    events = probes("h1", stalled, dt) + probes("h2", on_time, dt)
    machine = [{"cpu": 0, "s": on_time[10] - 0.001, "e": on_time[10] + 0.047, "late": 0.048}]
    res = bench.analyse(events, period, machine, 0.0, 1e9)
    assert res["samples"] == 40
    assert res["worst_gap_ms"] == pytest.approx((period + 0.050 - dt) * 1e3, abs=0.1)
    assert res["late_max_ms"] == pytest.approx(50.0, abs=0.1)
    assert res["machine_max_ms"] == pytest.approx(48.0)
    (cluster,) = res["top"]
    assert cluster["wakes"] == 1
    assert cluster["excess_ms"] == pytest.approx(2.0, abs=0.1)


def test_a_wake_up_the_samplers_did_not_see_is_all_excess(bench):
    period = 0.040
    starts = [0.0, 0.040, 0.120, 0.160]  # 40 ms late at 0.120
    res = bench.analyse(probes("h1", starts, 0.001), period, [], 0.0, 1.0)
    assert res["max_excess_ms"] == pytest.approx(40.0, abs=0.1)


def test_a_slow_answer_is_not_lateness(bench):
    """A sample that took longer than a period is followed at once: the next one is due at
    the previous one's end, not one period after its start."""
    period = 0.040
    events = probes("h1", [0.0], 0.070) + probes("h1", [0.0705, 0.1105], 0.001)
    res = bench.analyse(events, period, [], 0.0, 1.0)
    assert res["late_max_ms"] == pytest.approx(0.5, abs=0.1)
    assert res["top"] == []


def test_samples_outside_the_samplers_window_are_left_out(bench):
    starts = [i * 0.040 for i in range(10)] + [0.5, 0.54]  # a 100 ms hole after the window
    res = bench.analyse(probes("h1", starts, 0.001), 0.040, [], 0.0, 0.37)
    assert res["samples"] == 10
    assert res["late_max_ms"] == pytest.approx(0.0, abs=0.1)
