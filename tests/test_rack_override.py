"""Deploy-level rack overrides (issue 10 item 2): ``dcdeploy deploy SVC --max-down-per-rack
K --rack-order [R1,R2,...]`` set this item's rack policy over the service spec's. Parsing
and bounds, the signed payload, the gate's decision, and the CLI (deploy, plan, status).
End to end on real hosts: tests/test_host_parallel.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from supervisor_dcdeploy import decisions as d
from supervisor_dcdeploy import ops, trust
from supervisor_dcdeploy.model import DeployItem, InvalidData
from supervisor_dcdeploy.policy import Policy
from test_waves_gate import ALL, RACKS, item, view

SHA = "c" * 64


def rack_item(**fields) -> DeployItem:
    return replace(item(1, "api"), **fields)


def override_view(staging, it, current=None, max_parallel=3, quorum=2, policy=Policy()):
    current = current if current is not None else {h: "1" for h in ALL}
    return view("api", [it], current=current, staging=staging, quorum=quorum,
                max_parallel=max_parallel, policy=policy, racks=RACKS)


# -- parsing and the signed payload ------------------------------------------------------

def test_round_trip_and_signed_only_when_set():
    it = rack_item(max_down_per_rack=1, rack_order=True, rack_names=("r1", "r0"))
    data = json.loads(it.to_json())
    assert data["max_down_per_rack"] == 1 and data["rack_order"] == ["r1", "r0"]
    back = DeployItem.parse(it.node, it.to_json())
    assert (back.max_down_per_rack, back.rack_order, back.rack_names) == (1, True, ("r1", "r0"))
    payload = trust.item_payload(it)
    assert payload["max_down_per_rack"] == 1 and payload["rack_order"] == ["r1", "r0"]
    sorted_order = rack_item(rack_order=True)
    assert json.loads(sorted_order.to_json())["rack_order"] is True
    assert trust.item_payload(sorted_order)["rack_order"] is True
    plain = item(1, "api")  # no override: the bytes and the payload it always had
    assert "max_down_per_rack" not in json.loads(plain.to_json())
    assert "rack_order" not in json.loads(plain.to_json())
    assert {"max_down_per_rack", "rack_order"}.isdisjoint(trust.item_payload(plain))


@pytest.mark.parametrize("tamper", [
    {"max_down_per_rack": None},  # stripped: the spec's (laxer) policy would apply
    {"max_down_per_rack": 3},
    {"rack_order": False, "rack_names": ()},
    {"rack_names": ("r0", "r1")},  # the order swapped
])
def test_a_tampered_override_is_refused(tmp_path, tamper):
    private, _, _ = trust.generate(tmp_path)
    signer = trust.load_signer(private)
    it = rack_item(max_down_per_rack=1, rack_order=True, rack_names=("r1", "r0"))
    signed = replace(it, signature=trust.sign(signer, trust.item_payload(it), 1, 1e10))
    keys = {signer.keyid: signer.public}
    assert trust.verify(trust.item_payload(signed), signed.signature, keys, 0.0, None)
    tampered = replace(signed, **tamper)
    assert not trust.verify(trust.item_payload(tampered), tampered.signature, keys, 0.0, None)


@pytest.mark.parametrize("raw,field_name", [
    (b'{"service":"b","version":"2","max_down_per_rack":0}', "max_down_per_rack"),
    (b'{"service":"b","version":"2","max_down_per_rack":100001}', "max_down_per_rack"),
    (b'{"service":"b","version":"2","max_down_per_rack":true}', "max_down_per_rack"),
    (b'{"service":"b","version":"2","max_down_per_rack":"1"}', "max_down_per_rack"),
    (b'{"service":"b","version":"2","rack_order":"r1"}', "rack_order"),
    (b'{"service":"b","version":"2","rack_order":["r1","r1"]}', "rack_order"),
    (b'{"service":"b","version":"2","rack_order":["../x"]}', "rack_order[0]"),
    (b'{"service":"b","version":"2","rack_order":[1]}', "rack_order[0]"),
])
def test_bad_override_in_the_store_names_the_field(raw, field_name):
    with pytest.raises(InvalidData) as exc:
        DeployItem.parse("item-0000000001", raw)
    assert exc.value.field == field_name


@pytest.mark.parametrize("k,order,expected", [
    (None, None, {"max_down_per_rack": None, "rack_order": False, "rack_names": ()}),
    (2, None, {"max_down_per_rack": 2, "rack_order": False, "rack_names": ()}),
    (None, True, {"max_down_per_rack": None, "rack_order": True, "rack_names": ()}),
    (1, ["r1", "r0"], {"max_down_per_rack": 1, "rack_order": True,
                       "rack_names": ("r1", "r0")}),
])
def test_rack_override_parses(k, order, expected):
    assert ops.rack_override(k, order) == expected


@pytest.mark.parametrize("k,order,message", [
    (0, None, "--max-down-per-rack: 0 is outside [1, 100000]"),
    (100001, None, "--max-down-per-rack: 100001 is outside [1, 100000]"),
    (None, ["r1", "r1"], "--rack-order: names a rack twice"),
    (None, ["r 1"], "--rack-order: 'r 1' is not a valid name"),
    (None, ["x" * 300], "--rack-order: "),
])
def test_rack_override_refuses_naming_the_flag_and_value(k, order, message):
    with pytest.raises(ops.OpError) as exc:
        ops.rack_override(k, order)
    assert str(exc.value).startswith(message), str(exc.value)


# -- the gate's decision -------------------------------------------------------------------

def test_max_down_per_rack_override_applies_where_the_spec_has_none():
    staging = ["h0", "h2", "h1"]
    assert d.admission(override_view(staging, item(1, "api")), "2")["h2"] is None
    v = override_view(staging, rack_item(max_down_per_rack=1))
    assert d.needs_racks(v)
    verdicts = d.admission(v, "2")
    assert verdicts["h0"] is None and verdicts["h1"] is None
    assert "rack budget: rack r0" in verdicts["h2"]
    decision = d.may_take_down(v, "h0", "1")
    assert decision and "within max_down_per_rack 1" in decision.reason


def test_max_down_per_rack_override_replaces_the_specs():
    staging = ["h0", "h2", "h4"]
    current = {h: "1" for h in ALL if h != "h0"}  # h0 switching
    spec_k1 = Policy(max_down_per_rack=1)
    assert not d.may_take_down(override_view(staging, item(1, "api"), current,
                                             policy=spec_k1), "h2", "1")
    v = override_view(staging, rack_item(max_down_per_rack=2), current, policy=spec_k1)
    assert d.may_take_down(v, "h2", "1")
    assert "rack budget" in d.may_take_down(v, "h4", "1").reason


def test_rack_order_override():
    staging = ["h0", "h1", "h3"]
    assert d.may_take_down(override_view(staging, item(1, "api")), "h0", "1")
    v = override_view(staging, rack_item(rack_order=True, rack_names=("r1",)))
    refused = d.may_take_down(v, "h0", "1")
    assert not refused and "rack r1's turn" in refused.reason
    assert d.may_take_down(v, "h1", "1")
    # The spec says r1 first; the deploy says sorted (r0 first): the deploy's wins.
    spec = Policy(rack_order=True, rack_names=("r1",))
    v = override_view(staging, rack_item(rack_order=True), policy=spec)
    assert d.may_take_down(v, "h0", "1") and not d.may_take_down(v, "h1", "1")


def test_an_override_is_only_for_its_own_service():
    """An item of another service ahead of this one's does not lend it its override."""
    other = replace(item(1, "db"), max_down_per_rack=1, rack_order=True)
    v = override_view(["h0", "h2"], other)
    assert d.rack_policy(v) == Policy()
    assert not d.needs_racks(v)


