"""Bounded parsing of everything read from the store (issue 8, item 5): each bound, and the
property that nothing but InvalidData / BencodeError comes out of a parser, whatever the input.

Integration regressions (real agents, real ZooKeeper) are in test_bounded_store_input.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from hypothesis import HealthCheck as HC
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor_dcdeploy import model
from supervisor_dcdeploy.model import (MAX_DEPTH, MAX_VALUE_BYTES, CurrentEntry, DeployItem,
                                       HostInfo, InvalidData, ServiceSpec, StagedRelease,
                                       StagingEntry, check_name, check_version, json_depth,
                                       load_json)
from supervisor_dcdeploy.p2p import bencode
from supervisor_dcdeploy.p2p.torrent import check_metainfo, make_torrent
from supervisor_dcdeploy.p2p.tracker import PeerInfo

SHA = "a" * 64
SPEC = {"program": "A", "quorum": 1, "depends_on": [], "max_parallel": 1,
        "health": {"kind": "http", "target": "http://127.0.0.1:1/", "timeout": 2.0},
        "healthy_secs": 0.0, "preload": False}
STAGED = {"version": "2", "sha256": SHA, "size": 1000, "urls": ["file:///x"], "staged_at": 1.7e9}
ITEM = {"service": "A", "version": "2", "state": "waiting", "reason": None, "host": None,
        "updated": 1.7e9}
HOST = {"rack": "r0", "services": ["A"], "last_seen": 1.7e9,
        "fetch": {"A": {"version": "2", "state": "failed", "error": "disk full"}}}
CURRENT = {"version": "2", "state": "serving", "since": 1.7e9, "rack": "r0"}

# Every parser of a store value, as (name, function of raw bytes).
PARSERS = {
    "spec": lambda raw: ServiceSpec.parse("A", raw),
    "staged": lambda raw: StagedRelease.parse("A", raw),
    "item": lambda raw: DeployItem.parse("item-0000000001", raw),
    "host": lambda raw: HostInfo.parse("h0", raw),
    "current": lambda raw: CurrentEntry.parse("A", "h0", raw),
    "queue": lambda raw: StagingEntry.parse("A", "h0-0000000001", raw),
    "peer": lambda raw: PeerInfo.parse("ab" * 20, "h0", raw),
}
VALID = {"spec": SPEC, "staged": STAGED, "item": ITEM, "host": HOST, "current": CURRENT,
         "queue": {"version": "2"},
         "peer": {"address": "127.0.0.1", "port": 6881, "rack": "r0", "complete": False}}


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


def with_literal(obj: dict, key: str, literal: str) -> bytes:
    """``obj`` as JSON with ``key`` set to a raw literal json.dumps would not write."""
    body = json.dumps({k: v for k, v in obj.items() if k != key})
    return (body[:-1] + f', "{key}": {literal}' + "}").encode()


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_valid_values_parse(kind):
    PARSERS[kind](raw(VALID[kind]))


# -- depth ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_100000_brackets_are_invalid_data_not_recursion(kind):
    with pytest.raises(InvalidData, match="nested 100000 levels deep"):
        PARSERS[kind](b"[" * 100_000)


def test_depth_is_checked_before_json_and_names_the_limit():
    ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert load_json("x", ok) is not None
    with pytest.raises(InvalidData, match=f"at most {MAX_DEPTH}"):
        load_json("x", b"[" + ok + b"]")
    # Brackets inside strings (even escaped quotes) do not count.
    assert load_json("x", raw({"a": "[[[[[[[[[[[[[[[[[[\\\"[[[[[[[["})) == \
        {"a": "[[[[[[[[[[[[[[[[[[\\\"[[[[[[[["}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=30)


def true_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((true_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((true_depth(v) for v in value.values()), default=0)
    return 0


@given(json_values, st.booleans())
@settings(max_examples=300, deadline=None)
def test_json_depth_is_the_nesting_of_any_json(value, ascii_only):
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == true_depth(value)


def test_json_depth_is_linear_on_unterminated_escaped_strings():
    # A quadratic string skip would take minutes here.
    hostile = b'"' + b'\\"' * 400_000
    assert json_depth(hostile) == 0
    with pytest.raises(InvalidData, match="not valid JSON"):
        load_json("x", hostile)


# -- numbers --------------------------------------------------------------------------------

@pytest.mark.parametrize("literal", ["9" * 400, "9" * 5000, "-" + "9" * 20])
def test_huge_integers_are_refused(literal):
    with pytest.raises(InvalidData, match="digits"):
        StagedRelease.parse("A", with_literal(STAGED, "staged_at", literal))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999",
                                     "1" + "0" * 40 + ".5"])
@pytest.mark.parametrize("kind,key", [("spec", "healthy_secs"), ("staged", "staged_at"),
                                      ("item", "updated"), ("host", "last_seen"),
                                      ("current", "since")])
def test_non_finite_or_overlong_numbers_are_refused(kind, key, literal):
    with pytest.raises(InvalidData):
        PARSERS[kind](with_literal(VALID[kind], key, literal))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_non_finite_health_timeout_is_refused(literal):
    health = '{"kind": "http", "target": "http://127.0.0.1:1/", "timeout": %s}' % literal
    with pytest.raises(InvalidData):
        ServiceSpec.parse("A", with_literal(SPEC, "health", health))


@pytest.mark.parametrize("kind,key,value,field", [
    ("spec", "healthy_secs", -1, "healthy_secs"),
    ("spec", "healthy_secs", model.MAX_HEALTHY_SECS + 1, "healthy_secs"),
    ("spec", "quorum", -1, "quorum"),
    ("spec", "quorum", model.MAX_HOSTS + 1, "quorum"),
    ("spec", "max_parallel", 0, "max_parallel"),
    ("spec", "max_parallel", 10**18, "max_parallel"),
    ("spec", "health", {"kind": "tcp", "port": "port", "timeout": 0}, "health.timeout"),
    ("spec", "health", {"kind": "tcp", "port": "port", "timeout": 1e9}, "health.timeout"),
    ("staged", "staged_at", -1, "staged_at"),
    ("staged", "staged_at", 1e300, "staged_at"),
    ("staged", "size", -1, "size"),
    ("staged", "size", 10**18, "size"),
    ("item", "updated", 1e12, "updated"),
    ("host", "last_seen", -5, "last_seen"),
    ("current", "since", 1e200, "since"),
])
def test_numbers_outside_their_documented_range_name_the_field(kind, key, value, field):
    with pytest.raises(InvalidData) as info:
        PARSERS[kind](raw({**VALID[kind], key: value}))
    assert info.value.field == field


# -- size, names, text ----------------------------------------------------------------------

def test_a_value_over_the_size_cap_is_refused_before_parsing():
    big = raw({**STAGED, "pad": "x" * MAX_VALUE_BYTES})
    with pytest.raises(InvalidData, match="more than the"):
        StagedRelease.parse("A", big)


@pytest.mark.parametrize("check,value", [(check_name, "A\n"), (check_version, "1\n"),
                                         (check_name, "A\r"), (check_version, " 1")])
def test_names_and_versions_are_matched_whole(check, value):
    with pytest.raises(InvalidData):
        check("x", "f", value)


def test_sha256_with_a_trailing_newline_is_refused():
    with pytest.raises(InvalidData, match="64 hex"):
        StagedRelease.parse("A", raw({**STAGED, "sha256": SHA + "\n"}))


@pytest.mark.parametrize("node", ["item-\u00b2", "item-\u0663", "item-" + "9" * 400, "item-"])
def test_deploy_node_names_need_an_ascii_sequence(node):
    with pytest.raises(InvalidData, match="sequence"):
        DeployItem.parse(node, raw(ITEM))


@pytest.mark.parametrize("node", ["h0-\u00b2", "h0-" + "9" * 400, "h0\n-0000000001"])
def test_queue_entry_names_need_a_host_and_an_ascii_sequence(node):
    with pytest.raises(InvalidData):
        StagingEntry.parse("A", node, raw({"version": "2"}))


def test_lone_surrogates_are_refused():
    with pytest.raises(InvalidData, match="Unicode"):
        DeployItem.parse("item-0000000001", b'{"service": "A", "version": "2", '
                                            b'"reason": "\\ud800"}')


@pytest.mark.parametrize("fetch", [
    {"A": "installed"}, {"A": {"state": 1}}, {"A": {"bogus": "x"}}, {"A\n": {}},
    {f"s{i}": {} for i in range(model.MAX_LIST + 1)},
])
def test_host_fetch_states_are_bounded(fetch):
    with pytest.raises(InvalidData):
        HostInfo.parse("h0", raw({**HOST, "fetch": fetch}))


# -- the property: only InvalidData, whatever the input -------------------------------------

def mutated(kind: str):
    base = VALID[kind]
    return st.builds(lambda k, v: raw({**base, k: v}),
                     st.sampled_from(sorted(base) + ["x"]), json_values) | \
        st.builds(lambda k, lit: with_literal(base, k, lit), st.sampled_from(sorted(base)),
                  st.sampled_from(["NaN", "1e999", "9" * 400, "[" * 50, "\"\\ud800\"",
                                   "-0", "1e-400", "{}", "[]", "null"]))


@pytest.mark.parametrize("kind", sorted(PARSERS))
@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HC.too_slow])
def test_parsers_raise_only_invalid_data(kind, data):
    value = data.draw(st.binary(max_size=200) | json_values.map(raw) | mutated(kind))
    try:
        parsed = PARSERS[kind](value)
    except InvalidData:
        return
    # Whatever was accepted holds only finite numbers: it re-serializes as strict JSON.
    json.dumps(dataclasses.asdict(parsed) if hasattr(parsed, "__dataclass_fields__") else {},
               allow_nan=False)


@given(st.text(max_size=30), st.binary(max_size=60))
@settings(max_examples=200, deadline=None)
def test_node_names_never_raise_anything_but_invalid_data(node, value):
    for parse in (lambda: DeployItem.parse(node, value),
                  lambda: StagingEntry.parse("A", node, value),
                  lambda: CurrentEntry.parse("A", node, value),
                  lambda: HostInfo.parse(node, value)):
        try:
            parse()
        except InvalidData:
            pass


# -- bencode and torrents -------------------------------------------------------------------

def test_bencode_depth_limit_refuses_100000_nested_lists():
    with pytest.raises(bencode.BencodeError, match="nested deeper"):
        bencode.decode(b"l" * 100_000 + b"e" * 100_000)
    with pytest.raises(bencode.BencodeError, match="nested deeper"):
        bencode.info_span(b"d4:info" + b"l" * 100_000 + b"e" * 100_001)
    ok = b"l" * bencode.MAX_DEPTH + b"e" * bencode.MAX_DEPTH
    assert bencode.decode(ok) is not None


@pytest.mark.parametrize("data,needle", [
    (b"i" + b"9" * 30 + b"e", "digits"),
    (b"i--5e", "bad integer"),
    (b"9" * 5000 + b":x", "string length"),
    (b"0:" + b" " * bencode.MAX_INPUT, "allowed"),
])
def test_bencode_bounds(data, needle):
    with pytest.raises(bencode.BencodeError, match=needle):
        bencode.decode(data)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_bencode_decode_raises_only_bencode_error(data):
    try:
        bencode.decode(data)
    except bencode.BencodeError:
        pass


def nested_torrent() -> str:
    meta = b"d4:infod4:name1:a12:piece lengthi65536e6:pieces0:6:lengthi1e4:deep" + \
        b"l" * 100_000 + b"e" * 100_000 + b"ee"
    return base64.b64encode(meta).decode()


def test_a_torrent_nested_100000_deep_is_refused_in_the_staged_release():
    with pytest.raises(InvalidData, match="nested deeper") as info:
        StagedRelease.parse("A", raw({**STAGED, "torrent": nested_torrent()}))
    assert info.value.field == "torrent"


@pytest.mark.parametrize("meta,needle", [
    (b"d4:infod4:name1:a12:piece lengthi0e6:pieces0:6:lengthi1eee", "piece length"),
    (b"d4:infod4:name1:a12:piece lengthi1e6:pieces3:abc6:lengthi1eee", "20-byte"),
    (b"d4:infod4:name2:..12:piece lengthi1e6:pieces0:6:lengthi1eee", "bad name"),
    (b"d4:infod4:name1:a12:piece lengthi1e6:pieces0:5:filesle" + b"ee", "neither"),
    (b"d4:infod4:name1:a12:piece lengthi1e6:pieces0:5:filesld6:lengthi1e4:pathl2:..eeeee",
     "path"),
    (b"d3:fooi1ee", "info"),
])
def test_torrent_metainfo_shape_is_checked(meta, needle):
    with pytest.raises(bencode.BencodeError, match=needle):
        check_metainfo(meta)


def test_a_real_torrent_passes(tmp_path):
    art = tmp_path / "rel.tar.gz"
    art.write_bytes(b"x" * 200_000)
    meta, _ = make_torrent(art)
    check_metainfo(meta)
    parsed = StagedRelease.parse("A", raw({**STAGED, "urls": [], "size": 200_000,
                                           "torrent": base64.b64encode(meta).decode()}))
    assert parsed.torrent


def test_a_torrent_of_another_length_than_the_staged_size_is_refused(tmp_path):
    art = tmp_path / "rel.tar.gz"
    art.write_bytes(b"x" * 200_000)
    meta, _ = make_torrent(art)
    with pytest.raises(InvalidData) as exc:
        StagedRelease.parse("A", raw({**STAGED, "urls": [], "size": 199_999,
                                      "torrent": base64.b64encode(meta).decode()}))
    assert exc.value.field == "torrent"



def test_status_text_never_sends_control_characters_from_the_store():
    from supervisor_dcdeploy.cli import render_status
    data = {"services": {}, "hosts": {}, "problems": [],
            "deploy": [{"item": "item-0000000001", "service": "A", "version": "2",
                        "state": "failed", "reason": "boom\x1b]0;owned\x07\x1b[2J"}]}
    text = render_status(data)
    assert "\x1b" not in text and "\x07" not in text
    assert "boom\\x1b]0;owned\\x07" in text


def test_history_text_survives_a_lone_surrogate(capsys):
    from supervisor_dcdeploy.cli import printable
    text = printable("reason \ud800 here")
    print(text)  # would raise UnicodeEncodeError on a UTF-8 stdout
    assert "\\ud800" in capsys.readouterr().out
