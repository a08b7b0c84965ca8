"""The CI set of chaos runs: bench/chaos.py with a fixed seed, two trials of two random faults
each during a deploy of the dependency chain; its JSON report must have the documented shape,
count every injected fault, and list no violation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from needs import netns_reason, require, zookeeper_reason

from supervisor_dcdeploy.testbed.bed import leftovers

REPO = Path(__file__).resolve().parent.parent


def test_chaos_short_set_reports_no_violation(tmp_path):
    require(netns_reason(), zookeeper_reason())
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--trials", "2",
                           "--seed", "7", "--faults-per-trial", "2", "--json",
                           "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    print(proc.stderr[-3000:])
    report = json.loads(proc.stdout)
    assert set(report) == {"trials", "seed", "faults", "violations"}
    assert report["trials"] == 2 and report["seed"] == 7
    assert sum(report["faults"].values()) == 4, report["faults"]
    assert report["violations"] == [], report["violations"]
    assert proc.returncode == 0
    assert sorted(p.name for p in tmp_path.glob("trial-7-*.jsonl")) == \
        ["trial-7-0.jsonl", "trial-7-1.jsonl"]
    assert not any(leftovers(Path("/tmp/nonexistent-base")).get(k) for k in
                   ("namespaces", "links", "netns_etc"))
