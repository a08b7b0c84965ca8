"""Table tests and properties for the rollout policy (issue 10): waves, host and rack
limits, rack order, canaries, the extended gate, and the plan's prediction."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor_dcdeploy import policy as p
from supervisor_dcdeploy.decisions import dependencies
from supervisor_dcdeploy.model import DeployItem, InvalidData


def svc(name="api", racks=None, online=None, quorum=0, max_parallel=1, depends_on=(),
        target="2", switching=(), approved=False, canaries_done_at=None, **policy):
    racks = racks if racks is not None else {f"h{i}": "r1" for i in range(4)}
    online = online if online is not None else {h: "1" for h in racks if h not in switching}
    return p.ServiceState(name=name, quorum=quorum, max_parallel=max_parallel,
                          depends_on=tuple(depends_on), policy=p.Policy(**policy),
                          racks=racks, online=online, switching=frozenset(switching),
                          target=target, approved=approved, canaries_done_at=canaries_done_at)


def item(seq, service, version="2", state="waiting", reason=None):
    return DeployItem(f"item-{seq:010d}", seq, service, version, state, reason)


def gate_view(*services, queue=None, host_parallel=1, now=0.0):
    queue = queue if queue is not None else [item(i + 1, s.name) for i, s in
                                             enumerate(services)]
    return p.GateView({s.name: s for s in services}, queue, host_parallel, now)


def names(items):
    return [i.service for i in items]


# ----------------------------------------------------------------------------- waves

def deps(**d):
    return {n: svc(n, depends_on=ds) for n, ds in d.items()}


def test_independent_items_roll_together_dependents_wait():
    specs = deps(a=(), b=("a",), c=(), d=())
    queue = [item(1, "a"), item(2, "b"), item(3, "c"), item(4, "d")]
    active = p.active_items(queue, specs)
    assert names(i for i, _ in active) == ["a", "c", "d"]
    assert p.blocked_items(queue, specs) == [
        (queue[1], "waiting for a 2 (item-0000000001, waiting): b depends on it")]
    assert [names(w) for w in p.waves(queue, specs)] == [["a", "c", "d"], ["b"]]


def test_dependency_is_transitive_through_unqueued_services():
    specs = deps(a=(), b=("a",), c=("b",))
    queue = [item(1, "a"), item(2, "c")]
    assert names(i for i, _ in p.active_items(queue, specs)) == ["a"]


def test_two_chains_and_independents_make_three_waves():
    specs = deps(a1=(), a2=("a1",), a3=("a2",), b1=(), b2=("b1",), c1=(), c2=(), c3=())
    queue = [item(i + 1, n) for i, n in enumerate(["a1", "a2", "a3", "b1", "b2", "c1", "c2",
                                                   "c3"])]
    assert [names(w) for w in p.waves(queue, specs)] == [
        ["a1", "b1", "c1", "c2", "c3"], ["a2", "b2"], ["a3"]]


@pytest.mark.parametrize("queue,active,blocked_reason", [
    ([item(1, "a", state="paused"), item(2, "b"), item(3, "c")], ["c"], "paused"),
    ([item(1, "a", state="failed", reason="h1: unhealthy"), item(2, "b")], [],
     "failed: h1: unhealthy"),
    ([item(1, "a", state="done"), item(2, "b")], ["b"], None),
    ([item(1, "a", state="aborted"), item(2, "b")], ["b"], None),
    ([item(1, "a"), item(2, "a", version="3")], ["a"],
     "waiting for the earlier item of a (item-0000000001) to finish"),
    ([item(1, "c", state="invalid", reason="bad json"), item(2, "a")], [],
     "deploy queue blocked at item-0000000001: bad json"),
    ([item(1, "zz"), item(2, "a")], ["a"], 'service "zz" is not defined'),
])
def test_active_items_table(queue, active, blocked_reason):
    specs = deps(a=(), b=("a",), c=())
    assert names(i for i, _ in p.active_items(queue, specs)) == active
    blocked = p.blocked_items(queue, specs)
    if blocked_reason is None:
        assert blocked == []
    else:
        assert blocked_reason in [why for _, why in blocked]


def test_waves_leave_out_items_that_never_roll():
    specs = deps(a=(), b=("a",), c=())
    queue = [item(1, "a", state="paused"), item(2, "b"), item(3, "c")]
    assert [names(w) for w in p.waves(queue, specs)] == [["c"]]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_waves_respect_every_dependency(data):
    n = data.draw(st.integers(1, 8))
    services = [f"s{i}" for i in range(n)]
    specs = {s: svc(s, depends_on=data.draw(st.lists(st.sampled_from(services[:i]),
                                                     unique=True)) if i else ())
             for i, s in enumerate(services)}
    order = data.draw(st.permutations(services))
    queue = [item(i + 1, s) for i, s in enumerate(order)]
    where = {i.service: w for w, wave in enumerate(p.waves(queue, specs)) for i in wave}
    assert set(where) == set(services)  # everything rolls eventually
    for i, a in enumerate(queue):
        for b in queue[i + 1:]:
            if a.service in dependencies(specs, b.service):
                assert where[a.service] < where[b.service]
    # and an item is in the first wave it could be: something in the wave before holds it
    for s, w in where.items():
        if w:
            ahead = queue[:order.index(s)]
            assert any(where[a.service] == w - 1 for a in ahead
                       if a.service in dependencies(specs, s))


# ----------------------------------------------------------------------------- policy

def test_policy_parses_and_round_trips():
    raw = {"max_down_per_rack": 2, "rack_order": ["r2", "r1"], "canary": 3,
           "soak_secs": 60, "verify_peers": True}
    pol = p.Policy.parse("services/api", raw)
    assert pol == p.Policy(2, True, ("r2", "r1"), 3, 60.0, True)
    assert p.Policy.parse("x", pol.to_dict()) == pol
    assert p.Policy.parse("x", {}) == p.Policy()
    assert p.Policy.parse("x", {"rack_order": True}).rack_names == ()


@pytest.mark.parametrize("raw,field,problem", [
    ({"max_down_per_rack": 0}, "max_down_per_rack", "must be 1.."),
    ({"max_down_per_rack": True}, "max_down_per_rack", "expected int"),
    ({"rack_order": "r1"}, "rack_order", "expected bool or list"),
    ({"rack_order": ["r1", "r1"]}, "rack_order", "names a rack twice"),
    ({"rack_order": ["bad rack"]}, "rack_order[0]", "not a valid name"),
    ({"canary": -1}, "canary", "must be 0.."),
    ({"canary": 2, "soak_secs": float("inf")}, "soak_secs", "not a finite number"),
    ({"canary": 2, "soak_secs": -1}, "soak_secs", "must be 0.."),
    ({"soak_secs": 30}, "soak_secs", "a soak needs canaries"),
    ({"verify_peers": "yes"}, "verify_peers", "expected bool"),
])
def test_policy_refuses_bad_values(raw, field, problem):
    with pytest.raises(InvalidData) as exc:
        p.Policy.parse("services/api", raw)
    assert exc.value.field == field
    assert problem in exc.value.problem


@pytest.mark.parametrize("value,ok", [(1, True), (64, True), (0, False), (65, False),
                                      (True, False), ("2", False)])
def test_host_parallel_bounds(value, ok):
    if ok:
        assert p.check_host_parallel("--host-parallel", value) == value
    else:
        with pytest.raises(InvalidData, match="host_parallel"):
            p.check_host_parallel("--host-parallel", value)


# ----------------------------------------------------------------------------- canaries

RACKS6 = {"a1": "r1", "a2": "r1", "a3": "r1", "b1": "r2", "b2": "r2", "b3": "r2"}


def test_canaries_spread_over_racks_and_skip_offline_hosts():
    assert p.canary_hosts(svc(racks=RACKS6, canary=3)) == ("a1", "b1", "a2")
    s = svc(racks=RACKS6, canary=3, online={h: "1" for h in RACKS6 if h != "a1"})
    assert p.canary_hosts(s) == ("a2", "b1", "a3")
    # with a rack order, from the first rack on (spread, they would wait for each other)
    assert p.canary_hosts(svc(racks=RACKS6, canary=4, rack_order=True, rack_names=("r2",))) == \
        ("b1", "b2", "b3", "a1")
    assert p.canary_hosts(svc(racks=RACKS6, canary=10)) == \
        ("a1", "b1", "a2", "b2", "a3", "b3")
    assert p.canary_hosts(svc(racks=RACKS6)) == ()


def on_target(hosts, base=None):
    return {h: ("2" if h in hosts else "1") for h in (base or RACKS6)}


@pytest.mark.parametrize("kwargs,now,holding,reason", [
    (dict(), 0, False, "no canaries"),
    (dict(canary=2, soak_secs=60), 0, True, "canary: waiting for a1, b1 to serve 2"),
    (dict(canary=2, soak_secs=60, online=on_target({"a1"})), 0, True,
     "canary: waiting for b1 to serve 2"),
    (dict(canary=2, soak_secs=60, online=on_target({"a1", "b1"})), 0, True,
     "canary: soak not started yet"),
    (dict(canary=2, soak_secs=60, online=on_target({"a1", "b1"}), canaries_done_at=100), 130,
     True, "canary: soaking, 30 s of 60 s left (or dcdeploy approve api)"),
    (dict(canary=2, soak_secs=60, online=on_target({"a1", "b1"}), canaries_done_at=100), 160,
     False, "canary: soaked 60 s on a1, b1"),
    (dict(canary=2, online=on_target({"a1", "b1"})), 10**6, True,
     "canary: a1, b1 on 2, holding until approved (dcdeploy approve api)"),
    (dict(canary=2, approved=True), 0, False, "canaries a1, b1 approved"),
])
def test_canary_status_table(kwargs, now, holding, reason):
    status = p.canary_status(svc(racks=RACKS6, **kwargs), now)
    assert status.holding is holding
    assert status.reason == reason


def test_apply_back_stamps_the_soak_start_when_the_last_canary_is_back():
    view = gate_view(svc(racks=RACKS6, canary=2, soak_secs=60, online=on_target({"a1"}),
                         switching={"b1"}), now=42.0)
    assert view.services["api"].canaries_done_at is None
    after = p.apply_back(view, "b1", "api")
    assert after.services["api"].canaries_done_at == 42.0
    assert not p.canary_status(after.services["api"], 102.0).holding


# ----------------------------------------------------------------------------- gate

def admit(*services, host, service="api", **kw):
    return p.admit_take_down(gate_view(*services, **kw), host, service)


GATE_TABLE = [
    # (description, services, gate_view kwargs, host, service, ok, reason fragment)
    ("admitted, quorum kept", [svc(quorum=2)], {}, "h0", "api", True,
     "deploy item-0000000001: take-down to 2 keeps quorum 2"),
    ("undefined service", [svc()], {}, "h0", "web", False, "service web is not defined"),
    ("host not registered", [svc()], {}, "zz", "api", False, "zz is not registered for api"),
    ("no deploy queued", [svc()], {"queue": []}, "h0", "api", False, "no deploy queued for api"),
    ("dependency edge", [svc("a"), svc("api", depends_on=("a",))], {}, "h0", "api", False,
     "deploy item-0000000002: waiting for a 2 (item-0000000001, waiting): api depends on it"),
    ("dependency done", [svc("a"), svc("api", depends_on=("a",))],
     {"queue": [item(1, "a", state="done"), item(2, "api")]}, "h0", "api", True, "keeps"),
    ("independent rolls beside", [svc("a"), svc("api")], {}, "h0", "api", True, "keeps"),
    ("paused item", [svc()], {"queue": [item(1, "api", state="paused")]}, "h0", "api", False,
     "deploy item-0000000001: paused"),
    ("target mismatch", [svc(target="3")], {}, "h0", "api", False,
     "wants 2 but the snapshot's target is 3"),
    ("already switching", [svc(switching={"h0"})], {}, "h0", "api", False,
     "h0 is already switching api"),
    ("already on target", [svc(online={"h0": "2", "h1": "1"},
                               racks={"h0": "r1", "h1": "r1"})], {}, "h0", "api", False,
     "already on 2"),
    ("max_parallel", [svc(switching={"h1"})], {}, "h0", "api", False,
     "max_parallel 1: switching now h1"),
    ("max_parallel 2", [svc(switching={"h1"}, max_parallel=2)], {}, "h0", "api", True, "keeps"),
    ("host_parallel", [svc("a", switching={"h0"}), svc("api")], {}, "h0", "api", False,
     "host_parallel 1: h0 is switching a"),
    ("host_parallel 2", [svc("a", switching={"h0"}), svc("api")], {"host_parallel": 2},
     "h0", "api", True, "keeps"),
    ("quorum", [svc(quorum=4)], {}, "h0", "api", False,
     "quorum: 4 online, quorum 4, 0 hosts offline"),
    ("offline host switches at no quorum cost",
     [svc(quorum=3, online={"h1": "1", "h2": "1", "h3": "1"})], {}, "h0", "api", True, "keeps"),
    ("rack budget", [svc(racks=RACKS6, switching={"a1"}, max_parallel=3,
                         max_down_per_rack=1)], {}, "a2", "api", False,
     "rack budget: rack r1 has 1 down (a1), max_down_per_rack 1"),
    ("rack budget counts offline hosts",
     [svc(racks=RACKS6, online=on_target(set(), {h: 0 for h in RACKS6 if h != "a3"}),
          max_parallel=3, max_down_per_rack=1)], {}, "a2", "api", False,
     "rack budget: rack r1 has 1 down (a3)"),
    ("other rack within budget", [svc(racks=RACKS6, switching={"a1"}, max_parallel=3,
                                      max_down_per_rack=1)], {}, "b1", "api", True,
     "and rack r2 within 1"),
    ("rack order: r1 first", [svc(racks=RACKS6, rack_order=True, max_parallel=3)], {}, "b1",
     "api", False, "rack order: rack r1 first (3 hosts left: a1, a2, a3)"),
    ("rack order: r1 turn", [svc(racks=RACKS6, rack_order=True, max_parallel=3)], {}, "a1",
     "api", True, "keeps"),
    ("rack order: switching holds the rack",
     [svc(racks=RACKS6, rack_order=True, online=on_target({"a1", "a2"}, {
         h: 0 for h in RACKS6 if h != "a3"}), switching={"a3"}, max_parallel=3)], {}, "b1",
     "api", False, "rack order: rack r1 first (1 hosts left: a3)"),
    ("rack order: r1 done", [svc(racks=RACKS6, rack_order=True,
                                 online=on_target({"a1", "a2", "a3"}))], {}, "b1", "api",
     True, "keeps"),
    ("rack order given", [svc(racks=RACKS6, rack_order=True, rack_names=("r2",))], {}, "a1", "api",
     False, "rack order: rack r2 first"),
    ("canary admitted", [svc(racks=RACKS6, canary=2, soak_secs=60)], {}, "b1", "api", True,
     "canary take-down"),
    ("non-canary held", [svc(racks=RACKS6, canary=2, soak_secs=60)], {}, "a2", "api", False,
     "canary: waiting for a1, b1 to serve 2"),
    ("non-canary soaking", [svc(racks=RACKS6, canary=2, soak_secs=60, canaries_done_at=0,
                                online=on_target({"a1", "b1"}))], {"now": 10}, "a2", "api",
     False, "canary: soaking, 50 s of 60 s left"),
    ("non-canary, 1 s of soak left", [svc(racks=RACKS6, canary=2, soak_secs=60,
                                          canaries_done_at=0, online=on_target({"a1", "b1"}))],
     {"now": 59}, "a2", "api", False, "canary: soaking, 1 s of 60 s left"),
    ("non-canary after soak", [svc(racks=RACKS6, canary=2, soak_secs=60, canaries_done_at=0,
                                   online=on_target({"a1", "b1"}))], {"now": 60}, "a2", "api",
     True, "keeps"),
    ("non-canary after approve", [svc(racks=RACKS6, canary=2, approved=True)], {}, "a2",
     "api", True, "keeps"),
]


@pytest.mark.parametrize("desc,services,kw,host,service,ok,reason", GATE_TABLE,
                         ids=[row[0] for row in GATE_TABLE])
def test_gate_table(desc, services, kw, host, service, ok, reason):
    decision = p.admit_take_down(gate_view(*services, **kw), host, service)
    assert decision.ok is ok
    assert reason in decision.reason


# An independent statement of every invariant, not sharing code with the gate.

def _deps(view, name):
    out, todo = set(), list(view.services[name].depends_on)
    while todo:
        d = todo.pop()
        if d not in out and d in view.services:
            out.add(d)
            todo.extend(view.services[d].depends_on)
    return out


def _rack_rank(s):
    present = sorted(set(s.racks.values()))
    order = [r for r in s.policy.rack_names if r in present] + \
        [r for r in present if r not in s.policy.rack_names]
    return order


def check_admission(view, host, name):
    """What must hold for a take-down to be admitted, checked before it is applied."""
    s = view.services[name]
    idx = next(i for i, it in enumerate(view.queue) if it.service == name
               and it.state not in ("done", "aborted"))
    for before in view.queue[:idx]:
        if before.state not in ("done", "aborted"):
            assert before.service != name and before.service not in _deps(view, name)
    assert len(s.switching) + 1 <= s.max_parallel
    assert sum(host in o.switching for o in view.services.values()) + 1 <= view.host_parallel
    if host in s.online:
        assert len(s.online) - 1 >= s.quorum
        if s.policy.max_down_per_rack is not None:
            rack = s.racks[host]
            down = [h for h, r in s.racks.items() if r == rack and h not in s.online]
            assert len(down) + 1 <= s.policy.max_down_per_rack
    if s.policy.rack_order:
        rank = _rack_rank(s)
        for h, r in s.racks.items():
            if rank.index(r) < rank.index(s.racks[host]):
                assert h not in s.switching
                assert h not in s.online or s.online[h] == s.target
    canaries = p.canary_hosts(s)
    if canaries and host not in canaries and not s.approved:
        assert all(s.online.get(c) == s.target for c in canaries)
        assert s.policy.soak_secs and s.canaries_done_at is not None
        assert view.now >= s.canaries_done_at + s.policy.soak_secs


def check_state(view, initial):
    """What must hold of the shared state after every step."""
    for name, s in view.services.items():
        init = initial.services[name]
        assert len(s.switching) <= s.max_parallel
        assert len(s.online) >= min(len(init.online), s.quorum)
        if s.policy.max_down_per_rack is not None:
            for rack in set(s.racks.values()):
                down = [h for h, r in s.racks.items() if r == rack and h not in s.online]
                was = [h for h, r in s.racks.items() if r == rack and h not in init.online]
                assert len(down) <= max(len(was), s.policy.max_down_per_rack)
    for host in {h for s in view.services.values() for h in s.racks}:
        assert sum(host in s.switching for s in view.services.values()) <= view.host_parallel
    # S2 per edge: no host of B switches to or serves B's new version while an item of a
    # service B depends on, ahead of B's, is not done.
    for i, a in enumerate(view.queue):
        if a.state in ("done", "aborted"):
            continue
        for b in view.queue[i + 1:]:
            if a.service in _deps(view, b.service) or a.service == b.service:
                sb = view.services[b.service]
                assert not sb.switching
                assert not any(v == b.version for v in sb.online.values())


@st.composite
def fleets(draw):
    n_hosts = draw(st.integers(2, 7))
    racks = {f"h{i}": draw(st.sampled_from(["r1", "r2", "r3"])) for i in range(n_hosts)}
    hosts = sorted(racks)
    n_svc = draw(st.integers(1, 3))
    services = []
    for i in range(n_svc):
        mine = draw(st.lists(st.sampled_from(hosts), min_size=1, unique=True))
        online = draw(st.lists(st.sampled_from(mine), unique=True))
        canary = draw(st.integers(0, 2))
        services.append(svc(
            f"s{i}", racks={h: racks[h] for h in mine}, online={h: "1" for h in online},
            quorum=draw(st.integers(0, len(mine))), max_parallel=draw(st.integers(1, 3)),
            depends_on=draw(st.lists(st.sampled_from([f"s{j}" for j in range(i)]),
                                     unique=True)) if i else (),
            max_down_per_rack=draw(st.none() | st.integers(1, 2)),
            rack_order=draw(st.booleans()), canary=canary,
            soak_secs=draw(st.sampled_from([0.0, 5.0])) if canary else 0.0))
    order = draw(st.permutations(services))
    return gate_view(*services, queue=[item(i + 1, s.name) for i, s in enumerate(order)],
                     host_parallel=draw(st.integers(1, 2)))


def _finish_items(view):
    queue = list(view.queue)
    for i, it in enumerate(queue):
        if it.state in p.ACTIVE_STATES and p.item_done(view.services[it.service]):
            queue[i] = replace(it, state="done")
    return replace(view, queue=queue)


@settings(max_examples=400, deadline=None)
@given(fleets(), st.data())
def test_no_interleaving_breaks_an_invariant(view, data):
    """Hosts ask the gate in any order, come back in any order, time passes, operators
    approve; each admitted take-down is committed before the next decision (the atomic
    gate commit serializes them). No step breaks quorum, max_parallel, host_parallel, a
    rack budget, the rack order, a canary hold or a dependency edge."""
    initial = view
    pairs = [(h, s.name) for s in view.services.values() for h in sorted(s.racks)]
    for _ in range(data.draw(st.integers(20, 80))):
        kind = data.draw(st.sampled_from(["down", "down", "down", "back", "back", "tick",
                                          "approve"]))
        host, name = data.draw(st.sampled_from(pairs))
        back = sorted((h, s.name) for s in view.services.values() for h in s.switching)
        # A refused request changes nothing, so "any interleaving" is any order of the
        # requests the gate admits: draw the next one among those.
        admissible = [(h, n) for h, n in pairs if p.admit_take_down(view, h, n)]
        if kind == "down" and admissible:
            host, name = data.draw(st.sampled_from(admissible))
            check_admission(view, host, name)
            view = p.apply_take_down(view, host, name)
        elif kind == "back" and back:
            host, name = data.draw(st.sampled_from(back))
            view = _finish_items(p.apply_back(view, host, name))
        elif kind == "tick":
            view = replace(view, now=view.now + data.draw(st.sampled_from([1, 4])))
        elif kind == "approve":
            s = replace(view.services[name], approved=True)
            view = replace(view, services={**view.services, name: s})
        check_state(view, initial)


def run_to_completion(view, max_steps=200):
    """Greedy scheduler: each round, every host asks for every service in a fixed order,
    then every switching host comes back. Returns the rounds: what was admitted in each."""
    rounds = []
    for _ in range(max_steps):
        admitted = []
        for s in sorted(view.services):
            for h in sorted(view.services[s].racks):
                if p.admit_take_down(view, h, s):
                    view = p.apply_take_down(view, h, s)
                    admitted.append((h, s))
        if not admitted and all(i.state == "done" for i in view.queue):
            return rounds, view
        rounds.append(admitted)
        for s in sorted(view.services):
            for h in sorted(view.services[s].switching):
                view = p.apply_back(view, h, s)
        view = _finish_items(replace(view, now=view.now + 1))
    raise AssertionError(f"no progress after {max_steps} rounds")


def test_waves_roll_together_in_a_simulated_fleet():
    """6 hosts in 2 racks; a -> b, c and d independent, each on all hosts, quorum 4,
    max_parallel 2, host_parallel 3: a, c, d switch in the first round together, b only
    once a's item is done; at most 1 host per rack down for each service."""
    racks = {f"a{i}": "r1" for i in range(3)} | {f"b{i}": "r2" for i in range(3)}
    services = [svc(n, racks=racks, quorum=4, max_parallel=2, depends_on=d,
                    max_down_per_rack=1) for n, d in
                [("a", ()), ("b", ("a",)), ("c", ()), ("d", ())]]
    rounds, end = run_to_completion(gate_view(*services, host_parallel=3))
    assert {s for _, s in rounds[0]} == {"a", "c", "d"}
    first_b = next(i for i, r in enumerate(rounds) if any(s == "b" for _, s in r))
    last_a = max(i for i, r in enumerate(rounds) if any(s == "a" for _, s in r))
    assert first_b > last_a
    for r in rounds:
        for s in "abcd":
            by_rack = [racks[h] for h, x in r if x == s]
            assert len(by_rack) == len(set(by_rack))  # one per rack per service
    assert all(set(s.online.values()) == {"2"} for s in end.services.values())


