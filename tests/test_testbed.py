"""The namespace testbed itself: up/down through the CLI leaves nothing behind, also when
``up`` is killed half-way; the shared provisioning scripts write what the hosts run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from needs import netns_reason, require, zookeeper_reason

from supervisor_dcdeploy.lab import netns
from supervisor_dcdeploy.lab.testbed import bed as tb
from supervisor_dcdeploy.lab.testbed.cli import main as bed_cli
from supervisor_dcdeploy.lab.testbed.recorder import wait_for


def _require_root() -> None:
    require(netns_reason(), zookeeper_reason())


def _nothing_left(base: Path) -> dict[str, list[str]]:
    return {k: v for k, v in tb.leftovers(base).items() if v}


def test_cli_up_status_down_leaves_nothing(tmp_path, capsys):
    _require_root()
    base = tmp_path / "bed"
    try:
        assert bed_cli(["--base", str(base), "up", "--hosts", "2", "--racks", "2"]) == 0
        capsys.readouterr()
        assert bed_cli(["--base", str(base), "status", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["up"] is True
        assert sorted(m for m in (z["mode"] for z in info["zk"].values())) == \
            ["follower", "follower", "leader"]
        assert {h: s["services"] for h, s in info["hosts"].items()} == \
            {"h1": {"a": "1", "b": "1"}, "h2": {"a": "1", "b": "1"}}
        assert {h["rack"] for h in info["hosts"].values()} == {"r1", "r2"}
        # every host runs supervisord, the agent, its swarm engine (the libtorrent
        # daemon by default) and both services
        assert all(h["processes"] >= 5 for h in info["hosts"].values()), info["hosts"]
        assert _nothing_left(base) != {}
    finally:
        assert bed_cli(["--base", str(base), "down"]) == 0
    assert _nothing_left(base) == {}


def test_down_after_a_killed_up_leaves_nothing(tmp_path):
    _require_root()
    base = tmp_path / "bed"
    proc = subprocess.Popen([sys.executable, "-m", "supervisor_dcdeploy.lab.testbed.cli",
                             "--base", str(base), "up", "--hosts", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        # kill it once the ensemble runs and a host namespace exists: a half-built testbed
        wait_for(lambda: "dcdt-h1" in netns.namespaces() or proc.poll() is not None, 120,
                 "the testbed's first host namespace")
        assert proc.poll() is None, "up finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _nothing_left(base) != {}  # the crash did leave things behind
    finally:
        if proc.poll() is None:
            proc.kill()
        assert bed_cli(["--base", str(base), "down"]) == 0
    assert _nothing_left(base) == {}


@pytest.mark.parametrize("engine", ["", "libtorrent", "transmission"])
def test_provision_scripts_write_a_host_and_a_zookeeper(tmp_path, engine):
    """What a Vagrant VM runs (without installing), checked on its output files; with
    DCDT_ENGINE unset ("") a host gets the libtorrent daemon, with transmission
    transmission-daemon."""
    env = {**os.environ, "DCDT_PYTHON": sys.executable, "DCDT_INSTALL": "0",
           "DCDT_START": "0", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("DCDT_ENGINE", None)
    if engine:
        env["DCDT_ENGINE"] = engine
    root = tmp_path / "host"
    subprocess.run(["sh", str(tb.SCRIPTS / "host.sh"), "web-1", "r3", "10.9.0.5", str(root),
                    "zk://10.9.0.2:2181/dc", "api=8080", "db=8081"],
                   check=True, env=env, capture_output=True)
    agent = (root / "agent.conf").read_text()
    assert "host = web-1" in agent and "rack = r3" in agent
    assert "[service:api]" in agent and "[service:db]" in agent
    assert "store = zk://10.9.0.2:2181/dc" in agent
    dropin = (root / "conf.d" / "dcdeploy.conf").read_text()
    assert "[eventlistener:dcdeploy-agent]" in dropin and str(root / "agent.conf") in dropin
    programs = (root / "conf.d" / "services.conf").read_text()
    assert "address = 10.9.0.5" in agent
    if engine == "transmission":
        assert "[program:transmission]" in programs and "[program:ltdaemon]" not in programs
        settings = json.loads((root / "transmission" / "settings.json").read_text())
        assert settings["bind-address-ipv4"] == "10.9.0.5"
        # The RPC only on loopback, with the password the agent reads (issue 8).
        assert settings["rpc-bind-address"] == "127.0.0.1"
        assert settings["rpc-authentication-required"] is True
        assert settings["rpc-password"] == \
            (root / "transmission" / "rpc-secret").read_text().strip()
        assert "transmission_rpc = http://127.0.0.1:9091/transmission/rpc" in agent
        assert "swarm_engine" not in agent
    else:
        # the libtorrent daemon: peers on the host's address, releases only in the agent's
        # swarm_dir (root/downloads), its control socket where the agent looks for it
        assert "[program:ltdaemon]" in programs and "[program:transmission]" not in programs
        section = programs.split("[program:ltdaemon]", 1)[1]
        command = next(line for line in section.splitlines() if line.startswith("command"))
        assert "supervisor_dcdeploy.p2p.ltdaemon" in command
        assert "--address 10.9.0.5" in command
        assert f"--data-root {root / 'downloads'}" in command
        assert "swarm_engine = libtorrent" in agent
        assert f"ltdaemon_socket = {root / 'ltdaemon' / 'control.sock'}" in agent
        assert "transmission_rpc" not in agent
        assert not (root / "transmission").exists()
    out = subprocess.run(["sh", str(tb.SCRIPTS / "zk.sh"), "2", "10.9.0.3", str(tmp_path / "zk"),
                          "1=10.9.0.2", "2=10.9.0.3", "3=10.9.0.4"],
                         check=True, env=env, capture_output=True, text=True).stdout
    cfg = Path(out.strip().splitlines()[-1]).read_text()
    assert "server.3=10.9.0.4:2888:3888" in cfg and "clientPortAddress=10.9.0.3" in cfg
    assert (tmp_path / "zk" / "myid").read_text().strip() == "2"


def test_fault_plan_is_a_function_of_the_seed():
    from supervisor_dcdeploy.lab.testbed.faults import KINDS
    from supervisor_dcdeploy.lab.testbed.trial import plan
    hosts = ["h1", "h2", "h3", "h4"]
    first = plan(1234, hosts, list(KINDS), 5)
    assert first == plan(1234, hosts, list(KINDS), 5)
    assert first != plan(1235, hosts, list(KINDS), 5)
    assert [p.at for p in first] == sorted(p.at for p in first)
    assert all(p.kind in KINDS and (p.host in hosts) == KINDS[p.kind].needs_host
               for p in first)


def test_cover_draws_every_fault_kind():
    from supervisor_dcdeploy.lab.testbed.faults import KINDS
    from supervisor_dcdeploy.lab.testbed.trial import cover, plan
    orders = cover(13, list(KINDS), 6, 2)
    assert [len(o) for o in orders] == [2] * 6
    assert set(k for o in orders for k in o) == set(KINDS)
    assert orders == cover(13, list(KINDS), 6, 2)
    hosts = ["h1", "h2", "h3", "h4"]
    assert [p.kind for p in plan(5, hosts, list(KINDS), 2, order=orders[0])] == orders[0]


def test_a_second_testbed_waits_for_the_first(tmp_path):
    """Testbeds share a prefix and a subnet: a second one must wait for the machine's
    testbed lock (here: time out) rather than tear down a live one."""
    _require_root()
    first = tb.Testbed(tb.BedConfig(base=tmp_path / "one"))
    second = tb.Testbed(tb.BedConfig(base=tmp_path / "two", lock_timeout=1.0))
    first._lock()
    try:
        with pytest.raises(TimeoutError, match="another testbed"):
            second.up()
        assert not (tmp_path / "two").exists()
    finally:
        first._unlock()
    second._lock()  # free again
    second._unlock()
