"""Unit tests: parsing store values, local state, the listener protocol, health checks,
the agent config, store URLs."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from supervisor_dcdeploy import health
from supervisor_dcdeploy.agent.config import ConfigError, load
from supervisor_dcdeploy.agent.listener import listen
from supervisor_dcdeploy.localstate import LocalState, ReleaseDir, atomic_write
from supervisor_dcdeploy.model import (DeployItem, HealthCheck, InvalidData, ServiceSpec,
                                       StagedRelease, StagingEntry, version_key)
from supervisor_dcdeploy.store import StoreURLError, parse_store_url

SHA = "ab" * 32


def _staged_raw(**fields) -> bytes:
    data = {"version": "1", "sha256": SHA, "size": 10, "urls": ["file:///x"], **fields}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


@pytest.mark.parametrize("raw,field", [
    (b"{not json", "(json)"),
    (b"[1,2]", "(json)"),
    (_staged_raw(version=...), "version"),
    (_staged_raw(sha256="zz"), "sha256"),
    (_staged_raw(urls=...), "urls"),
    (_staged_raw(urls=["ftp://x"]), "urls[0]"),
    (_staged_raw(version="../x"), "version"),
    # size is required and bounds every download (issue 8): missing, not a positive int,
    # or beyond MAX_SIZE_BYTES is invalid data.
    (_staged_raw(size=...), "size"),
    (_staged_raw(size=None), "size"),
    (_staged_raw(size=True), "size"),
    (_staged_raw(size=0), "size"),
    (_staged_raw(size=-1), "size"),
    (_staged_raw(size=10.0), "size"),
    (_staged_raw(size="10"), "size"),
    (_staged_raw(size=(1 << 50) + 1), "size"),
    (_staged_raw(size=10 ** 18), "size"),
    (_staged_raw(size=10 ** 30), "(json)"),  # refused by the bounded JSON reader already
    (b"\xff\xfe", "(json)"),
])
def test_staged_release_rejects_garbage_naming_the_field(raw, field):
    with pytest.raises(InvalidData) as exc:
        StagedRelease.parse("api", raw)
    assert exc.value.field == field
    assert "staging/api" in str(exc.value)


def test_staged_release_round_trip():
    rel = StagedRelease("api", "1.2", SHA, 10, ("http://o/x.tgz",), None, 5.0)
    assert StagedRelease.parse("api", rel.to_json()) == rel


@pytest.mark.parametrize("data,field", [
    ({"program": "api", "quorum": -1}, "quorum"),
    ({"program": "api", "quorum": "3"}, "quorum"),
    ({"program": "api", "quorum": 1, "max_parallel": 0}, "max_parallel"),
    ({"program": "api", "quorum": 1, "depends_on": ["api"]}, "depends_on"),
    ({"program": "api", "quorum": 1, "health": {"kind": "smtp", "target": "x"}}, "health.kind"),
    ({"program": "api", "quorum": 1, "health": {"kind": "cmd"}}, "health.check"),
    ({"program": "api", "quorum": 1, "health": {"kind": "cmd", "target": "true"}},
     "health.target"),
    ({"quorum": 1}, "program"),
])
def test_service_spec_rejects(data, field):
    with pytest.raises(InvalidData) as exc:
        ServiceSpec.parse("api", json.dumps(data).encode())
    assert exc.value.field == field


def test_deploy_item_and_staging_entry_parse():
    item = DeployItem.parse("item-0000000007", b'{"service": "a", "version": "2"}', 3)
    assert (item.seq, item.state, item.data_version) == (7, "waiting", 3)
    with pytest.raises(InvalidData):
        DeployItem.parse("item-0000000007", b'{"service": "a", "version": "2", "state": "x"}')
    entry = StagingEntry.parse("api", "web-01-0000000012", b'{"version": "2"}')
    assert (entry.host, entry.seq) == ("web-01", 12)
    with pytest.raises(InvalidData):
        StagingEntry.parse("api", "nonsense", b'{"version": "2"}')


def test_version_key_is_natural():
    assert sorted(["1.10", "1.9", "1.2"], key=version_key) == ["1.2", "1.9", "1.10"]


def test_atomic_write_and_local_state_survive_reload(tmp_path):
    state = LocalState(tmp_path)
    state.update("api", active="2", previous="1", installed={"2": SHA})
    again = LocalState(tmp_path)
    assert again.get("api").active == "2" and again.get("api").previous == "1"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".state")]
    # A host from before the slots: its unreadable state.json is kept aside, not fatal.
    legacy_host = tmp_path / "legacy"
    atomic_write(legacy_host / "state.json", b"{garbage")
    broken = LocalState(legacy_host)
    assert broken.problem and "unreadable" in broken.problem
    assert broken.get("api").active is None
    assert (legacy_host / "state.corrupt").exists()


def test_release_dir_symlink_switch(tmp_path):
    rd = ReleaseDir(tmp_path, "api")
    for v in ("1", "2", "3", "4"):
        (rd.path(v)).mkdir(parents=True)
        (rd.path(v) / ".dcdeploy-release.json").write_text("{}")
    rd.point_current("2")
    assert rd.active() == "2" and os.readlink(rd.current) == "releases/2"
    rd.point_current("3")
    assert rd.active() == "3"
    with pytest.raises(FileNotFoundError):
        rd.point_current("9")
    assert rd.prune(keep=2, protect={"3", "4"}) == ["1", "2"]
    assert rd.installed() == ["3", "4"]
    assert rd.prune(keep=1, protect={"3", "4"}) == []


def test_listener_protocol():
    events = "ver:3.0 server:s serial:1 pool:p poolserial:1 eventname:TICK_5 len:5\nabcde" \
             "ver:3.0 server:s serial:2 pool:p poolserial:2 eventname:PROCESS_STATE_EXITED " \
             "len:3\nxyz"
    seen = []
    out = io.StringIO()
    listen(io.StringIO(events), out, lambda name, payload: seen.append((name, payload)))
    assert seen == [("TICK_5", "abcde"), ("PROCESS_STATE_EXITED", "xyz")]
    assert out.getvalue() == "READY\nRESULT 2\nOKREADY\nRESULT 2\nOKREADY\n"


@pytest.mark.parametrize("event,wakes", [
    ("PROCESS_STATE_RUNNING", True), ("PROCESS_STATE_STOPPED", True),
    ("PROCESS_STATE_EXITED", True), ("PROCESS_STATE_FATAL", True),
    ("PROCESS_STATE_UNKNOWN", True),
    # passing states: another event follows, and a cycle now would leave the program be
    ("PROCESS_STATE_STARTING", False), ("PROCESS_STATE_STOPPING", False),
    ("PROCESS_STATE_BACKOFF", False),
    ("TICK_5", False), ("SUPERVISOR_STATE_CHANGE_RUNNING", False),
])
def test_which_events_wake_the_cycle(event, wakes):
    from supervisor_dcdeploy.agent.listener import PASSING_STATES, wakes_the_cycle
    from supervisor_dcdeploy.agent.reconciler import TRANSIENT_STATES
    assert wakes_the_cycle(event) is wakes
    # exactly the states the cycle leaves alone
    assert {e.removeprefix("PROCESS_STATE_") for e in PASSING_STATES} == set(TRANSIENT_STATES)


class _Handler(BaseHTTPRequestHandler):
    code = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.server.code)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    server.code = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_health_checks(http_server):
    port = str(http_server.server_address[1])
    local = health.Local("api", {"port": port})
    check = HealthCheck(kind="http", path="/health", port="port", timeout=1.0)
    assert health.probe(check, local) is None
    http_server.code = 503
    assert "HTTP 503" in health.probe(check, local)
    assert health.probe(HealthCheck(kind="tcp", port="port", timeout=1.0), local) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "connect" in health.probe(HealthCheck(kind="tcp", port=closed, timeout=1.0), local)
    assert "'port'" in health.probe(check, health.Local("api", {}))
    alive_calls = []
    result = health.wait_healthy(check, local, start_timeout=0.3, healthy_secs=0,
                                 alive=lambda: alive_calls.append(1) or None, interval=0.05)
    assert result and "not healthy after" in result and alive_calls


def test_agent_config(tmp_path):
    cfg = tmp_path / "agent.conf"
    cfg.write_text("[agent]\nhost = web-1\nrack = r1\nstore = zk://z:2181/dc\nroot = /x\n"
                   "session_timeout = 3\ninsecure_unsigned = true\n[service:api]\nport = 80\n")
    loaded = load(cfg)
    assert loaded.host == "web-1" and loaded.session_timeout == 3.0
    assert loaded.variables("api") == {"host": "web-1", "rack": "r1", "port": "80"}
    cfg.write_text("[agent]\nstore = zk://z/dc\nroot = /x\nsession_timeout = soon\n"
                   "[service:api]\n")
    with pytest.raises(ConfigError, match="session_timeout: 'soon' is not a number"):
        load(cfg)
    cfg.write_text("[agent]\nstore = zk://z/dc\nroot = /x\n"
                   "transmission_rpc = http://127.0.0.1:9091/x\n"
                   "link_mbit = fast\n[service:api]\n")
    with pytest.raises(ConfigError, match="link_mbit: 'fast' is not a number"):
        load(cfg)
    cfg.write_text("[agent]\nstore = zk://z/dc\nroot = /x\nkick_secs = -1\n[service:api]\n")
    with pytest.raises(ConfigError, match="kick_secs: must be >= 0"):
        load(cfg)
    cfg.write_text("[agent]\nstore = http://z/dc\nroot = /x\n[service:api]\n")
    with pytest.raises(ConfigError, match="scheme"):
        load(cfg)
    cfg.write_text("[agent]\nstore = zk://z/dc\nroot = /x\n")
    with pytest.raises(ConfigError, match="no \\[service:NAME\\]"):
        load(cfg)


def test_store_urls():
    assert parse_store_url("zk://a:1,b/dc2") == ("zk", [("a", 1), ("b", 2181)], "/dc2")
    assert parse_store_url("consul://c") == ("consul", [("c", 8500)], "/dc")
    for bad in ("", "etcd://x", "zk://:1/x", "zk://a:port/x"):
        with pytest.raises(StoreURLError):
            parse_store_url(bad)


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range(tmp_path):
    from supervisor_dcdeploy.lab.zkserver import ephemeral_range, free_port
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(30)]
    assert len(set(ports)) == 30
    assert all(p < low for p in ports), (low, ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # nothing took it
    rng = tmp_path / "range"
    rng.write_text("1024\t65000\n")
    assert ephemeral_range(str(rng)) == (1024, 65000)
    rng.write_text("garbage")
    assert ephemeral_range(str(rng)) == (32768, 60999)