def test_canary_fleet_holds_until_approved():
    services = [svc(racks=RACKS6, quorum=3, max_parallel=3, canary=2)]
    view = gate_view(*services)
    rounds = []
    for _ in range(3):
        rounds.append([h for h in sorted(RACKS6) if p.admit_take_down(view, h, "api")
                       and (view := p.apply_take_down(view, h, "api"))])
        for h in sorted(view.services["api"].switching):
            view = p.apply_back(view, h, "api")
    assert rounds == [["a1", "b1"], [], []]
    approved = replace(view.services["api"], approved=True)
    view = replace(view, services={"api": approved})
    _, end = run_to_completion(view)
    assert set(end.services["api"].online.values()) == {"2"}


# ----------------------------------------------------------------------------- plan

def timings(service, total, n=3):
    # stop 1 s, start 1 s, the rest to healthy; varying around the median
    return [p.SwitchTiming(service, f"h{i}", "1", 1.0, 1.0, total - 2.0 + d, at=float(i))
            for i, d in enumerate([-1.0, 0.0, 1.0][:n])]


def test_batch_seconds_from_history_and_fallback():
    assert p.batch_seconds("api", timings("api", 20.0)) == (20.0,
                                                             "history: median of 3 switches")
    secs, source = p.batch_seconds("api", timings("web", 20.0), healthy_secs=5)
    assert secs == 15.0
    assert source == "fallback: healthy_secs 5 + 10 s (no recorded switches)"
    many = [p.SwitchTiming("api", "h", "1", 0, 0, 100.0, at=float(i)) for i in range(30)] + \
        [p.SwitchTiming("api", "h", "1", 0, 0, 1.0, at=100.0 + i) for i in range(20)]
    assert p.batch_seconds("api", many)[0] == 1.0  # only the latest 20 count



