"""The CI set of chaos runs: bench/chaos.py with a fixed seed and ``--cover``, so that every
fault kind is drawn at least once (6 trials of 2 faults for the 11 kinds; seed 13 also
draws one 32 s link cut, which L2 judges, and six faults timed into a switch). Each trial
deploys the dependency chain with ``healthy_secs`` 3, long enough for both faults to land
while the deploy is under way (with 3 faults a trial, the third sometimes came after it). The JSON report must have the documented shape, count every
kind, show every fault landed during the deploy, and list no violation (S1-S5, L1-L3, F:
every fault took effect, P: the prober covered every endpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from needs import netns_reason, require, zookeeper_reason

from supervisor_dcdeploy.lab.testbed.bed import leftovers
from supervisor_dcdeploy.lab.testbed.faults import KINDS

REPO = Path(__file__).resolve().parent.parent
SEED, TRIALS, PER_TRIAL = 13, 6, 2


def test_chaos_ci_set_draws_every_fault_kind_during_the_deploy(tmp_path):
    require(netns_reason(), zookeeper_reason())
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"),
                           "--trials", str(TRIALS), "--seed", str(SEED),
                           "--faults-per-trial", str(PER_TRIAL), "--cover", "--window", "6",
                           "--healthy-secs", "3", "--json", "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    print(proc.stderr[-6000:])
    report = json.loads(proc.stdout)
    assert set(report) == {"trials", "seed", "faults", "during_deploy", "mid_switch",
                           "violations", "interrupted"}
    assert report["trials"] == TRIALS and report["seed"] == SEED
    assert set(report["faults"]) == set(KINDS), report["faults"]
    assert sum(report["faults"].values()) == TRIALS * PER_TRIAL
    assert report["during_deploy"] == report["faults"], report["during_deploy"]
    assert report["violations"] == [], report["violations"]
    assert proc.returncode == 0
    assert sorted(p.name for p in tmp_path.glob(f"trial-{SEED}-*.jsonl")) == \
        [f"trial-{SEED}-{n}.jsonl" for n in range(TRIALS)]
    assert not any(leftovers(Path("/tmp/nonexistent-base")).get(k) for k in
                   ("namespaces", "links", "netns_etc"))
