"""Bad input gets a clear error naming the problem and never changes what runs."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from cluster import Cluster, wait_for
from needs import unavailable

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.cli import main as cli
from supervisor_dcdeploy.lab.sample import build_release


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 3, {"A": {"quorum": 1, "max_parallel": 1},
                                               "B": {"quorum": 1, "depends_on": ["A"]}})
    try:
        yield c
    finally:
        c.stop_all()


def run_cli(capsys, store_url, *argv):
    code = cli(["--store", store_url, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(cluster):
    return {(h, s): cluster.version(h, s) for h in cluster.hosts for s in ("A", "B")}


def test_garbage_and_bad_requests_change_nothing(cluster, capsys, store_url):
    cluster.boot({"A": "1", "B": "1"})
    before = snapshot(cluster)
    assert set(before.values()) == {"1"}

    # A wrong sha256: every host reports the verification failure; nobody queues.
    url, real = cluster.release("A", "2")
    wrong = ("0" if real[0] != "0" else "1") + real[1:]
    code, out, err = run_cli(capsys, store_url, "stage", "A", "2", "--url", url,
                             "--sha256", wrong)
    assert code == 0
    wait_for(lambda: all(cluster.host_status(h).get("services", {}).get("A", {})
                         .get("fetch", {}).get("state") == "failed" for h in cluster.hosts),
             30, "every host to report the failed verification")
    error = cluster.host_status("h0")["services"]["A"]["fetch"]["error"]
    assert wrong in error and real in error
    assert cluster.store.children("staging/A") == []
    # ... and the operator sees it in `dcdeploy status`.
    wait_for(lambda: all(h["services"]["A"].get("fetch", {}).get("state") == "failed"
                         for h in ops.status(cluster.store)["hosts"].values()), 30,
             "the failed download in dcdeploy status")
    code, out, err = run_cli(capsys, store_url, "status")
    assert "[2 failed:" in out and wrong in out
    assert not (cluster.hosts["h0"].root / "A" / "releases" / "2").exists()

    # Garbage written by hand into the staged release and into the deploy queue.
    cluster.store.set("staging/B", b"{not json")
    cluster.store.create("deploy/item-", b'{"service": "A", "version": 7}', sequential=True)
    def reported(host: str, what: str) -> bool:
        problems = cluster.host_status(host).get("services", {}).get("B", {}).get("invalid")
        return any(what in p for p in problems or [])

    wait_for(lambda: all(reported(h, "staging/B") and reported(h, "deploy/item-")
                         for h in cluster.hosts), 30, "hosts to report both garbage nodes")
    code, out, err = run_cli(capsys, store_url, "status", "--json")
    status = json.loads(out)
    assert status["deploy"][0]["state"] == "blocked"
    assert "version" in status["deploy"][0]["reason"]
    assert any("staging/B" in p and "not valid JSON" in p for p in status["problems"])
    # A deploy behind the garbage item would not overtake it; the operator clears it.
    code, out, err = run_cli(capsys, store_url, "abort")
    assert code == 0 and "aborted 1" in out

    # A dependency cycle, an unknown service, an unstaged service: refused with the reason.
    code, out, err = run_cli(capsys, store_url, "service", "set", "A", "--quorum", "1",
                             "--depends-on", "B")
    assert code == 2 and "cycle" in err and "A -> B -> A" in err
    code, out, err = run_cli(capsys, store_url, "deploy", "nosuch")
    assert code == 2 and '"nosuch" is not defined' in err
    code, out, err = run_cli(capsys, store_url, "deploy", "B")
    assert code == 2 and "staging/B" in err and "not valid JSON" in err
    code, out, err = run_cli(capsys, store_url, "stage", "A", "2", "--url", "ftp://x/y",
                             "--sha256", real, "--size", "100")
    assert code == 2 and "scheme" in err
    code, out, err = run_cli(capsys, store_url, "stage", "A", "2", "--url", url,
                             "--sha256", "xyz")
    assert code == 2 and "64 hex digits" in err

    # Nothing running changed, and the queue is empty.
    assert snapshot(cluster) == before
    assert cluster.store.children("deploy") == []
    for h in cluster.hosts:
        assert sorted(cluster.store.children("current/A")) == sorted(cluster.hosts)
        assert cluster.host_status(h)["services"]["A"]["process"] == "RUNNING"


def test_dependency_order_is_enforced_when_queueing(cluster, capsys, store_url):
    cluster.define()
    cluster.stage("A", "1")
    cluster.stage("B", "1")
    code, out, err = run_cli(capsys, store_url, "deploy", "B")
    assert code == 0
    # A queued after B, which depends on it, would break the order.
    code, out, err = run_cli(capsys, store_url, "deploy", "A")
    assert code == 2 and "depends on" in err and "dcdeploy deploy A B" in err
    code, out, err = run_cli(capsys, store_url, "deploy", "B")
    assert code == 2 and "already queued" in err
    ops.abort(cluster.store)
    code, out, err = run_cli(capsys, store_url, "deploy", "B", "A")
    assert code == 0
    assert [line.split()[2] for line in out.splitlines() if line.startswith("queued")] == \
        ["A", "B"]


def test_full_disk_fails_the_download_and_keeps_serving(workdir, store, store_url):
    """A host whose disk is full reports the failed download, keeps serving its version,
    and does not block the others; with space again it catches up."""
    cluster = Cluster(workdir, store, store_url, 3, {"A": {"quorum": 1, "max_parallel": 1}})
    # The download cache is the full disk. (Not the whole host root: supervisord itself
    # exits when its own log file cannot be written; see docs/protocol.md.)
    tight = cluster.hosts["h2"].root / ".cache"
    tight.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tight)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        cluster.boot({"A": "1"})
        filler = tight / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k", "count=1000"],
                       capture_output=True)
        assert shutil.disk_usage(tight).free < 64 * 1024
        # Bigger than what is left on h2, so its download cannot fit.
        big, big_sha = build_release(workdir / "big", "A", "2", padding=256 * 1024)
        ops.stage(cluster.store, "A", "2", sha256=big_sha, urls=[f"file://{big}"],
                  size=big.stat().st_size)
        wait_for(lambda: "h2" in ops.status(cluster.store)["hosts"] and
                 ops.status(cluster.store)["hosts"]["h2"]["services"]["A"]
                 .get("fetch", {}).get("state") == "failed", 60, "h2 to report the full disk")
        error = ops.status(cluster.store)["hosts"]["h2"]["services"]["A"]["fetch"]["error"]
        assert "full" in error.lower() or "space" in error.lower()
        ops.deploy(cluster.store, ["A"])
        wait_for(lambda: cluster.all_on("A", "2", ["h0", "h1"]), 60, "h0 and h1 on 2")
        assert cluster.version("h2", "A") == "1"  # still serving, untouched
        # ... and its failed download, with the error h2 reported (a full disk may heal).
        wait_for(lambda: (ops.status(cluster.store)["deploy"][0]["reason"] or "").startswith(
                 "waiting for hosts to download and verify (hosts not on 2: h2); 1 hosts "
                 "failed to download 2 and retry: h2: "), 30,
                 "status to name h2 as the host the deploy waits for, and why")
        filler.unlink()
        wait_for(cluster.queue_empty, 90, "h2 to catch up once space is back")
        assert cluster.all_on("A", "2")
    finally:
        cluster.stop_all()
        subprocess.run(["umount", "-l", str(tight)], capture_output=True)