def test_handoffs_are_the_idle_gaps_between_switches_of_one_item():
    def sw(host, version, start, total, service="api"):
        return p.SwitchTiming(service, host, version, 0.5, 0.5, total - 1.0, at=start + total)
    one_at_a_time = [sw("h0", "2", 100.0, 2.0), sw("h1", "2", 102.5, 2.0),
                     sw("h2", "2", 104.7, 2.0)]  # gaps 0.5 and 0.2
    two_at_a_time = [sw("h0", "3", 200.0, 2.0), sw("h1", "3", 200.1, 2.0),
                     sw("h2", "3", 203.0, 2.0)]  # overlap, then a gap of 0.9
    other = [sw("h0", "2", 103.0, 2.0, service="web")]  # never fills api's gap
    gaps = sorted(round(g, 6) for g in p.handoffs(one_at_a_time + two_at_a_time + other))
    assert gaps == [0.2, 0.5, 0.9]
    assert p.handoffs([p.SwitchTiming("api", "h0", "2", 1, 1, 1),  # no `at`: left out
                       p.SwitchTiming("api", "h1", "2", 1, 1, 1)]) == []
    secs, source = p.batch_seconds("api", one_at_a_time)
    assert secs == pytest.approx(2.0 + 0.35)  # median switch + median handoff
    assert source == "history: median of 3 switches, plus the median handoff 0.35 s of 2"


