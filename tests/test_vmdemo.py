"""vmdemo's check of how each VM fetched the swarm-staged release: every host's status.json,
printed by ``--status-cmd`` (vagrant ssh in run-demo.sh; ``cat`` of a file here)."""

from __future__ import annotations

import json

import pytest

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.lab.vmdemo import fetch_vias, read_statuses, swarm_engines, tidy


def _status(path, vias):
    path.write_text(json.dumps({"services": {
        svc: {"fetch": {"version": "3.0", "state": "installed", "via": via}}
        for svc, via in vias.items()}}))


def test_reads_each_hosts_fetch_via(tmp_path):
    _status(tmp_path / "h1.json", {"a": "swarm", "b": "swarm"})
    _status(tmp_path / "h2.json", {"a": "swarm", "b": "http"})
    (tmp_path / "h3.json").write_text(json.dumps({"services": {"a": {}}}))
    got = fetch_vias(read_statuses({"h1": "x", "h2": "y", "h3": "z"},
                                   f"cat {tmp_path}/{{host}}.json"))
    assert got == {"h1": {"a": "swarm", "b": "swarm"}, "h2": {"a": "swarm", "b": "http"},
                   "h3": {"a": "none", "b": "none"}}


def test_a_failing_command_or_bad_json_names_the_host(tmp_path):
    (tmp_path / "h1.json").write_text("not json")
    with pytest.raises(ops.OpError, match="h1: status.json is not JSON"):
        read_statuses({"h1": "x"}, f"cat {tmp_path}/{{host}}.json")
    with pytest.raises(ops.OpError, match="h2: .* exited 1"):
        read_statuses({"h2": "x"}, f"cat {tmp_path}/{{host}}.json")


def test_reads_each_hosts_swarm_engine():
    """run-demo.sh's VMs must run the engine the demo was told (its --engine): the agent's
    own report in status.json, "none" for a host without a swarm."""
    statuses = {"h1": {"swarm": {"engine": "libtorrent", "tracker_port": 6969}},
                "h2": {"swarm": {"engine": "transmission"}}, "h3": {"services": {}}}
    assert swarm_engines(statuses) == {"h1": "libtorrent", "h2": "transmission", "h3": "none"}
    assert fetch_vias(statuses)["h3"] == {"a": "none", "b": "none"}


def test_the_work_directory_goes_after_success_and_stays_after_a_failure(tmp_path):
    kept, gone = tmp_path / "failed", tmp_path / "converged"
    for d in (kept, gone):
        (d / "seed").mkdir(parents=True)
        (d / "a-3.0.tar.gz").write_bytes(b"x")
    assert str(kept) in tidy(kept, ok=False)
    assert (kept / "a-3.0.tar.gz").exists() and (kept / "seed").is_dir()
    tidy(gone, ok=True)
    assert not gone.exists()
