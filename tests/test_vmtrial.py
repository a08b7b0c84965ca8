"""The pure parts of the Vagrant VMs' netem trials (supervisor_dcdeploy/lab/vmtrial.py):
the netem spec, reading ``tc -s qdisc`` counters, the delay evidence, the drawn schedule."""

from __future__ import annotations

import pytest

from supervisor_dcdeploy.lab import vmtrial

QDISC = """\
qdisc netem 8001: root refcnt 2 limit 1000 delay 200ms  50ms loss 3%
 Sent 48213 bytes 412 pkt (dropped 13, overlimits 0 requeues 0)
 backlog 1220b 3p requeues 0
"""
PLAIN = """\
qdisc pfifo_fast 0: root refcnt 2 bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1
 Sent 9000 bytes 70 pkt (dropped 0, overlimits 0 requeues 0)
"""


def test_netem_spec_and_its_delay():
    spec = vmtrial.netem_spec(200, 50, 3)
    assert spec == "delay 200ms 50ms loss 3%"
    assert vmtrial.netem_delay_ms(spec) == 200.0
    assert vmtrial.netem_delay_ms("delay 1s") == 1000.0
    assert vmtrial.netem_delay_ms("delay 500us loss 1%") == 0.5


@pytest.mark.parametrize("args", [(0, 0, 1), (100, 150, 1), (100, 10, 100), (100, -1, 1)])
def test_netem_spec_refuses_what_tc_would_misread(args):
    with pytest.raises(ValueError, match="netem"):
        vmtrial.netem_spec(*args)


@pytest.mark.parametrize("spec", ["loss 3%", "delay", "delay 200"])
def test_netem_delay_needs_a_delay_with_a_unit(spec):
    with pytest.raises(ValueError, match="delay"):
        vmtrial.netem_delay_ms(spec)


def test_qdisc_counters():
    assert vmtrial.qdisc_counters(QDISC) == {"netem": True, "sent": 412, "dropped": 13}
    assert vmtrial.qdisc_counters(PLAIN) == {"netem": False, "sent": 70, "dropped": 0}
    assert vmtrial.qdisc_counters("") == {"netem": False, "sent": 0, "dropped": 0}


def test_delay_seen_needs_half_the_delay_on_top_of_the_baseline():
    assert vmtrial.delay_seen(2.0, 205.0, 200)
    assert vmtrial.delay_seen(2.0, 102.0, 200)
    assert not vmtrial.delay_seen(2.0, 90.0, 200)
    assert not vmtrial.delay_seen(None, 300.0, 200)
    assert not vmtrial.delay_seen(2.0, None, 200)


def test_conf_value():
    text = "[program:x]\ncommand = a = b\n[dcdeploy]\nsession_timeout = 4.0\n"
    assert vmtrial.conf_value(text, "session_timeout") == "4.0"
    assert vmtrial.conf_value(text, "command") == "a = b"
    assert vmtrial.conf_value(text, "missing") is None


def test_schedule_is_drawn_from_the_seed_within_the_ranges():
    hosts = ["h1", "h2", "h3"]
    kw = dict(delay_ms=(100, 300), loss_pct=(1.0, 5.0), duration=(20.0, 40.0), at=(2.0, 6.0))
    for seed in range(30):
        planned = vmtrial.schedule(seed, hosts, **kw)
        assert planned == vmtrial.schedule(seed, hosts, **kw)
        assert planned.kind == "netem" and planned.host in hosts
        assert 20.0 <= planned.duration <= 40.0 and 2.0 <= planned.at <= 6.0
        spec = planned.detail["netem"]
        assert 100 <= vmtrial.netem_delay_ms(spec) <= 300
        loss = float(spec.split()[-1].rstrip("%"))
        assert 1.0 <= loss <= 5.0