@pytest.mark.parametrize("kwargs,k,batches", [
    (dict(quorum=4, max_parallel=3), 2, 3),  # room above quorum: 6 - 4
    (dict(quorum=0, max_parallel=3), 3, 2),  # max_parallel
    (dict(quorum=0, max_parallel=6, max_down_per_rack=1), 2, 3),  # 1 per rack, 2 racks
    (dict(quorum=0, max_parallel=6, max_down_per_rack=1, rack_order=True), 1, 6),
    (dict(quorum=0, max_parallel=2, rack_order=True), 2, 4),  # ceil(3/2) per rack
    (dict(quorum=0, max_parallel=6, canary=1, soak_secs=30), 6, 2),  # canary batch + rest
])
def test_predict_item_batches(kwargs, k, batches):
    pred = p.predict_item(svc(racks=RACKS6, **kwargs), timings("api", 10.0))
    assert (pred["k"], pred["batches"]) == (k, batches)
    assert pred["predicted_s"] == batches * 10.0 + pred["soak_s"]
    assert pred["blocked"] is None


def test_predict_item_blocked_and_done_and_approve():
    blocked = p.predict_item(svc(racks=RACKS6, quorum=6), ())
    assert blocked["blocked"] == "quorum: 6 online, quorum 6: no host may switch"
    assert blocked["predicted_s"] is None
    done = p.predict_item(svc(racks=RACKS6, online=on_target(set(RACKS6))), ())
    assert (done["hosts"], done["batches"], done["predicted_s"]) == (0, 0, 0.0)
    canary = p.predict_item(svc(racks=RACKS6, canary=2), ())
    assert canary["waits_for_approve"] is True
    assert canary["host_order"][:2] == ["a1", "b1"]


