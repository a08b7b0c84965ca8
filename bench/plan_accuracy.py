#!/usr/bin/env python3
"""Predicted vs actual (issue 10 item 4): a local fleet (4 hosts, real ZooKeeper and
supervisord; service A, quorum 2, max_parallel 1, healthy_secs 1) deployed three times
with ``dcdeploy deploy``; the first prediction has no history (the fallback), the next
ones use the switch timings the agents recorded. Prints ``dcdeploy history`` at the end
(``predicted X s, actual Y s`` per item).

    python bench/plan_accuracy.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor_dcdeploy.cli import main as cli  # noqa: E402
from supervisor_dcdeploy.lab.localdc import Cluster, wait_for  # noqa: E402
from supervisor_dcdeploy.store import open_store  # noqa: E402
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port  # noqa: E402


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dcdeploy-plan-"))
    zk = ZooKeeperServer(work / "zk", free_port())
    zk.start()
    zk.wait_serving()
    url = f"zk://127.0.0.1:{zk.client_port}/dc"
    store = open_store(url)
    store.start()
    dc = Cluster(work, store, url, 4,
                 {"A": {"quorum": 2, "max_parallel": 1, "healthy_secs": 1.0}})
    try:
        if dc.signer is not None and not os.environ.get("DCDEPLOY_SIGN_KEY"):
            os.environ["DCDEPLOY_SIGN_KEY"] = str(next((work / "keys").glob("*.key")))
        dc.boot({"A": "1"})
        for version in ("2", "3", "4"):
            dc.stage("A", version)
            wait_for(lambda: len(store.children("staging/A")) == 4, 60, "every host ready")
            cli(["--store", url, "deploy", "A"])
            wait_for(dc.queue_empty, 120, f"the deploy to {version}")
        return cli(["--store", url, "history"])
    finally:
        dc.stop_all()
        store.stop()
        zk.stop()


if __name__ == "__main__":
    sys.exit(main())
