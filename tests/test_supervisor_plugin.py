"""The [rpcinterface:dcdeploy] extension and `supervisorctl dcdeploy status` on a live host."""

from __future__ import annotations

import json
import subprocess
import sys

from cluster import Cluster, wait_for

from supervisor_dcdeploy.lab.hostenv import host_rpc


def test_supervisorctl_dcdeploy_status(workdir, store, store_url):
    cluster = Cluster(workdir, store, store_url, 1, {"A": {"quorum": 0}})
    try:
        cluster.boot({"A": "1"})
        layout = cluster.hosts["h0"]
        wait_for(lambda: cluster.host_status("h0").get("services", {}).get("A", {})
                 .get("phase") == "serving", 30, "the agent to report A serving")
        state = host_rpc(layout).dcdeploy.getState()
        assert state["status"]["services"]["A"]["version"] == "1"
        assert state["local"]["services"]["A"]["active"] == "1"
        assert host_rpc(layout).dcdeploy.getAPIVersion() == "1.0"
        ctl = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(layout.conf)]
        out = subprocess.run(ctl + ["dcdeploy", "status", "--json"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"]["services"]["A"]["process"] == "RUNNING"
        table = subprocess.run(ctl + ["dcdeploy", "status"], capture_output=True, text=True,
                               timeout=30)
        assert table.stdout.splitlines()[0].startswith("host h0 rack r0 store connected")
        assert table.stdout.splitlines()[1].split()[:3] == ["A", "1", "RUNNING"]
        bad = subprocess.run(ctl + ["dcdeploy", "frobnicate"], capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode != 0 and "usage: dcdeploy status" in bad.stdout
    finally:
        cluster.stop_all()