def test_plan_total_is_the_longest_chain():
    """Two chains (a1->a2->a3, b1->b2) and three independent services, each on a host
    of its own, batch times from history: the total is the longest chain, not the sum.
    On one shared host (host_parallel 1) the host is the bound: the sum."""
    secs = {"a1": 10, "a2": 20, "a3": 30, "b1": 50, "b2": 25, "c1": 5, "c2": 70, "c3": 15}
    chain = {"a2": ("a1",), "a3": ("a2",), "b2": ("b1",)}
    hist = [t for n, s in secs.items() for t in timings(n, float(s))]
    shared = p.plan(gate_view(*[svc(n, racks={"h0": "r1"}, depends_on=chain.get(n, ()))
                                for n in secs]), hist)
    assert (shared["dag_bound_s"], shared["host_bound_s"], shared["total_s"]) == (75, 225, 225)
    services = [svc(n, racks={f"host-{n}": "r1"}, depends_on=chain.get(n, ())) for n in secs]
    out = p.plan(gate_view(*services), hist)
    json.dumps(out)  # JSON-able
    assert out["total_s"] == out["dag_bound_s"] == max(10 + 20 + 30, 50 + 25, 5, 70, 15) == 75
    assert out["series_s"] == sum(secs.values())
    assert [[n[-2:] for n in w] for w in out["waves"]] == [["01", "04", "06", "07", "08"],
                                                           ["02", "05"], ["03"]]
    by = {i["service"]: i for i in out["items"]}
    assert by["a3"]["start_s"] == 30 and by["a3"]["finish_s"] == 60
    assert by["b2"]["after"] == ["item-0000000004"]
    assert by["c2"]["start_s"] == 0
    assert out["blocked"] == []


