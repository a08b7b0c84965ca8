"""bench/chaos.py stops cleanly on SIGINT/SIGTERM: the testbed is torn down and the trials
that finished are reported (issue #14, chunked 1,000-trial runs are stopped this way).

The testbed and the trial runner are replaced by stand-ins, so this runs in a second; what
is tested is the bench's own control flow around them."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from supervisor_dcdeploy.lab.testbed.trial import TrialResult

REPO = Path(__file__).resolve().parent.parent


def _load_chaos():
    spec = importlib.util.spec_from_file_location("chaos_bench", REPO / "bench" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeBed:
    def __init__(self, config):
        self.config = config
        self.hosts = {f"h{n + 1}": None for n in range(config.hosts)}
        self.downs = 0

    def up(self):
        return self

    def down(self):
        self.downs += 1


@pytest.fixture
def chaos(monkeypatch):
    module = _load_chaos()
    monkeypatch.setattr(module, "_quiet", lambda: None)
    beds: list[FakeBed] = []

    def make_bed(config):
        beds.append(FakeBed(config))
        return beds[-1]

    monkeypatch.setattr(module, "Testbed", make_bed)
    monkeypatch.setattr(module, "abort_if_stuck", lambda bed: None)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield module, beds
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_tears_the_testbed_down_and_reports_the_finished_trials(
        chaos, monkeypatch, tmp_path, capsys, signum):
    module, beds = chaos
    calls: list[str] = []

    def run_deploy(bed, version, schedule, history):
        calls.append(version)
        if len(calls) == 3:  # the third trial is interrupted while it runs
            os.kill(os.getpid(), signum)
        return TrialResult(version=version, events=[], results=[],
                           metrics={"election_s": [], "resume_s": []}, converged=True,
                           injected=Counter(agent_kill=1), during_deploy=Counter(agent_kill=1))

    monkeypatch.setattr(module, "run_deploy", run_deploy)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    rc = module.main(["--trials", "10", "--seed", "5", "--json", "--keep", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 130
    assert len(calls) == 3, "the run went on after the signal"
    assert report["interrupted"] is True and report["trials"] == 2
    assert report["faults"] == {"agent_kill": 2} and report["violations"] == []
    assert [b.downs for b in beds] == [1]


def test_a_run_that_is_not_interrupted_says_so(chaos, monkeypatch, tmp_path, capsys):
    module, beds = chaos

    def run_deploy(bed, version, schedule, history):
        return TrialResult(version=version, events=[], results=[],
                           metrics={"election_s": [], "resume_s": []}, converged=True)

    monkeypatch.setattr(module, "run_deploy", run_deploy)
    rc = module.main(["--trials", "2", "--seed", "5", "--json", "--keep", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["interrupted"] is False and report["trials"] == 2
    assert [b.downs for b in beds] == [1]
