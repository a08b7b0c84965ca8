"""The store layout is a public interface: the documented JSON, written with ZooKeeper's
own zkCli.sh (no dcdeploy code on the writing side), stages and queues like the CLI."""

from __future__ import annotations

import json
import os
import subprocess

from cluster import Cluster, wait_for

ZKCLI = "/usr/share/zookeeper/bin/zkCli.sh"


def zkcli(server: str, *args: str) -> None:
    out = subprocess.run([ZKCLI, "-server", server, *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-500:]


def test_zkcli_stage_and_deploy(workdir, store, store_url, zk_server):
    # Hand-written values carry no signature: these hosts accept unsigned data
    # (docs/security.md); a signing data center refuses them (tests/test_signed_deploy.py).
    cluster = Cluster(workdir, store, store_url, 3, {"A": {"quorum": 1}},
                      insecure_unsigned=True)
    try:
        cluster.boot({"A": "1"})
        url, sha = cluster.release("A", "2")
        server = f"127.0.0.1:{zk_server.client_port}"
        root = store.root
        # Exactly the commands docs/store-layout.md shows.
        size = os.path.getsize(url.removeprefix("file://"))
        zkcli(server, "set", f"{root}/staging/A",
              json.dumps({"version": "2", "sha256": sha, "size": size, "urls": [url]}))
        wait_for(lambda: len(store.children("staging/A")) == 3, 60, "every host ready")
        zkcli(server, "create", "-s", f"{root}/deploy/item-",
              json.dumps({"service": "A", "version": "2", "state": "waiting"}))
        wait_for(cluster.queue_empty, 60, "the hand-queued deploy to finish")
        assert cluster.all_on("A", "2")
        (item,) = cluster.history()
        assert (item["service"], item["version"], item["state"]) == ("A", "2", "done")
    finally:
        cluster.stop_all()