def test_plan_reports_blocked_items_and_no_total():
    services = [svc("a", quorum=4), svc("b", depends_on=("a",)), svc("c")]
    queue = [item(1, "a"), item(2, "b"), item(3, "c", state="paused")]
    out = p.plan(gate_view(*services, queue=queue))
    json.dumps(out, allow_nan=False)  # no infinity leaks from the blocked chain
    assert out["total_s"] is None  # a cannot move: quorum 4 of 4
    assert out["items"][1]["start_s"] is None and out["items"][1]["finish_s"] is None
    assert out["items"][0]["blocked"].startswith("quorum")
    assert [b["reason"] for b in out["blocked"]] == ["paused"]
    assert all(i["finish_s"] is None or math.isfinite(i["finish_s"]) for i in out["items"])


@pytest.mark.parametrize("raw,field", [
    ({"service": "a", "host": "h", "version": "1", "stop_s": -1, "start_s": 0,
      "healthy_s": 0}, "stop_s"),
    ({"service": "a", "host": "h", "version": "1", "stop_s": 0, "start_s": float("nan"),
      "healthy_s": 0}, "start_s"),
    ({"service": "a", "host": "h", "version": "1", "stop_s": 0, "start_s": 0}, "healthy_s"),
    ({"service": "a b", "host": "h", "version": "1", "stop_s": 0, "start_s": 0,
      "healthy_s": 0}, "service"),
])
def test_switch_timing_refuses_bad_records(raw, field):
    with pytest.raises(InvalidData) as exc:
        p.SwitchTiming.parse("history/timings/a", raw)
    assert exc.value.field == field


