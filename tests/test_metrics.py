"""Metric names and values (agent and fleet), and the page's pure model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor_dcdeploy.metrics import (
    AgentMetrics,
    Latest,
    ListenError,
    fleet_registry,
    parse_listen,
)
from supervisor_dcdeploy.store import SessionState
from supervisor_dcdeploy.store.base import OpCounter
from supervisor_dcdeploy.web import ListenRefused, check_listen
from supervisor_dcdeploy.web.model import Timeline, page


def scrape(registry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the text exposition."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def fake_agent(**status):
    counter = OpCounter()
    counter.read(7)
    counter.write(2)
    return SimpleNamespace(status=status, fetch_progress={}, session=SessionState.CONNECTED,
                           _started=True, _denied=False, store=SimpleNamespace(ops=counter))


def test_agent_metrics_names_and_values():
    agent = fake_agent(api={"version": "1.2", "phase": "switching",
                            "fetch": {"version": "1.3", "state": "downloading"}},
                       web={"version": None, "phase": "down"})
    agent.fetch_progress["api"] = {"via": "http", "done": 300, "total": 1000}
    metrics = AgentMetrics(agent)
    metrics.on_switch("api", 2.0, "ok")
    metrics.on_switch("api", 0.3, "rolled_back")
    metrics.on_health_failure("api")
    metrics.on_rollback("api")
    got = scrape(metrics.registry)
    assert got[("dcdeploy_service_version_info", (("service", "api"), ("version", "1.2")))] == 1
    assert not any(k[0] == "dcdeploy_service_version_info" and ("service", "web") in k[1]
                   for k in got)  # nothing runs: no version series
    phase = {dict(k[1])["state"]: v for k, v in got.items()
             if k[0] == "dcdeploy_service_phase" and dict(k[1])["service"] == "api"}
    assert phase["switching"] == 1 and phase["serving"] == 0 and sum(phase.values()) == 1
    assert got[("dcdeploy_download_completed_bytes", (("service", "api"),))] == 300
    assert got[("dcdeploy_download_size_bytes", (("service", "api"),))] == 1000
    assert got[("dcdeploy_switch_duration_seconds_count",
                (("outcome", "ok"), ("service", "api")))] == 1
    assert got[("dcdeploy_switch_duration_seconds_sum",
                (("outcome", "ok"), ("service", "api")))] == 2.0
    assert got[("dcdeploy_switch_duration_seconds_bucket",
                (("le", "0.5"), ("outcome", "rolled_back"), ("service", "api")))] == 1
    assert got[("dcdeploy_health_check_failures_total", (("service", "api"),))] == 1
    assert got[("dcdeploy_rollbacks_total", (("service", "api"),))] == 1
    assert got[("dcdeploy_store_requests_total", (("kind", "read"),))] == 7
    assert got[("dcdeploy_store_requests_total", (("kind", "write"),))] == 2
    assert got[("dcdeploy_store_session_state", (("state", "connected"),))] == 1
    assert got[("dcdeploy_store_session_state", (("state", "lost"),))] == 0
    # Conventions: one prefix; counters end in _total; units in the names.
    names = {k[0] for k in got}
    assert all(n.startswith("dcdeploy_") for n in names), names


def test_agent_session_state_follows_the_agent():
    agent = fake_agent(api={})
    metrics = AgentMetrics(agent)
    agent.session = SessionState.SUSPENDED
    assert scrape(metrics.registry)[("dcdeploy_store_session_state",
                                     (("state", "suspended"),))] == 1
    agent._started = False
    assert scrape(metrics.registry)[("dcdeploy_store_session_state",
                                     (("state", "unreachable"),))] == 1


STATUS = {
    "services": {"A": {"quorum": 2, "current": {"h0": {"version": "2", "state": "serving"},
                                                "h1": {"version": "1", "state": "serving"}}},
                 "B": {"quorum": 1, "current": {}}},
    "hosts": {"h0": {"online": True, "rack": "r0",
                     "services": {"A": {"version": "2", "state": "serving"},
                                  "B": {"version": None, "state": "offline"}}},
              "h1": {"online": True, "rack": "r1",
                     "services": {"A": {"version": "1", "state": "serving"}}},
              "h2": {"online": False, "rack": "r0",
                     "services": {"A": {"version": None, "state": "offline"}}}},
    "deploy": [{"item": "item-0000000001", "service": "A", "version": "2", "state": "failed",
                "reason": "host h2: 2 failed its health check: HTTP 500", "host": "h2"},
               {"item": "item-0000000002", "service": "B", "version": "5", "state": "waiting",
                "reason": None}],
    "problems": ["deploy/item-x: garbage"],
}


def test_fleet_metrics():
    latest = Latest()
    registry = fleet_registry(latest)
    assert not [k for k in scrape(registry) if k[0] == "dcdeploy_fleet_hosts_online"]
    latest.set(STATUS)
    got = scrape(registry)
    assert got[("dcdeploy_fleet_hosts_online", (("service", "A"),))] == 2
    assert got[("dcdeploy_fleet_hosts_online", (("service", "B"),))] == 0
    assert got[("dcdeploy_fleet_quorum_hosts", (("service", "A"),))] == 2
    assert got[("dcdeploy_fleet_hosts", (("service", "A"),))] == 3
    assert got[("dcdeploy_fleet_deploy_items", (("state", "failed"),))] == 1
    assert got[("dcdeploy_fleet_deploy_items", (("state", "waiting"),))] == 1
    assert got[("dcdeploy_fleet_deploy_items", (("state", "rolling"),))] == 0
    assert got[("dcdeploy_fleet_store_problems", ())] == 1


def test_page_model_grid_queue_and_history():
    timeline = Timeline()
    timeline.add(100.0, STATUS)
    timeline.add(101.0, STATUS)  # unchanged counts: no new sample
    data = page(STATUS, [{"item": "item-0000000001", "service": "A", "version": "2",
                          "state": "done", "updated": 130.0}], timeline, 131.0)
    assert [r["rack"] for r in data["racks"]] == ["r0", "r1"]
    r0 = {h["name"]: h for h in data["racks"][0]["hosts"]}
    assert r0["h0"]["cells"]["A"]["cls"] == "serving"
    assert r0["h0"]["cells"]["B"]["cls"] == "down"
    assert r0["h2"]["cells"]["A"]["cls"] == "failed"  # the failed item names h2
    assert data["racks"][1]["hosts"][0]["cells"]["B"] is None  # h1 does not run B
    first, second = data["queue"]
    assert (first["cls"], first["done"], first["total"]) == ("failed", 1, 3)
    assert first["reason"].endswith("HTTP 500")
    assert second["cls"] == "waiting"
    assert data["history"][0]["duration"] == 30.0
    assert data["chart"]["samples"] == [{"t": 100.0, "serving": {"A": 2, "B": 0}}]
    assert data["chart"]["quorum"] == {"A": 2, "B": 1}
    assert data["problems"] == STATUS["problems"]


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9700", ("127.0.0.1", 9700)), (":9100", ("0.0.0.0", 9100)),
    ("localhost", ("localhost", 9700)), ("[::1]:8000", ("::1", 8000))])
def test_parse_listen(text, expected):
    assert parse_listen("x", text, 9700) == expected


@pytest.mark.parametrize("text,words", [("host:port", "not a number"), ("1.2.3.4:0", "1..65535"),
                                        ("", "empty"), ("a:", "no port")])
def test_parse_listen_refuses(text, words):
    with pytest.raises(ListenError, match=words):
        parse_listen("metrics_listen", text, 9700)


def test_web_binds_loopback_unless_allowed():
    assert check_listen("127.0.0.1:8700", False) == ("127.0.0.1", 8700)
    assert check_listen("[::1]:8700", False) == ("::1", 8700)
    with pytest.raises(ListenRefused, match="--allow-remote"):
        check_listen("0.0.0.0:8700", False)
    assert check_listen("0.0.0.0:8700", True) == ("0.0.0.0", 8700)


def test_cli_web_refuses_a_remote_address_without_the_flag(capsys):
    from supervisor_dcdeploy.cli import main
    assert main(["--store", "zk://127.0.0.1:1/dc", "web", "--listen", "0.0.0.0:8700"]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err


def test_agent_conf_refuses_a_bad_metrics_listen(tmp_path):
    from supervisor_dcdeploy.agent.config import ConfigError, load
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nhost = h1\nstore = zk://127.0.0.1:2181/dc\nroot = /tmp/x\n"
                    "insecure_unsigned = true\n"
                    "metrics_listen = 127.0.0.1:99999\n[service:api]\nport = 1\n")
    with pytest.raises(ConfigError, match="metrics_listen.*1..65535"):
        load(conf)
    conf.write_text(conf.read_text().replace("99999", "9700"))
    assert load(conf).extra["metrics_listen"] == "127.0.0.1:9700"
