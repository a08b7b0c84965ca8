"""The topology event's ``installed`` versions, which S3 accepts as staged by an earlier
run (lab/testbed/trial.py ``_installed``). No testbed: hosts are stand-ins with a root."""

from __future__ import annotations

from types import SimpleNamespace

from supervisor_dcdeploy.fetch import write_marker
from supervisor_dcdeploy.lab.testbed import checker
from supervisor_dcdeploy.lab.testbed.trial import _installed
from supervisor_dcdeploy.localstate import LocalState, ReleaseDir


def _bed(tmp_path, *names):
    hosts = {}
    for name in names:
        root = tmp_path / name
        root.mkdir()
        hosts[name] = SimpleNamespace(layout=SimpleNamespace(root=root))
    return SimpleNamespace(hosts=hosts, services={"a": None, "b": None})


def test_installed_lists_the_versions_a_host_could_start_from_its_disk(tmp_path):
    """Chaos seed 1806 trial 6: h2's state said b active 7 (unverified), previous 6; 6 had
    been staged in trial 5. The agent leaves the state's ``installed`` map empty, so the
    topology listed nothing and S3 called b 6 "never staged" when h2 recovered onto it."""
    bed = _bed(tmp_path, "h1", "h2")
    LocalState(bed.hosts["h2"].layout.root).update("b", active="7", previous="6",
                                                   verified=False)
    rd = ReleaseDir(bed.hosts["h1"].layout.root, "a")
    rd.path("5").mkdir(parents=True)
    write_marker(rd.path("5"), version="5", sha256="ab" * 32)
    rd.path("9").mkdir(parents=True)  # no marker: an unpack that never finished
    assert _installed(bed) == {"a": ["5"], "b": ["6", "7"]}


def test_s3_accepts_a_version_listed_as_installed_and_no_other():
    topology = {"t": 0.0, "kind": "topology", "initial": {"b": "7"}, "present": {"b": ["7"]},
                "installed": {"b": ["6", "7"]},
                "hosts": {"h2": {"rack": "r1", "address": "10.0.0.2",
                                 "services": {"b": 8002}}},
                "services": {"b": {"quorum": 1, "depends_on": []}}, "session_timeout": 4.0}

    def s3(version):
        events = [topology,
                  {"t": 1.0, "kind": "probe", "host": "h2", "service": "b", "ok": True,
                   "version": version, "healthy": None, "dt": 0.01},
                  {"t": 2.0, "kind": "final", "settled": True, "converged": True}]
        return next(r for r in checker.check(events) if r.prop == "S3")

    assert s3("6").status == "held"
    assert s3("5").status == "violated"