def test_switch_timing_round_trips():
    t = p.SwitchTiming("a", "h1", "2", 1.5, 2.0, 3.0, at=7.0)
    assert p.SwitchTiming.parse("x", t.to_dict()) == t
    assert t.total_s == 6.5


BENCH_HOSTS = {f"h{i}": ("r1" if i < 5 else "r2") for i in range(10)}
BENCH_CHAINS = {"a2": ("a1",), "a3": ("a2",), "b2": ("b1",)}
BENCH_NAMES = ["a1", "a2", "a3", "b1", "b2", "c1", "c2", "c3"]


@pytest.mark.parametrize("host_parallel,max_parallel,quorum,per_rack,total", [
    (1, 2, 7, None, 15),  # k = 3 room > max_parallel 2: 5 batches, chain a1-a2-a3
    (1, 3, 6, 1, 15),  # k = min(3, 4, 1 per rack x 2 racks) = 2
    (1, 3, 5, None, 12),  # k = 3: 4 batches
    (1, 5, 0, None, 8),  # k = 5, DAG bound 6, but each host switches 8 services one by one
    (8, 5, 0, None, 6),  # the same with host_parallel 8: the DAG bound
])
def test_plan_total_matches_the_gate_simulated(host_parallel, max_parallel, quorum,
                                               per_rack, total):
    """The bench fleet of issue 10 (10 hosts, chains of 3 and 2, 3 independent services,
    every service on every host), every batch 1 s: the plan's total is the number of
    rounds the gate admits when every admissible host goes at once."""
    services = [svc(n, racks=BENCH_HOSTS, quorum=quorum, max_parallel=max_parallel,
                    depends_on=BENCH_CHAINS.get(n, ()), max_down_per_rack=per_rack)
                for n in BENCH_NAMES]
    view = gate_view(*services, host_parallel=host_parallel)
    out = p.plan(view, [t for n in BENCH_NAMES for t in timings(n, 1.0)])
    rounds, _ = run_to_completion(view)
    assert out["total_s"] == len(rounds) == total
    assert out["total_s"] == max(out["dag_bound_s"], out["host_bound_s"])


def bench_queue(host_parallel):
    """Issue 10's bench items, each carrying ``host_parallel(service)`` as ``deploy
    --host-parallel N`` records it (None: not set)."""
    return [replace(item(i + 1, n), host_parallel=host_parallel(n))
            for i, n in enumerate(BENCH_NAMES)]


@pytest.mark.parametrize("items_hp,view_hp,max_parallel,per_item,host_bound,total,rounds", [
    # Every item carries N (deploy --host-parallel N): 8 services on every host.
    (1, 1, 10, [1] * 8, 8.0, 8.0, 8),  # each host does its 8 switches one by one
    (2, 1, 10, [2] * 8, 4.0, 4.0, 4),  # two at a time: the host bound halves
    (3, 1, 10, [3] * 8, 8 / 3, 3.0, 3),  # the chain of 3 (DAG bound) is longer
    (8, 1, 5, [8] * 8, 1.0, 6.0, 6),  # k = 5: 2 batches per service, chain 6
    # Items without their own N take the view's: the same as carrying it.
    (None, 2, 10, [2] * 8, 4.0, 4.0, 4),
    # A queued item's N stays its own: here a1-a3 at 1, the rest at 2 (the host bound
    # 3 x 1 + 5 x 1/2); the gate needs more rounds, never fewer.
    ({"a1": 1, "a2": 1, "a3": 1}, 2, 10, [1, 1, 1, 2, 2, 2, 2, 2], 5.5, 5.5, 6),
    ({"c1": 1, "c2": 1, "c3": 1}, 4, 10, [4, 4, 4, 4, 4, 1, 1, 1], 4.25, 4.25, 6),
])
def test_plan_host_parallel_per_item(items_hp, view_hp, max_parallel, per_item, host_bound,
                                     total, rounds):
    """``plan --host-parallel N`` (issue 10 item 4): the bench fleet with quorum 0 and
    1 s batches. Each item's ``host_parallel`` (else the view's) bounds its host's
    switches at once, as at the gate; with one N for all, the plan's total is exactly
    the rounds the gate needs, and with mixed N a lower bound of them."""
    hp = (lambda n: items_hp) if not isinstance(items_hp, dict) else \
        (lambda n: items_hp.get(n))
    services = [svc(n, racks=BENCH_HOSTS, quorum=0, max_parallel=max_parallel,
                    depends_on=BENCH_CHAINS.get(n, ())) for n in BENCH_NAMES]
    view = gate_view(*services, queue=bench_queue(hp), host_parallel=view_hp)
    out = p.plan(view, [t for n in BENCH_NAMES for t in timings(n, 1.0)])
    json.dumps(out, allow_nan=False)
    assert {i["service"]: i["host_parallel"] for i in out["items"]} == \
        dict(zip(BENCH_NAMES, per_item))
    assert out["host_parallel"] == view_hp
    assert out["host_bound_s"] == pytest.approx(host_bound)
    assert out["total_s"] == pytest.approx(total)
    simulated, _ = run_to_completion(view)
    assert len(simulated) == rounds
    assert out["total_s"] <= len(simulated)


