"""The gate as the agent runs it with the rollout policy wired in (issue 10 items 1, 2, 6):
parallel items per dependency edge, rack budgets, rack order, host_parallel; the signed
fields; and an interleaving property of concurrent hosts against the gate's CAS."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor_dcdeploy import decisions as d
from supervisor_dcdeploy import trust
from supervisor_dcdeploy.model import (CurrentEntry, DeployItem, InvalidData, ServiceSpec,
                                       StagedRelease, StagingEntry)
from supervisor_dcdeploy.policy import Policy

SHA = "a" * 64


def item(seq, svc, version="2", state="waiting", after=(), host_parallel=None):
    return DeployItem(f"item-{seq:010d}", seq, svc, version, state,
                      after=None if after is None else tuple(after),
                      host_parallel=host_parallel)


def view(svc="api", queue=(), current=None, staging=(), quorum=0, max_parallel=1,
         policy=Policy(), racks=None):
    """``current``: host -> version; ``staging``: hosts queued for "2", in order;
    ``racks``: host -> rack (in presences and entries)."""
    racks = racks or {}
    current = current if current is not None else {}
    return d.ServiceView(
        service=svc,
        spec=ServiceSpec(name=svc, program=svc, quorum=quorum, max_parallel=max_parallel,
                         policy=policy),
        staged=StagedRelease(svc, "2", SHA, 1, urls=("file:///x",)),
        current={h: CurrentEntry(h, v, rack=racks.get(h, "")) for h, v in current.items()},
        staging=[StagingEntry(f"{h}-{i:010d}", i, h, "2", racks.get(h, ""))
                 for i, h in enumerate(staging)],
        queue=list(queue))


# -- parallel waves -------------------------------------------------------------------

QUEUE = [item(1, "a"), item(2, "b", after=["a"]), item(3, "c"), item(4, "d")]


@pytest.mark.parametrize("svc,expected", [("a", "a"), ("b", "a"), ("c", "c"), ("d", "d")])
def test_item_for_independent_items_roll_at_once(svc, expected):
    assert d.item_for(QUEUE, svc).service == expected


def test_dependent_item_rolls_once_the_item_it_waits_for_is_gone():
    assert d.item_for(QUEUE[1:], "b").service == "b"
    assert d.item_for([replace(QUEUE[0], state="done"), *QUEUE[1:]], "b").service == "b"


def test_item_written_by_hand_waits_for_every_item_ahead():
    queue = [item(1, "a"), item(2, "c", after=None)]
    assert d.item_for(queue, "c").service == "a"
    target, why = d.rollout_target(view("c", queue))
    assert target is None and "waiting for a" in why


@pytest.mark.parametrize("state", ["paused", "failed"])
def test_a_stopped_independent_item_does_not_block(state):
    queue = [item(1, "a", state=state), item(2, "c")]
    assert d.rollout_target(view("c", queue))[0] == "2"
    assert d.rollout_target(view("b", [item(1, "a", state=state), item(2, "b", after=["a"])]))[0] \
        is None


def test_an_invalid_item_blocks_everything_behind_it():
    queue = [item(1, "a", state="invalid"), item(2, "c")]
    target, why = d.rollout_target(view("c", queue))
    assert target is None and "blocked" in why


def test_transitive_after_is_what_the_cli_records():
    specs = {"a": ServiceSpec("a", "a", 0), "b": ServiceSpec("b", "b", 0, depends_on=("a",)),
             "x": ServiceSpec("x", "x", 0, depends_on=("b",))}
    assert sorted(d.dependencies(specs, "x")) == ["a", "b"]
    queue = [item(1, "a"), item(2, "x", after=sorted(d.dependencies(specs, "x")))]
    assert d.item_for(queue, "x").service == "a"


def test_parallel_items_take_down_on_different_services_at_once():
    for svc in ("a", "c", "d"):
        v = view(svc, QUEUE, current={"h0": "1", "h1": "1"}, staging=["h0"], quorum=1)
        assert d.may_take_down(v, "h0", "1"), svc
    v = view("b", QUEUE, current={"h0": "1", "h1": "1"}, staging=["h0"], quorum=1)
    decision = d.may_take_down(v, "h0", "1")
    assert not decision and "waiting for a" in decision.reason


# -- host_parallel --------------------------------------------------------------------

def test_host_parallel_default_one():
    v = view("c", QUEUE, current={"h0": "1", "h1": "1"}, staging=["h0"])
    decision = d.may_take_down(v, "h0", "1", switching_here=["a"])
    assert not decision and "host_parallel 1" in decision.reason
    assert d.may_take_down(v, "h0", "1", switching_here=["c"])  # itself does not count


def test_host_parallel_from_the_item():
    queue = [item(1, "a", host_parallel=2), item(2, "c", host_parallel=2)]
    v = view("c", queue, current={"h0": "1", "h1": "1"}, staging=["h0"])
    assert d.may_take_down(v, "h0", "1", switching_here=["a"])
    assert not d.may_take_down(v, "h0", "1", switching_here=["a", "d"])


# -- rack budgets and rack order ------------------------------------------------------

RACKS = {"h0": "r0", "h1": "r1", "h2": "r0", "h3": "r1", "h4": "r0", "h5": "r1"}
ALL = sorted(RACKS)


def rack_view(staging, current=None, max_parallel=3, quorum=2, **policy):
    current = current if current is not None else {h: "1" for h in ALL}
    return view("api", [item(1, "api")], current=current, staging=staging, quorum=quorum,
                max_parallel=max_parallel, policy=Policy(**policy), racks=RACKS)


def test_rack_budget_skips_hosts_of_a_full_rack():
    # h0 and h2 (r0) first in line, K = 1: h2 waits, h1 (r1) behind it goes instead.
    v = rack_view(["h0", "h2", "h1"], max_down_per_rack=1)
    verdicts = d.admission(v, "2")
    assert verdicts["h0"] is None and verdicts["h1"] is None
    assert "rack budget: rack r0" in verdicts["h2"]


def test_rack_budget_counts_hosts_switching():
    current = {h: "1" for h in ALL if h != "h0"}  # h0 switching: queued, no presence
    v = rack_view(["h0", "h2", "h3"], current=current, max_down_per_rack=1)
    assert not d.may_take_down(v, "h2", "1")
    assert "rack budget" in d.may_take_down(v, "h2", "1").reason
    assert d.may_take_down(v, "h3", "1")


def test_rack_budget_k2():
    current = {h: "1" for h in ALL if h != "h0"}
    v = rack_view(["h0", "h2", "h4"], current=current, max_down_per_rack=2)
    assert d.may_take_down(v, "h2", "1")
    assert not d.may_take_down(v, "h4", "1")


def test_switching_hosts_hold_slots_before_hosts_ahead_of_them():
    # h2 was skipped (rack r0 full while h0 switched), h1 passed; now h0 is back: h2 fits
    # its rack again but h1's switch holds the only slot.
    current = {h: "1" for h in ALL if h != "h1"}
    v = rack_view(["h2", "h1"], current=current, max_parallel=1, max_down_per_rack=1)
    assert not d.may_take_down(v, "h2", "1")


def test_rack_order_given():
    v = rack_view(["h0", "h1", "h3"], rack_order=True, rack_names=("r1",))
    assert not d.may_take_down(v, "h0", "1")
    assert "rack r1's turn" in d.may_take_down(v, "h0", "1").reason
    assert d.may_take_down(v, "h1", "1")


def test_rack_order_moves_on_when_the_rack_is_done():
    current = {h: ("2" if RACKS[h] == "r1" else "1") for h in ALL}
    v = rack_view(["h0", "h2"], current=current, rack_order=True, rack_names=("r1",))
    assert d.may_take_down(v, "h0", "1")
    # One r1 host still on the old version and not even queued: r1 is not done.
    current["h5"] = "1"
    v = rack_view(["h0", "h2"], current=current, rack_order=True, rack_names=("r1",))
    assert not d.may_take_down(v, "h0", "1")


def test_rack_order_sorted_by_default():
    v = rack_view(["h1", "h0"], rack_order=True)
    assert d.may_take_down(v, "h0", "1") and not d.may_take_down(v, "h1", "1")


# -- the signed fields ----------------------------------------------------------------

def test_spec_policy_round_trip_and_signed():
    spec = ServiceSpec("api", "api", 2, policy=Policy(max_down_per_rack=1, rack_order=True,
                                                     rack_names=("r1", "r0")))
    back = ServiceSpec.parse("api", spec.to_json())
    assert back.policy == spec.policy
    payload = trust.spec_payload(spec)
    assert payload["max_down_per_rack"] == 1 and payload["rack_order"] == ["r1", "r0"]
    # A spec without a policy signs what it signed before the policy existed.
    assert "max_down_per_rack" not in trust.spec_payload(ServiceSpec("api", "api", 2))
    assert "policy" not in trust.spec_payload(spec)


def test_item_after_and_host_parallel_round_trip_and_signed():
    it = item(7, "b", after=["a"], host_parallel=2)
    back = DeployItem.parse(it.node, it.to_json())
    assert back.after == ("a",) and back.host_parallel == 2
    assert trust.item_payload(it)["after"] == ["a"]
    assert trust.item_payload(it)["host_parallel"] == 2
    assert "after" not in trust.item_payload(item(7, "b", after=None))


def test_tampered_after_is_refused(tmp_path):
    private, _, _ = trust.generate(tmp_path)
    signer = trust.load_signer(private)
    it = item(7, "b", after=["a"])
    signed = replace(it, signature=trust.sign(signer, trust.item_payload(it), 1, 1e10))
    keys = {signer.keyid: signer.public}
    assert trust.verify(trust.item_payload(signed), signed.signature, keys, 0.0, None)
    tampered = replace(signed, after=())  # "b waits for nothing": would break S2
    assert not trust.verify(trust.item_payload(tampered), tampered.signature, keys, 0.0, None)


@pytest.mark.parametrize("raw,field_name", [
    (b'{"service":"b","version":"2","after":"a"}', "after"),
    (b'{"service":"b","version":"2","after":["../x"]}', "after[0]"),
    (b'{"service":"b","version":"2","host_parallel":0}', "host_parallel"),
    (b'{"service":"b","version":"2","host_parallel":true}', "host_parallel"),
])
def test_bad_item_fields_name_the_field(raw, field_name):
    with pytest.raises(InvalidData) as exc:
        DeployItem.parse("item-0000000001", raw)
    assert exc.value.field == field_name


def test_bad_policy_in_a_spec_names_the_field():
    with pytest.raises(InvalidData) as exc:
        ServiceSpec.parse("api", b'{"program":"api","quorum":1,"max_down_per_rack":0}')
    assert exc.value.field == "max_down_per_rack"


# -- concurrent hosts against the gate's CAS ------------------------------------------

@dataclass
class World:
    """The shared state the gate protects, for two services a -> b on the same hosts:
    presences (host -> version), ready entries (hosts, in order), the gate's version per
    service, and whether a's item is done."""

    racks: dict[str, str]
    quorum: int
    max_parallel: int
    budget: int | None
    rack_order: bool
    current: dict[str, dict[str, str]] = field(default_factory=dict)
    queued: dict[str, list[str]] = field(default_factory=dict)
    gate: Counter = field(default_factory=Counter)
    a_done: bool = False

    def queue(self):
        return ([] if self.a_done else [item(1, "a")]) + [item(2, "b", after=["a"])]

    def view(self, svc):
        return view(svc, self.queue(), current=dict(self.current[svc]),
                    staging=list(self.queued[svc]), quorum=self.quorum,
                    max_parallel=self.max_parallel,
                    policy=Policy(max_down_per_rack=self.budget, rack_order=self.rack_order),
                    racks=self.racks)

    def check(self):
        for svc in ("a", "b"):
            online = self.current[svc]
            assert len(online) >= self.quorum, f"S1 {svc}: {len(online)} online"
            down = [h for h in self.racks if h not in online]
            assert len(down) <= self.max_parallel, f"max_parallel {svc}: {down}"
            if self.budget is not None:
                per_rack = Counter(self.racks[h] for h in down)
                assert max(per_rack.values(), default=0) <= self.budget, \
                    f"rack budget {svc}: {per_rack}"
        if not self.a_done:
            assert all(v == "1" for v in self.current["b"].values()), "S2: b before a done"


