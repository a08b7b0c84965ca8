"""Health checks come only from host-local config: the store names a check, the host's
agent.conf says what runs (docs/protocol.md, "Health checks")."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from supervisor_dcdeploy import ctlplugin, health
from supervisor_dcdeploy.agent.config import ConfigError, load
from supervisor_dcdeploy.model import HealthCheck, InvalidData, ServiceSpec

WHERE = "services/api"


@pytest.mark.parametrize("data,expected", [
    (None, {"kind": "none"}),
    ({"kind": "none"}, {"kind": "none"}),
    ({"kind": "http", "path": "/health", "port": "port"},
     {"kind": "http", "path": "/health", "port": "port", "timeout": 2.0}),
    ({"kind": "http"}, {"kind": "http", "path": "/", "port": "port", "timeout": 2.0}),
    ({"kind": "http", "path": "/ready?full=1", "port": 8080, "timeout": 1},
     {"kind": "http", "path": "/ready?full=1", "port": 8080, "timeout": 1.0}),
    ({"kind": "tcp", "port": "admin_port"}, {"kind": "tcp", "port": "admin_port", "timeout": 2.0}),
    ({"kind": "cmd", "check": "api-ready", "timeout": 5},
     {"kind": "cmd", "check": "api-ready", "timeout": 5.0}),
    # Old style, still read where it cannot point anywhere but the host itself.
    ({"kind": "http", "target": "http://127.0.0.1:{port}/health"},
     {"kind": "http", "path": "/health", "port": "port", "timeout": 2.0}),
    ({"kind": "http", "target": "http://localhost:9000"},
     {"kind": "http", "path": "/", "port": 9000, "timeout": 2.0}),
    ({"kind": "http", "target": "http://{address}:{port}/health"},
     {"kind": "http", "path": "/health", "port": "port", "timeout": 2.0}),
    ({"kind": "tcp", "target": "[::1]:{admin}"}, {"kind": "tcp", "port": "admin", "timeout": 2.0}),
    ({"kind": "none", "target": ""}, {"kind": "none"}),
])
def test_health_spec_accepted(data, expected):
    check = HealthCheck.parse(WHERE, data)
    assert check.to_dict() == expected
    assert HealthCheck.parse(WHERE, check.to_dict()) == check  # stable store form


@pytest.mark.parametrize("data,field,fragment", [
    # A command from the store is never run, whatever it says.
    ({"kind": "cmd", "target": "true"}, "health.target", "never run"),
    ({"kind": "cmd", "target": "touch /tmp/pwned"}, "health.target", "[check:NAME]"),
    ({"kind": "cmd", "check": "x; touch /tmp/pwned"}, "health.check", "not a valid name"),
    ({"kind": "cmd", "check": "ready", "argv": ["/bin/sh", "-c", "id"]}, "health.argv",
     "not a field"),
    ({"kind": "cmd"}, "health.check", "[check:NAME]"),
    # The address is the host's own: the store cannot aim a check elsewhere.
    ({"kind": "http", "target": "http://10.0.0.9:{port}/"}, "health.target", "agent.conf"),
    ({"kind": "http", "target": "http://127.0.0.1.evil.example:80/"}, "health.target",
     "agent.conf"),
    ({"kind": "http", "target": "http://{host}:{port}/"}, "health.target", "agent.conf"),
    ({"kind": "http", "target": "https://127.0.0.1:{port}/"}, "health.target", "agent.conf"),
    ({"kind": "http", "target": "http://127.0.0.1:{port}/{secret}"}, "health.target",
     "path may not use host variables"),
    ({"kind": "tcp", "target": "db.example:5432"}, "health.target", "agent.conf"),
    ({"kind": "http", "host": "10.0.0.9", "path": "/"}, "health.host", "not a field"),
    ({"kind": "http", "path": "health"}, "health.path", "not a URL path"),
    ({"kind": "http", "path": "/a b"}, "health.path", "not a URL path"),
    ({"kind": "http", "path": "/" + "a" * 600}, "health.path", "not a URL path"),
    ({"kind": "tcp", "port": "{port}"}, "health.port", "host-local variable"),
    ({"kind": "tcp", "port": 70000}, "health.port", "host-local variable"),
    ({"kind": "tcp", "port": True}, "health.port", "host-local variable"),
    ({"kind": "tcp", "port": "port", "timeout": 0}, "health.timeout", "seconds"),
    ({"kind": "tcp", "port": "port", "timeout": float("nan")}, "health.timeout", "seconds"),
    ({"kind": "tcp", "port": "port", "timeout": float("inf")}, "health.timeout", "seconds"),
    ({"kind": "tcp", "port": "port", "timeout": 10 ** 400}, "health.timeout", "seconds"),
    ({"kind": "tcp", "port": "port", "timeout": True}, "health.timeout", "seconds"),
    ({"kind": "smtp"}, "health.kind", "not one of"),
    ("http://127.0.0.1/", "health", "expected an object"),
])
def test_health_spec_refused(data, field, fragment):
    with pytest.raises(InvalidData) as exc:
        HealthCheck.parse(WHERE, data)
    assert exc.value.field == field and fragment in exc.value.problem


def test_a_spec_with_a_store_command_is_invalid_as_a_whole():
    raw = json.dumps({"program": "api", "quorum": 1,
                      "health": {"kind": "cmd", "target": "touch /tmp/x"}})
    with pytest.raises(InvalidData) as exc:
        ServiceSpec.parse("api", raw)
    assert exc.value.where == WHERE and exc.value.field == "health.target"


def _conf(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "agent.conf"
    path.write_text("[agent]\nhost = h1\nstore = zk://z:2181/dc\nroot = /x\n"
                    "insecure_unsigned = true\n"
                    "[service:api]\nport = 8080\n" + extra)
    return path


def test_agent_conf_checks(tmp_path):
    cfg = load(_conf(tmp_path, "[check:api-ready]\nargv = /usr/bin/curl -sf "
                               "'http://127.0.0.1:{port}/health?a=1 b'\ntimeout = 3\n"))
    check = cfg.checks["api-ready"]
    assert check.argv == ("/usr/bin/curl", "-sf", "http://127.0.0.1:{port}/health?a=1 b")
    assert check.timeout == 3.0
    local = cfg.health("api")
    assert local.checks == cfg.checks and local.variables["port"] == "8080"


@pytest.mark.parametrize("section,fragment", [
    ("[check:a]\n", "'argv' is required"),
    ("[check:a]\nargv = curl -sf http://x/\n", "not an absolute path"),
    ("[check:a]\nargv = /bin/true 'unclosed\n", "argv"),
    ("[check:a]\nargv = /bin/true\ncommand = /bin/sh -c id\n", "unknown key 'command'"),
    ("[check:a]\nargv = /bin/true\ntimeout = nan\n", "finite"),
    ("[check:a]\nargv = /bin/true\ntimeout = 0\n", "must be >="),
    ("[check:a b]\nargv = /bin/true\n", "not a valid name"),
])
def test_agent_conf_check_errors(tmp_path, section, fragment):
    with pytest.raises(ConfigError) as exc:
        load(_conf(tmp_path, section))
    assert fragment in str(exc.value)


def _recorder(tmp_path: Path) -> tuple[health.LocalCheck, Path]:
    """A local check that records the argv and environment it was given."""
    out = tmp_path / "seen.json"
    script = ("import json, os, sys; "
              f"open({str(out)!r}, 'w').write(json.dumps([sys.argv[1:], dict(os.environ)])); "
              "sys.exit(int(sys.argv[1]))")
    return health.LocalCheck("rec", (sys.executable, "-c", script, "{code}", "{port}")), out


def test_local_command_runs_as_argv_without_a_shell(tmp_path, monkeypatch):
    check, out = _recorder(tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    # A variable value full of shell syntax stays one argument and runs nothing.
    variables = {"code": "0", "port": f"8080; touch {marker} $(touch {marker})"}
    monkeypatch.setenv("DCDEPLOY_STORE", "zk://secret-store/dc")
    local = health.Local("api", variables, {"rec": check})
    spec = HealthCheck(kind="cmd", check="rec", timeout=10.0)
    assert health.probe(spec, local) is None
    argv, env = json.loads(out.read_text())
    assert argv == ["0", variables["port"]]
    assert not marker.exists()
    assert "DCDEPLOY_STORE" not in env  # the agent's environment is not passed on
    failing = health.Local("api", {**variables, "code": "3"}, {"rec": check})
    assert "exited 3" in health.probe(spec, failing)


def test_local_command_timeout_and_missing_program(tmp_path):
    slow = health.LocalCheck("slow", (sys.executable, "-c", "import time; time.sleep(30)"),
                             timeout=0.2)
    gone = health.LocalCheck("gone", (str(tmp_path / "no-such-program"),))
    local = health.Local("api", {}, {"slow": slow, "gone": gone})
    assert "timed out after 0.2s" in health.probe(HealthCheck(kind="cmd", check="slow"), local)
    assert "could not run" in health.probe(HealthCheck(kind="cmd", check="gone"), local)


def test_unknown_local_check_is_a_reason_not_a_crash():
    local = health.Local("api", {"port": "1"}, {"other": health.LocalCheck("other", ("/x",))})
    check = HealthCheck(kind="cmd", check="ready")
    with pytest.raises(health.HealthError, match=r"\[check:ready\]"):
        health.resolve(check, local)
    problem = health.problem(check, local)
    assert problem and "'ready'" in problem and "other" in problem
    assert health.probe(check, local) == problem
    calls = []
    assert health.wait_healthy(check, local, start_timeout=30, healthy_secs=30,
                               alive=lambda: calls.append(1)) == problem
    assert calls == []  # returned before waiting for anything
    assert health.problem(HealthCheck(kind="tcp", port="admin"), local) and \
        "'admin'" in health.problem(HealthCheck(kind="tcp", port="admin"), local)
    bad_port = health.Local("api", {"port": "http"}, {})
    assert "not a port" in health.problem(HealthCheck(kind="http", path="/"), bad_port)
    unset = health.LocalCheck("needs", ("/bin/true", "{missing}"))
    assert "{missing}" in health.problem(HealthCheck(kind="cmd", check="needs"),
                                         health.Local("api", {}, {"needs": unset}))


def test_address_comes_from_local_config():
    check = HealthCheck(kind="http", path="/health", port="port")
    assert health.resolve(check, health.Local("api", {"port": "81"})).url == \
        "http://127.0.0.1:81/health"
    local = health.Local("api", {"port": "81", "address": "10.1.2.3"})
    assert health.resolve(check, local).url == "http://10.1.2.3:81/health"
    six = health.Local("api", {"port": "81", "address": "::1"})
    assert health.resolve(check, six).url == "http://[::1]:81/health"
    assert health.resolve(HealthCheck(kind="tcp", port=82), six).address == ("::1", 82)


def test_supervisorctl_status_shows_an_unusable_check():
    problem = "the health check of api is the local check 'ready', which ..."
    state = {"status": {"host": "h1", "services": {"api": {"version": "1", "process": "RUNNING",
                                                           "health_problem": problem}}}}
    assert problem in ctlplugin.render(state)
    del state["status"]["services"]["api"]["health_problem"]
    assert "health check" not in ctlplugin.render(state)