def test_gate_host_parallel_is_the_least_of_the_running_items():
    """As the agent's ``host_room``: a host switching a service whose item allows 1 takes
    no other down, even for an item allowing 2; with both at 2 it takes a second."""
    a, b = svc("a", switching={"h0"}), svc("b")
    one = [replace(item(1, "a"), host_parallel=1), replace(item(2, "b"), host_parallel=2)]
    refused = p.admit_take_down(gate_view(a, b, queue=one), "h0", "b")
    assert not refused and refused.reason == "host_parallel 1: h0 is switching a"
    two = [replace(i, host_parallel=2) for i in one]
    assert p.admit_take_down(gate_view(a, b, queue=two), "h0", "b")
    # Items without a value take the view's.
    assert p.admit_take_down(gate_view(a, b, host_parallel=2), "h0", "b")
    assert not p.admit_take_down(gate_view(a, b), "h0", "b")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_plan_total_is_a_lower_bound_of_the_simulated_rounds(data):
    """Any all-online fleet without canaries: the gate, admitting every host it can each
    round, never finishes in fewer rounds than the plan predicts with 1 s batches."""
    n_hosts = data.draw(st.integers(1, 6))
    racks = {f"h{i}": data.draw(st.sampled_from(["r1", "r2"])) for i in range(n_hosts)}
    n = data.draw(st.integers(1, 4))
    services = []
    for i in range(n):
        mine = data.draw(st.lists(st.sampled_from(sorted(racks)), min_size=1, unique=True))
        services.append(svc(
            f"s{i}", racks={h: racks[h] for h in mine},
            quorum=data.draw(st.integers(0, len(mine) - 1)),
            max_parallel=data.draw(st.integers(1, 3)),
            depends_on=data.draw(st.lists(st.sampled_from([f"s{j}" for j in range(i)]),
                                          unique=True)) if i else (),
            max_down_per_rack=data.draw(st.none() | st.integers(1, 2)),
            rack_order=data.draw(st.booleans())))
    # Each item its own host_parallel (deploy --host-parallel N), or none (the view's).
    queue = [replace(item(i + 1, s.name), host_parallel=data.draw(st.none() | st.integers(1, 3)))
             for i, s in enumerate(services)]
    view = gate_view(*services, queue=queue, host_parallel=data.draw(st.integers(1, 2)))
    out = p.plan(view, [t for s in services for t in timings(s.name, 1.0)])
    rounds, _ = run_to_completion(view)
    assert out["total_s"] <= len(rounds) + 1e-9


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_every_policy_lets_an_all_online_fleet_finish(view):
    """No combination of rules deadlocks: with every host online and room above quorum,
    the gate (time passing 1 s a round, canaries soaking or approved) finishes every
    item, and every host ends on the target."""
    services = {}
    for name, s in view.services.items():
        s = replace(s, online={h: "1" for h in s.racks},
                    quorum=min(s.quorum, len(s.racks) - 1))
        if s.policy.canary and not s.policy.soak_secs:
            s = replace(s, approved=True)
        services[name] = s
    _, end = run_to_completion(replace(view, services=services))
    for s in end.services.values():
        assert set(s.online) == set(s.racks) and set(s.online.values()) == {"2"}


def test_service_state_from_todays_view():
    from supervisor_dcdeploy.decisions import ServiceView
    from supervisor_dcdeploy.model import (
        CurrentEntry,
        HostInfo,
        ServiceSpec,
        StagedRelease,
        StagingEntry,
    )
    view = ServiceView(
        service="api", spec=ServiceSpec("api", "api", quorum=1, max_parallel=3,
                                        depends_on=("db",)),
        staged=StagedRelease("api", "2", "a" * 64, 1, urls=("file:///x",)),
        current={"h0": CurrentEntry("h0", "1", rack="r1"),
                 "h1": CurrentEntry("h1", "2", rack="r2")},
        staging=[StagingEntry("h2-0000000001", 1, "h2", "2"),
                 StagingEntry("h0-0000000002", 2, "h0", "2"),
                 StagingEntry("h3-0000000003", 3, "h3", "1")],
        queue=[item(1, "api")],
        hosts={"h2": HostInfo("h2", "r2", ("api",)), "h4": HostInfo("h4", "r1", ("api",)),
               "h5": HostInfo("h5", "r1", ("web",))})
    s = p.service_state(view, p.Policy(max_down_per_rack=1))
    assert s.racks == {"h0": "r1", "h1": "r2", "h2": "r2", "h4": "r1"}
    assert s.online == {"h0": "1", "h1": "2"}
    assert s.switching == {"h2"}  # queued for 2 and absent: mid-switch; h3 is for 1
    assert s.offline() == {"h4"}
    assert (s.quorum, s.max_parallel, s.depends_on, s.target) == (1, 3, ("db",), "2")
    # h0 is online in r1, where h4 is offline: the rack budget of 1 refuses it
    decision = p.admit_take_down(p.GateView({"api": s}, view.queue, 1), "h0", "api")
    assert not decision.ok
    assert decision.reason == "rack budget: rack r1 has 1 down (h4), max_down_per_rack 1"


def test_parse_timings_keeps_the_good_and_names_the_bad():
    good = p.SwitchTiming("a", "h1", "2", 1.0, 2.0, 3.0).to_dict()
    timings_, problems = p.parse_timings("history/timings/a",
                                         [good, "junk", {**good, "stop_s": -5}])
    assert timings_ == [p.SwitchTiming("a", "h1", "2", 1.0, 2.0, 3.0)]
    assert problems[0] == "history/timings/a[1]: expected an object, got 'junk'"
    assert problems[1].startswith("history/timings/a[2]: field 'stop_s': must be 0..86400")
    assert p.parse_timings("t", {"x": 1}) == (
        [], ["t: expected a list of switch records, got dict"])