@settings(max_examples=400, deadline=None)
@given(n=st.integers(2, 7), racks=st.integers(1, 3), quorum=st.integers(0, 4),
       max_parallel=st.integers(1, 4), budget=st.one_of(st.none(), st.integers(1, 2)),
       rack_order=st.booleans(), data=st.data())
def test_no_interleaving_of_hosts_breaks_quorum_rack_budget_or_an_edge(
        n, racks, quorum, max_parallel, budget, rack_order, data):
    """Each host reads a snapshot (with the gate's version), later decides on it and
    commits: the commit passes only if the gate's version is still the one read (the
    agent's ``try_gate``). Steps interleave in any order; hosts finish switching in any
    order. Quorum, max_parallel, the rack budget and the edge a -> b hold after every step."""
    hosts = [f"h{i}" for i in range(n)]
    quorum = min(quorum, n - 1)
    w = World({h: f"r{i % racks}" for i, h in enumerate(hosts)}, quorum, max_parallel,
              budget, rack_order)
    for svc in ("a", "b"):
        w.current[svc] = {h: "1" for h in hosts}
        w.queued[svc] = list(data.draw(st.permutations(hosts)))
    reads: dict[tuple[str, str], tuple[d.ServiceView, int]] = {}
    for _ in range(data.draw(st.integers(10, 120))):
        host = data.draw(st.sampled_from(hosts))
        svc = data.draw(st.sampled_from(["a", "b"]))
        step = data.draw(st.sampled_from(["read", "commit", "finish"]))
        if step == "read":
            reads[(host, svc)] = (w.view(svc), w.gate[svc])
        elif step == "commit":
            # With no read of its own pending, the host reads and commits at once.
            snapshot, gate = reads.pop((host, svc), None) or (w.view(svc), w.gate[svc])
            local = w.current[svc].get(host, "1")
            if d.may_take_down(snapshot, host, local) and gate == w.gate[svc]:
                w.gate[svc] += 1
                w.current[svc].pop(host, None)
        elif step == "finish" and host not in w.current[svc] and host in w.queued[svc]:
            w.current[svc][host] = "2"
            w.queued[svc].remove(host)
        if all(v == "2" for v in w.current["a"].values()) and not w.queued["a"]:
            w.a_done = True
        w.check()


# -- completing an item when several hosts end their switches at once ------------------------

@pytest.mark.parametrize("current,staging,keeps", [
    # h1 and h2 switch beside h0 (entries, no presence): h0 may be the last to end
    ({"h0": "2", "h3": "2"}, ["h1", "h2"], True),
    # h1 still waits in the queue (its presence on 1): it switches after h0, and completes
    ({"h0": "2", "h1": "1"}, ["h1"], False),
    ({"h0": "2", "h1": "1", "h3": "2"}, ["h2", "h1"], False),
    # nobody else left: the queue is empty, the usual check completes the item
    ({"h0": "2"}, [], False),
    # h0's own entry, not yet gone from its view, does not count
    ({"h3": "2"}, ["h0"], False),
])
def test_only_switching_left(current, staging, keeps):
    """A host whose switch just ended keeps the duty to complete the item while only hosts
    mid-switch are left in the ready queue (bench/waves.py with max_parallel 5: the five
    hosts of the last batch each saw another still queued, and the item waited for the
    10 s fallback)."""
    v = view("api", [item(1, "api")], current=current, staging=staging)
    assert d.only_switching_left(v, "2", "h0") is keeps
