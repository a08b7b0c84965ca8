"""Table tests for the canary rules at the gate (canary.py) and the verified-peers rules
(peers.py): pure functions, no store."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from supervisor_dcdeploy import canary, decisions as d, peers
from supervisor_dcdeploy.model import (CurrentEntry, DeployItem, InvalidData, ServiceSpec,
                                       StagedRelease, StagingEntry)

SHA = "a" * 64
RACKS = {"h0": "r0", "h1": "r1", "h2": "r0", "h3": "r1"}


def view(current=None, staging=(), quorum=2, max_parallel=1, **item):
    current = current if current is not None else {h: "1" for h in RACKS}
    head = DeployItem("item-0000000001", 1, "api", "2", item.pop("state", "rolling"), **item)
    return d.ServiceView(
        service="api", spec=ServiceSpec("api", "api", quorum, max_parallel=max_parallel),
        staged=StagedRelease("api", "2", SHA, 1, urls=("file:///x",)),
        current={h: CurrentEntry(h, v, rack=RACKS[h]) for h, v in current.items()},
        staging=[StagingEntry(f"{h}-{i:010d}", i, h, "2") for i, h in enumerate(staging)],
        queue=[head])


HOLD_TABLE = [
    # (description, view kwargs, host, now, may pass, reason fragment)
    ("no canaries: the usual gate", dict(staging=["h3"]), "h3", 0, True, "keeps quorum"),
    ("non-canary refused before any canary switched",
     dict(staging=["h3", "h0"], canary=2), "h3", 0, False, "waiting for h0, h1"),
    ("a canary behind a non-canary in the queue passes",
     dict(staging=["h3", "h0"], canary=2), "h0", 0, True, "keeps quorum"),
    ("recorded canaries are used, not chosen again",
     dict(staging=["h2"], canary=2, canaries=("h2", "h3")), "h2", 0, True, "keeps"),
    ("soak running holds the others",
     dict(current={"h0": "2", "h1": "2", "h2": "1", "h3": "1"}, staging=["h2"], canary=2,
          canaries=("h0", "h1"), soak_secs=60, canaries_done_at=100.0), "h2", 130, False,
     "30 s of 60 s left"),
    ("soak over: the others go",
     dict(current={"h0": "2", "h1": "2", "h2": "1", "h3": "1"}, staging=["h2"], canary=2,
          canaries=("h0", "h1"), soak_secs=60, canaries_done_at=100.0), "h2", 161, True,
     "keeps"),
    ("no soak: only approval ends the hold",
     dict(current={"h0": "2", "h1": "2", "h2": "1", "h3": "1"}, staging=["h2"], canary=2,
          canaries=("h0", "h1"), canaries_done_at=100.0), "h2", 10**9, False,
     "until approved"),
    ("approved: the others go at once",
     dict(staging=["h2"], canary=2, canaries=("h0", "h1"), approved=True), "h2", 0, True,
     "keeps"),
    ("a canary still obeys quorum", dict(staging=["h0"], canary=2, quorum=4), "h0", 0, False,
     "quorum"),
]


@pytest.mark.parametrize("desc,kwargs,host,now,ok,fragment", HOLD_TABLE,
                         ids=[t[0] for t in HOLD_TABLE])
def test_canary_gate(desc, kwargs, host, now, ok, fragment):
    hold = canary.hold(view(**kwargs), host, now)
    decision = canary.gate_decision(hold, host, "1")
    assert decision.ok is ok and fragment in decision.reason, decision.reason


def test_canaries_spread_over_racks_and_recorded_by_the_first():
    hold = canary.hold(view(staging=["h0"], canary=2), "h0", 0)
    assert hold.canaries == ("h0", "h1") and hold.record == ("h0", "h1")
    recorded = canary.hold(view(staging=["h0"], canary=2, canaries=("h0", "h1")), "h0", 0)
    assert recorded.record == ()


def test_stamp_soaking_and_rollback():
    on = {"h0": "2", "h1": "2", "h2": "1", "h3": "1"}
    assert canary.should_stamp(view(current=on, canary=2, canaries=("h0", "h1")))
    assert not canary.should_stamp(view(current={**on, "h1": "1"}, canary=2,
                                        canaries=("h0", "h1")))
    soak = view(current=on, canary=2, canaries=("h0", "h1"), soak_secs=60,
                canaries_done_at=100.0)
    assert canary.soaking(soak, "h0", 120) and not canary.soaking(soak, "h2", 120)
    assert not canary.soaking(soak, "h0", 161)  # the hold ended: no more soak checks
    failed = view(current=on, canary=2, canaries=("h0", "h1"), state="failed", rollback=True)
    assert canary.may_roll_back(failed, "h1", "2", "1")
    assert not canary.may_roll_back(failed, "h2", "1", None)
    assert "not on 2" in canary.may_roll_back(failed, "h0", "1", "2").reason
    assert "quorum" in canary.may_roll_back(replace(failed, spec=ServiceSpec(
        "api", "api", 4)), "h1", "2", "1").reason
    # a canary whose process stopped on the new version during the hold failed
    assert canary.failed_in_hold(soak, "h0", "2", 120)
    assert not canary.failed_in_hold(soak, "h0", "2", 161)  # soak over
    assert not canary.failed_in_hold(soak, "h2", "1", 120)  # not a canary
    assert not canary.failed_in_hold(soak, "h1", "1", 120)  # on the old version
    plain_fail = view(current=on, canary=2, canaries=("h0", "h1"), state="failed")
    assert not canary.may_roll_back(plain_fail, "h1", "2", "1")


def test_all_hosts_canaries_still_soak():
    on = {h: "2" for h in RACKS}
    v = view(current=on, canary=9, canaries=tuple(RACKS), soak_secs=60,
             canaries_done_at=100.0)
    assert d.item_complete(v)  # by versions alone it would be done ...
    assert canary.hold(v, "", 120).holding  # ... but the worker waits for the soak
    assert not canary.hold(v, "", 161).holding


def test_item_fields_bounded():
    bad = [b'{"service":"a","version":"1","canary":-1}',
           b'{"service":"a","version":"1","soak_secs":1e12}',
           b'{"service":"a","version":"1","canaries":["no way"]}',
           b'{"service":"a","version":"1","approved":"yes"}',
           b'{"service":"a","version":"1","timings":[{"stop_s":-1,"start_s":1,'
           b'"healthy_s":1,"version":"1"}]}']
    for raw in bad:
        with pytest.raises(InvalidData):
            DeployItem.parse("item-0000000001", raw)
    with pytest.raises(InvalidData, match="probe"):
        CurrentEntry.parse("api", "h0", b'{"version":"1","probe":"ftp://x:1"}')


# -- verified peers ------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def listeners():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Health) for _ in range(3)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}/health" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connecting is refused


def test_silent_host_is_not_online_and_gives_up_its_slot(listeners):
    dead = f"http://127.0.0.1:{dead_port()}/health"
    probes = {"h0": None, "h1": dead, "h2": listeners[0], "h3": listeners[1]}
    v = view(staging=["h1", "h0"], quorum=2)
    v = replace(v, current={h: replace(e, probe=probes[h]) for h, e in v.current.items()})
    assert "queue position 2" in d.may_take_down(v, "h0", "1").reason  # h1 holds the slot
    result = peers.verify(v, "h0")
    assert result.silent == ("h1",) and set(result.answered) == {"h2", "h3"}
    assert result.probes == 3
    verified = peers.without(v, result.silent)
    assert "h1" not in verified.current
    assert d.may_take_down(verified, "h0", "1")
    # the cheap look before the gate: h0 (position 1, max_parallel 1) sees h1 silent
    assert peers.online_ahead(v, "h0") == ["h1"] and peers.any_silent(v, ["h1"])
    assert not peers.any_silent(v, ["h2", "h3"])
    # quorum 3: with h1 silent only 2 others answer, so h0 may not go
    v3 = replace(v, spec=ServiceSpec("api", "api", 3))
    assert not d.may_take_down(peers.without(v3, peers.verify(v3, "h0").silent), "h0", "1")


def test_verify_stops_once_enough_answered(listeners):
    v = view(staging=["h0"], quorum=1)
    v = replace(v, current={h: replace(e, probe=listeners[0]) for h, e in v.current.items()})
    calls = []
    gate = threading.Event()

    def run(probe):
        calls.append(probe.url)
        if len(calls) > 1:
            gate.wait(5)  # the others hang: the first answer is enough for quorum 1
        return None

    result = peers.verify(v, "h0", run=run)
    gate.set()
    assert len(result.answered) == 1 and len(result.unknown) == 2 and not result.silent


def test_probe_target_from_agent_conf():
    from types import SimpleNamespace
    spec = ServiceSpec("api", "api", 1)
    http = replace(spec, health=spec.health.__class__(kind="http", path="/h", port="port"))
    cfg = SimpleNamespace(variables=lambda svc: {"port": "8080", "probe_address": "10.0.0.5"},
                          extra={})
    assert peers.probe_target(http, cfg, "api") == "http://10.0.0.5:8080/h"
    nothing = SimpleNamespace(variables=lambda svc: {"port": "8080"}, extra={})
    assert peers.probe_target(http, nothing, "api") is None
    assert peers.probe_target(spec, cfg, "api") is None  # kind none: nothing to probe
