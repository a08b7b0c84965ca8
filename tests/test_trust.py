"""trust.py: signatures over operator data, checked as a host checks them (pure, no store)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat

import pytest

from supervisor_dcdeploy import trust
from supervisor_dcdeploy.p2p import bencode
from supervisor_dcdeploy.model import DeployItem, HealthCheck, ServiceSpec, StagedRelease

NOW = 1_800_000_000.0
SHA = "ab" * 32


@pytest.fixture
def keys(tmp_path):
    private, _, keyid = trust.generate(tmp_path / "k")
    signer = trust.load_signer(private)
    assert signer.keyid == keyid
    return signer, trust.load_trusted(str(tmp_path / "k" / "*.pub"))


def signed(value, signer, counter=1000, expires=NOW + 3600):
    """``value`` as the store holds it after a signed write, parsed back as a host does."""
    sig = trust.sign(signer, trust.payload_of(value), counter, expires)
    return dataclasses.replace(value, signature=sig)


def reparse(value):
    raw = value.to_json()
    if isinstance(value, ServiceSpec):
        return ServiceSpec.parse(value.name, raw)
    if isinstance(value, StagedRelease):
        return StagedRelease.parse(value.service, raw)
    return DeployItem.parse(value.node, raw)


SPEC = ServiceSpec("api", "api", 3, ("db",), 2, HealthCheck(kind="http", path="/x", port="port", timeout=1.0), 1.5,
                   True)


def _torrent(name: bytes) -> str:
    """A minimal valid metainfo, base64 (staged torrents are checked when parsed)."""
    info = {b"length": 1234, b"name": name, b"piece length": 16384, b"pieces": b"\0" * 20}
    return base64.b64encode(bencode.encode({b"info": info})).decode()


RELEASE = StagedRelease("api", "2.1", SHA, 1234, ("https://b/api.tgz",), _torrent(b"api"), 5.0)
# Without a torrent, whose length must equal the size: a changed size still parses.
URL_RELEASE = dataclasses.replace(RELEASE, torrent=None)
ITEM = DeployItem("item-0000000007", 7, "api", "2.1")

TAMPER = [
    (SPEC, {"quorum": 0}), (SPEC, {"max_parallel": 5}), (SPEC, {"depends_on": ()}),
    (SPEC, {"health": HealthCheck(kind="cmd", check="wipe", timeout=1.0)}), (SPEC, {"healthy_secs": 0.0}),
    (SPEC, {"program": "sh"}), (SPEC, {"preload": False}),
    (RELEASE, {"version": "2.0"}), (RELEASE, {"sha256": "cd" * 32}), (URL_RELEASE, {"size": 1}),
    (URL_RELEASE, {"size": 1 << 40}),
    (RELEASE, {"urls": ("https://evil/api.tgz",)}), (RELEASE, {"torrent": _torrent(b"evil")}),
    (RELEASE, {"service": "db"}),
    (ITEM, {"version": "1.0"}), (ITEM, {"service": "db"}),
]


@pytest.mark.parametrize("value", [SPEC, RELEASE, ITEM], ids=["spec", "release", "item"])
def test_signed_value_round_trips_through_the_store_and_verifies(keys, value):
    signer, trusted = keys
    stored = reparse(signed(value, signer))
    verdict, record = trust.check(stored, trust.Policy(trusted), NOW, {})
    assert verdict.ok, verdict.reason
    assert next(iter(record.values())).counter == 1000


@pytest.mark.parametrize("value,change", TAMPER,
                         ids=[f"{type(v).__name__}-{next(iter(c))}" for v, c in TAMPER])
def test_a_changed_field_breaks_the_signature(keys, value, change):
    signer, trusted = keys
    tampered = dataclasses.replace(signed(value, signer), **change)
    verdict, record = trust.check(reparse(tampered), trust.Policy(trusted), NOW, {})
    assert not verdict.ok and "bad signature" in verdict.reason
    assert record == {}


def test_agent_fields_of_a_deploy_item_are_outside_the_signature(keys):
    signer, trusted = keys
    moved = dataclasses.replace(signed(ITEM, signer), state="failed", reason="r", host="h1",
                                updated=99.0)
    assert trust.check(reparse(moved), trust.Policy(trusted), NOW, {})[0].ok


def test_the_counter_and_expiry_are_signed(keys):
    signer, trusted = keys
    value = signed(RELEASE, signer, counter=1000)
    for change in ({"counter": 2000}, {"expires": trust.format_expires(NOW + 10 ** 7)}):
        forged = dataclasses.replace(value, signature={**value.signature, **change})
        verdict = trust.verify(trust.payload_of(forged), forged.signature, trusted, NOW, None)
        assert not verdict.ok and "bad signature" in verdict.reason


def test_wrong_key(keys, tmp_path):
    _, trusted = keys
    other, _, other_id = trust.generate(tmp_path / "other")
    value = signed(SPEC, trust.load_signer(other))
    verdict, _ = trust.check(reparse(value), trust.Policy(trusted), NOW, {})
    assert not verdict.ok and f"unknown key {other_id}" in verdict.reason


def test_a_key_id_of_a_trusted_key_with_another_keys_signature(keys, tmp_path):
    signer, trusted = keys
    other, _, _ = trust.generate(tmp_path / "other")
    value = signed(SPEC, trust.load_signer(other))
    value = dataclasses.replace(value, signature={**value.signature, "keyid": signer.keyid})
    verdict, _ = trust.check(value, trust.Policy(trusted), NOW, {})
    assert not verdict.ok and "bad signature" in verdict.reason


def test_a_remembered_signature_answers_only_for_the_same_key_and_bytes(keys, tmp_path):
    """The agent checks the same signed values every cycle, so a valid signature is
    remembered (trust.VERIFIED_MEMO); the memory must answer exactly as the check: a
    changed field, another key pinned under the same id, or the expiry passing since is
    still refused after the good value was accepted (and remembered)."""
    signer, trusted = keys
    trust._signature_valid.cache_clear()
    value = reparse(signed(SPEC, signer))
    for _ in range(2):  # the second answer comes from memory
        assert trust.check(value, trust.Policy(trusted), NOW, {})[0].ok
    changed = dataclasses.replace(value, quorum=value.quorum + 1)
    verdict, _ = trust.check(changed, trust.Policy(trusted), NOW, {})
    assert not verdict.ok and "bad signature" in verdict.reason
    other, _, _ = trust.generate(tmp_path / "other")
    swapped = {signer.keyid: trust.load_signer(other).public}  # same id, another key
    verdict, _ = trust.check(value, trust.Policy(swapped), NOW, {})
    assert not verdict.ok and "bad signature" in verdict.reason
    verdict, _ = trust.check(value, trust.Policy(trusted), NOW + 10 ** 6, {})
    assert not verdict.ok and "expired" in verdict.reason
    assert trust._signature_valid.cache_info().hits >= 2  # it was remembered


def test_expired(keys):
    signer, trusted = keys
    value = signed(RELEASE, signer, expires=NOW - 1)
    verdict, record = trust.check(value, trust.Policy(trusted), NOW, {})
    assert not verdict.ok and "expired" in verdict.reason and record == {}
    assert trust.check(value, trust.Policy(trusted), NOW - 2, {})[0].ok


def test_replayed_lower_counter(keys):
    signer, trusted = keys
    old, new = signed(RELEASE, signer, counter=1000), signed(
        dataclasses.replace(RELEASE, version="2.2"), signer, counter=2000)
    policy = trust.Policy(trusted)
    _, seen = trust.check(new, policy, NOW, {})
    assert seen == {"release/api": trust.Seen(2000)}
    verdict, _ = trust.check(old, policy, NOW, seen)
    assert not verdict.ok and "lower than 2000" in verdict.reason and "replay" in verdict.reason
    assert trust.check(new, policy, NOW, seen)[0].ok  # the same value again is fine


def test_a_copied_deploy_item_is_a_replay(keys):
    signer, trusted = keys
    item = signed(ITEM, signer, counter=5000)
    policy = trust.Policy(trusted)
    _, seen = trust.check(item, policy, NOW, {})
    copy = dataclasses.replace(item, node="item-0000000009", seq=9)
    verdict, _ = trust.check(copy, policy, NOW, seen)
    assert not verdict.ok and "copy of that item" in verdict.reason


def test_unsigned_is_refused_unless_insecure_unsigned(keys):
    _, trusted = keys
    verdict, _ = trust.check(RELEASE, trust.Policy(trusted), NOW, {})
    assert not verdict.ok and verdict.reason == "unsigned (no signature)"
    assert trust.check(RELEASE, trust.Policy(trusted, insecure_unsigned=True), NOW, {})[0].ok


def test_insecure_unsigned_still_checks_signed_data(keys, tmp_path):
    signer, trusted = keys
    bad = dataclasses.replace(signed(SPEC, signer), quorum=0)
    assert not trust.check(bad, trust.Policy(trusted, insecure_unsigned=True), NOW, {})[0].ok


@pytest.mark.parametrize("signature,fragment", [
    ("xyz", "expected an object"),
    ({"keyid": "zz", "sig": "", "counter": 1, "expires": "2030-01-01T00:00:00Z"}, "keyid"),
    ({"keyid": "0" * 16, "sig": "", "counter": -1, "expires": "2030-01-01T00:00:00Z"},
     "counter"),
    ({"keyid": "0" * 16, "sig": "", "counter": True, "expires": "2030-01-01T00:00:00Z"},
     "counter"),
    ({"keyid": "0" * 16, "sig": "", "counter": 2 ** 60, "expires": "2030-01-01T00:00:00Z"},
     "counter"),
    ({"keyid": "0" * 16, "sig": "", "counter": 1, "expires": "tomorrow"}, "expires"),
    ({"keyid": "0" * 16, "sig": "!!", "counter": 1, "expires": "2030-01-01T00:00:00Z"},
     "64 bytes"),
])
def test_malformed_signatures_are_refused_in_words(keys, signature, fragment):
    _, trusted = keys
    verdict = trust.verify(trust.payload_of(SPEC), signature, trusted, NOW, None)
    assert not verdict.ok and fragment in verdict.reason


def test_check_all_blocks_the_queue_at_a_refused_item(keys):
    signer, trusted = keys
    a = signed(ITEM, signer, counter=10)
    b = dataclasses.replace(ITEM, node="item-0000000008", seq=8, service="db")  # unsigned
    c = signed(dataclasses.replace(ITEM, node="item-0000000009", seq=9, service="web"),
               signer, counter=11)
    spec, staged, queue, refusals, updates = trust.check_all(
        signed(SPEC, signer), dataclasses.replace(signed(RELEASE, signer), size=5), [a, b, c],
        trust.Policy(trusted), NOW, {})
    assert spec is not None and staged is None
    assert [i.state for i in queue] == ["waiting", "invalid"]
    assert "unsigned" in queue[1].reason
    assert refusals == [(f"staging/api: bad signature by key {signer.keyid}: the signed "
                         "fields were changed after signing"),
                        "deploy/item-0000000008: unsigned (no signature)"]
    assert set(updates) == {"service/api", "deploy/api"}


def test_a_later_item_of_the_same_service_does_not_make_the_first_a_replay(keys):
    signer, trusted = keys
    first = signed(ITEM, signer, counter=10)
    second = signed(dataclasses.replace(ITEM, node="item-0000000008", seq=8, version="2.2"),
                    signer, counter=20)
    policy = trust.Policy(trusted)
    seen: dict = {}
    for _ in range(2):  # two cycles
        *_, queue, refusals, updates = trust.check_all(None, None, [first, second], policy,
                                                       NOW, seen)
        assert refusals == [] and [i.state for i in queue] == ["waiting", "waiting"]
        seen.update(updates)
    assert seen["deploy/api"].counter == 10


def test_counter_log_survives_restart_and_corruption(tmp_path):
    log = trust.CounterLog(tmp_path)
    log.record({"release/api": trust.Seen(5), "deploy/api": trust.Seen(7, "item-1")})
    assert trust.CounterLog(tmp_path).seen == log.seen
    (tmp_path / trust.TRUST_FILE).write_text("{not json")
    fresh = trust.CounterLog(tmp_path)
    assert fresh.seen == {} and "unreadable" in fresh.problem
    assert (tmp_path / "trust.corrupt").exists()


def test_key_files(tmp_path):
    private, public, _ = trust.generate(tmp_path)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(trust.TrustError, match="exists already"):
        trust.generate(tmp_path)
    with pytest.raises(trust.TrustError, match="matches no file"):
        trust.load_trusted(str(tmp_path / "nothing" / "*.pub"))
    os.chmod(public, 0o666)
    with pytest.raises(trust.TrustError, match="writable by group or others"):
        trust.load_trusted(str(tmp_path / "*.pub"))
    os.chmod(public, 0o644)
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(trust.TrustError, match="junk.pub: not a PEM public key"):
        trust.load_trusted(str(tmp_path / "*.pub"))
    with pytest.raises(trust.TrustError, match="not an unencrypted PEM private key"):
        trust.load_signer(public)


@pytest.mark.parametrize("text,secs", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400),
                                       ("3600s", 3600), ("120", 120), ("1w", 604800)])
def test_durations(text, secs):
    assert trust.parse_duration(text) == secs


@pytest.mark.parametrize("text", ["", "0", "-1d", "1y", "400d", "1e9", "nan"])
def test_bad_durations(text):
    with pytest.raises(trust.TrustError):
        trust.parse_duration(text)


def test_next_counter_only_grows():
    assert trust.next_counter(NOW, None) == int(NOW * 1000)
    assert trust.next_counter(NOW, int(NOW * 1000)) == int(NOW * 1000) + 1
    assert trust.next_counter(NOW - 3600, int(NOW * 1000)) == int(NOW * 1000) + 1


def test_signed_store_value_is_readable_json(keys):
    signer, _ = keys
    data = json.loads(signed(RELEASE, signer).to_json())
    assert data["version"] == "2.1" and set(data["signature"]) == {"keyid", "sig", "counter",
                                                                   "expires"}


def test_agent_config_pins_keys_or_refuses_to_start(tmp_path):
    from supervisor_dcdeploy.agent.config import ConfigError, load
    base = "[agent]\nhost = web-1\nstore = zk://z:2181/dc\nroot = /x\n"
    cfg = tmp_path / "agent.conf"
    cfg.write_text(base + "[service:api]\n")
    with pytest.raises(ConfigError, match="no trusted_keys"):
        load(cfg)
    cfg.write_text(base + "insecure_unsigned = maybe\n[service:api]\n")
    with pytest.raises(ConfigError, match="'maybe' is not true or false"):
        load(cfg)
    cfg.write_text(base + f"trusted_keys = {tmp_path}/keys/*.pub\n[service:api]\n")
    with pytest.raises(ConfigError, match="matches no file"):
        load(cfg)
    _, _, keyid = trust.generate(tmp_path / "keys")
    loaded = load(cfg)
    assert set(loaded.trust_policy.keys) == {keyid} and not loaded.trust_policy.insecure_unsigned
    cfg.write_text(base + "insecure_unsigned = true\n[service:api]\n")
    assert load(cfg).trust_policy == trust.Policy({}, True)


def test_cli_keygen_and_signing_options(tmp_path, capsys):
    from supervisor_dcdeploy.cli import main as cli
    assert cli(["keygen", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    keyid = trust.load_signer(tmp_path / "k" / "operator.key").keyid
    assert f"key {keyid}" in out and "operator.pub" in out
    assert cli(["keygen", "--out", str(tmp_path / "k")]) == 2
    assert "exists already" in capsys.readouterr().err
    # Refused before the store is asked: a bad duration, an unreadable or wrong key file.
    stage = ["--store", "zk://127.0.0.1:1/dc", "stage", "A", "1", "--url", "file:///x",
             "--sha256", SHA]
    assert cli([*stage, "--expires", "0"]) == 2
    assert "--expires '0'" in capsys.readouterr().err
    assert cli([*stage, "--sign-key", str(tmp_path / "nope.key")]) == 2
    assert "nope.key: cannot read" in capsys.readouterr().err
    assert cli([*stage, "--sign-key", str(tmp_path / "k" / "operator.pub")]) == 2
    assert "not an unencrypted PEM private key" in capsys.readouterr().err


def test_insecure_unsigned_without_keys_checks_nothing(keys, tmp_path):
    signer, _ = keys
    other, _, _ = trust.generate(tmp_path / "other")
    for value in (SPEC, signed(SPEC, signer), signed(SPEC, trust.load_signer(other))):
        assert trust.check(value, trust.Policy({}, insecure_unsigned=True), NOW, {})[0].ok


def test_agent_without_trusted_keys_exits_with_the_reason(tmp_path):
    import subprocess
    import sys
    cfg = tmp_path / "agent.conf"
    cfg.write_text(f"[agent]\nhost = web-1\nstore = zk://127.0.0.1:1/dc\nroot = {tmp_path}\n"
                   "[service:api]\n")
    out = subprocess.run([sys.executable, "-m", "supervisor_dcdeploy.agent.main", "--config",
                          str(cfg), "--standalone"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "no trusted_keys" in out.stderr and "insecure_unsigned = true" in out.stderr