# -- the CLI -----------------------------------------------------------------------------

def test_deploy_flags_are_stored_signed_and_shown_by_plan_and_status(run, store):
    assert run("service", "set", "a", "--quorum", "1", "--max-down-per-rack", "3")[0] == 0
    assert run("service", "set", "b", "--quorum", "1")[0] == 0
    for svc in ("a", "b"):
        assert run("stage", svc, "2", "--url", "file:///x", "--sha256", SHA,
                   "--size", "1")[0] == 0
    code, out, err = run("plan", "a", "--max-down-per-rack", "1", "--rack-order", "r1,r0",
                         "--json")
    assert code == 0, err
    (planned,) = json.loads(out)["items"]
    assert planned["rack_policy"] == {"max_down_per_rack": 1, "rack_order": ["r1", "r0"]}
    code, out, err = run("plan", "a")
    assert code == 0 and "max_down_per_rack 3" in out, out
    code, out, err = run("deploy", "a", "--max-down-per-rack", "1", "--rack-order", "r1,r0")
    assert code == 0, err
    assert "[max_down_per_rack 1, rack_order r1,r0]" in out
    code, out, err = run("deploy", "b", "--rack-order")
    assert code == 0, err
    items = {json.loads(store.get(f"deploy/{n}")[0])["service"]:
             (n, json.loads(store.get(f"deploy/{n}")[0])) for n in store.children("deploy")}
    assert items["a"][1]["max_down_per_rack"] == 1
    assert items["a"][1]["rack_order"] == ["r1", "r0"]
    assert items["b"][1]["rack_order"] is True and "max_down_per_rack" not in items["b"][1]
    # Signed with them: the item's payload as stored verifies only with the fields.
    parsed = DeployItem.parse(items["a"][0], store.get(f"deploy/{items['a'][0]}")[0])
    assert parsed.signature is not None
    assert trust.item_payload(parsed)["rack_order"] == ["r1", "r0"]
    status = ops.status(store)
    shown = {i["service"]: i.get("overrides") for i in status["deploy"]}
    assert shown == {"a": {"max_down_per_rack": 1, "rack_order": ["r1", "r0"]},
                     "b": {"rack_order": True}}
    code, out, err = run("status")
    assert code == 0 and "[max_down_per_rack 1, rack_order r1,r0]" in out
    assert "[rack_order sorted]" in out


@pytest.mark.parametrize("argv,fragment", [
    (("deploy", "x", "--max-down-per-rack", "0"), "--max-down-per-rack: 0 is outside"),
    (("deploy", "x", "--max-down-per-rack", "many"), "invalid int value: 'many'"),
    (("deploy", "x", "--rack-order", "r1,r1"), "--rack-order: names a rack twice"),
    (("deploy", "x", "--rack-order", "r 1"), "--rack-order: 'r 1' is not a valid name"),
    (("plan", "x", "--max-down-per-rack", "-2"), "--max-down-per-rack: -2 is outside"),
])
def test_cli_refuses_bad_overrides_naming_the_value(run, store, capsys, argv, fragment):
    try:
        code, _, err = run(*argv)
    except SystemExit as exc:  # argparse's own refusal (not a number)
        code, err = exc.code, capsys.readouterr().err
    assert code != 0 and fragment in err, err
    assert not store.children("deploy")  # nothing queued
