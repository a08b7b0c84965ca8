"""Issue 8's proofs of concept against the real agent, real ZooKeeper and real supervisord:
a deploy item of 100,000 ``[``, a 400-digit ``staged_at``, NaN / 1e999 health timings, a
torrent nested 100,000 deep. Every agent keeps running with the same pid and no cycle error,
the services keep serving, ``dcdeploy status`` names the problem, ``status --json`` stays
strict JSON, and ``dcdeploy abort`` clears what blocks the queue."""

from __future__ import annotations

import base64
import json
import os

import pytest
from cluster import Cluster, wait_for

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.model import DeployItem
from supervisor_dcdeploy.cli import main as cli
from supervisor_dcdeploy.lab.storefuzz import agent_pids, cycle_errors, wait_cycles

HOSTS = ("h0", "h1", "h2")


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, len(HOSTS),
                {"A": {"quorum": 1, "max_parallel": 1},
                 "B": {"quorum": 1, "depends_on": ["A"]}})
    try:
        yield c
    finally:
        c.stop_all()


def run_cli(capsys, store_url, *argv):
    code = cli(["--store", store_url, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"status --json printed {name}: not strict JSON")
    return json.loads(text, parse_constant=refuse)


def reported(cluster: Cluster, needle: str, svc: str = "A") -> bool:
    """Every host's status.json lists a problem containing ``needle`` for ``svc``."""
    return all(any(needle in p for p in (cluster.host_status(h).get("services", {})
                                         .get(svc, {}).get("invalid") or []))
               for h in cluster.hosts)


def unharmed(cluster: Cluster, pids: dict, versions: dict[str, str]) -> None:
    """Same agent pids, no cycle error, every service serving its version on every host."""
    wait_cycles(cluster)
    assert agent_pids(cluster) == pids
    assert cycle_errors(cluster) == 0
    for svc, version in versions.items():
        assert cluster.all_on(svc, version), f"{svc} not serving {version} everywhere"


def staged_value(cluster: Cluster, svc: str, version: str, staged_at: str) -> bytes:
    url, sha = cluster.release(svc, version)
    size = os.path.getsize(url.removeprefix("file://"))
    return (f'{{"version": "{version}", "sha256": "{sha}", "size": {size}, "urls": ["{url}"], '
            f'"staged_at": {staged_at}}}').encode()


def test_deep_item_and_huge_number_are_reported_and_aborted(cluster, capsys, store_url):
    cluster.boot({"A": "1", "B": "1"})
    pids = agent_pids(cluster)
    assert all(pids.values())

    # 100,000 '[' as a deploy item: was RecursionError in every agent, status and abort.
    cluster.store.create("deploy/item-", b"[" * 100_000, sequential=True)
    wait_for(lambda: reported(cluster, "nested 100000 levels deep"), 60,
             "every host to report the deep item")
    unharmed(cluster, pids, {"A": "1", "B": "1"})
    code, out, err = run_cli(capsys, store_url, "status")
    assert code == 0 and "nested 100000 levels deep" in out
    code, out, err = run_cli(capsys, store_url, "status", "--json")
    status = strict_json(out)
    assert status["deploy"][0]["state"] == "blocked"
    assert "nested 100000 levels deep" in status["deploy"][0]["reason"]
    code, out, err = run_cli(capsys, store_url, "pause")
    assert code == 2 and "invalid" in err
    code, out, err = run_cli(capsys, store_url, "resume")
    assert code == 2 and "invalid" in err
    code, out, err = run_cli(capsys, store_url, "abort")
    assert code == 0 and "aborted 1" in out
    assert cluster.store.children("deploy") == []
    code, out, err = run_cli(capsys, store_url, "history", "--json")
    record = strict_json(out)[-1]
    assert record["state"] == "aborted" and "nested" in record["reason"]
    assert len(record["raw"]) <= ops.RAW_KEPT

    # A 400-digit staged_at: was OverflowError in every agent and in `dcdeploy status`.
    cluster.store.set("staging/A", staged_value(cluster, "A", "2", "9" * 400))
    wait_for(lambda: reported(cluster, "400 digits"), 60, "every host to report staged_at")
    unharmed(cluster, pids, {"A": "1", "B": "1"})
    code, out, err = run_cli(capsys, store_url, "status")
    assert code == 0 and "staging/A" in out and "400 digits" in out
    code, out, err = run_cli(capsys, store_url, "deploy", "A")
    assert code == 2 and "400 digits" in err

    # 1e999 was printed as Infinity by `status --json`; now it is a named problem.
    cluster.store.set("staging/A", staged_value(cluster, "A", "2", "1e999"))
    wait_for(lambda: reported(cluster, "1e999"), 60, "every host to report 1e999")
    code, out, err = run_cli(capsys, store_url, "status", "--json")
    status = strict_json(out)
    assert status["services"]["A"]["staged"] is None
    assert any("staging/A" in p and "1e999" in p for p in status["problems"])

    # An item whose service and version are fine but a number is not: aborted, and the
    # history keeps what could be read.
    cluster.store.create("deploy/item-", b'{"service": "A", "version": "2", '
                                         b'"state": "waiting", "updated": NaN}', sequential=True)
    wait_for(lambda: reported(cluster, "NaN"), 60, "every host to report the NaN item")
    code, out, err = run_cli(capsys, store_url, "abort")
    assert code == 0 and "aborted 1" in out
    record = ops.history(cluster.store)[-1]
    assert (record["service"], record["version"], record["state"]) == ("A", "2", "aborted")
    unharmed(cluster, pids, {"A": "1", "B": "1"})


BAD_SPECS = [
    ("healthy_secs", "NaN"),
    ("healthy_secs", "1e999"),
    ("timeout", "Infinity"),
]


def spec_value(field: str, literal: str) -> bytes:
    timeout = literal if field == "timeout" else "1.0"
    healthy = literal if field == "healthy_secs" else "0"
    return (f'{{"program": "A", "quorum": 1, "depends_on": [], "max_parallel": 1, '
            f'"health": {{"kind": "http", "target": "http://127.0.0.1:{{port}}/health", '
            f'"timeout": {timeout}}}, "healthy_secs": {healthy}, "preload": false}}').encode()


def test_non_finite_timings_are_never_acted_on_and_a_fix_deploys(cluster, capsys, store_url):
    cluster.boot({"A": "1", "B": "1"})
    pids = agent_pids(cluster)
    cluster.stage("A", "2")
    wait_for(lambda: len(cluster.store.children("staging/A")) == len(HOSTS), 60,
             "every host to fetch A 2 and join the ready queue")
    # Before: accepted, and switch() broke after the program was stopped (no rollback,
    # no failure mark). Now the spec is refused, so nothing switches with it.
    for i, (field, literal) in enumerate(BAD_SPECS):
        cluster.store.set("services/A", spec_value(field, literal))
        wait_for(lambda lit=literal: reported(cluster, lit), 60, f"hosts to report {literal}")
        if i == 0:  # a deploy queued by hand (dcdeploy deploy refuses an invalid spec)
            code, out, err = run_cli(capsys, store_url, "deploy", "A")
            assert code == 2 and "not defined" in err
            # Signed with the operator's key, as hosts act only on signed items.
            signed = ops._sign(DeployItem(node="item-", seq=-1, service="A", version="2",
                                          updated=1.0), cluster.signer, None, [])
            item = cluster.store.create("deploy/item-", signed.to_json(), sequential=True)
            # Its history name taken by hand: completing must not fail forever on it.
            cluster.store.create(f"history/{item.rpartition('/')[2]}", b"[" * 100_000)
        unharmed(cluster, pids, {"A": "1", "B": "1"})
        code, out, err = run_cli(capsys, store_url, "status")
        assert code == 0 and "services/A" in out and literal in out
        strict_json(run_cli(capsys, store_url, "status", "--json")[1])
    # The operator writes a good spec: the queued deploy goes through.
    cluster.define()
    wait_for(cluster.queue_empty, 120, "the deploy of A 2 to finish")
    assert cluster.all_on("A", "2")
    assert [h["state"] for h in ops.history(cluster.store)][-2:] == ["unreadable", "done"]
    unharmed(cluster, pids, {"A": "2", "B": "1"})

    # A torrent nested 100,000 deep: refused by every host and by `dcdeploy stage`.
    meta = b"d4:infod4:name1:a12:piece lengthi65536e6:pieces0:6:lengthi1e4:deep" + \
        b"l" * 100_000 + b"e" * 100_000 + b"ee"
    torrent = base64.b64encode(meta).decode()
    url, sha = cluster.release("B", "2")
    cluster.store.set("staging/B", json.dumps({"version": "2", "sha256": sha, "size": 1,
                                               "urls": [], "torrent": torrent}).encode())
    wait_for(lambda: reported(cluster, "nested deeper than", "B"), 60,
             "every host to refuse the nested torrent")
    with pytest.raises(ops.OpError, match="nested deeper than"):
        ops.stage(cluster.store, "B", "2", sha256=sha, size=1, torrent=torrent)
    code, out, err = run_cli(capsys, store_url, "status")
    assert code == 0 and "staging/B" in out and "nested deeper than" in out
    unharmed(cluster, pids, {"A": "2", "B": "1"})


# A staged release whose size is missing or not a byte count hosts accept (issue 8: the size
# bounds every download). (JSON literal or None for no size, what every host reports.)
BAD_SIZES = [
    (None, "field 'size': missing"),
    ("0", "field 'size': 0 is outside [1, "),
    ("-1", "field 'size': -1 is outside [1, "),
    ("true", "field 'size': expected int, got True"),
    ("1.5", "field 'size': expected int, got 1.5"),
    (str((1 << 50) + 1), f"field 'size': {(1 << 50) + 1} is outside [1, "),
]


def test_a_staged_release_without_a_valid_size_is_refused(cluster, capsys, store_url):
    cluster.boot({"A": "1", "B": "1"})
    pids = agent_pids(cluster)
    url, sha = cluster.release("A", "2")
    # A signed deploy item for A 2, as an operator would queue: hosts act only on signed
    # items, so what stops the deploy below is the staged release alone.
    signed = ops._sign(DeployItem(node="item-", seq=-1, service="A", version="2",
                                  updated=1.0), cluster.signer, None, [])
    cluster.store.create("deploy/item-", signed.to_json(), sequential=True)
    for literal, problem in BAD_SIZES:
        size = "" if literal is None else f'"size": {literal}, '
        cluster.store.set("staging/A", (f'{{"version": "2", "sha256": "{sha}", {size}'
                                        f'"urls": ["{url}"], "staged_at": 1.7e9}}').encode())
        wait_for(lambda p=problem: reported(cluster, p), 60, f"every host to report {problem}")
        wait_cycles(cluster)
        unharmed(cluster, pids, {"A": "1", "B": "1"})
        # Not fetched, not queued for: no host joined the ready queue or made a release dir.
        assert cluster.store.children("staging/A") == []
        assert not any((h.root / "A" / "releases" / "2").exists()
                       for h in cluster.hosts.values())
        code, out, err = run_cli(capsys, store_url, "status")
        assert code == 0 and "staging/A" in out and problem in out
        code, out, err = run_cli(capsys, store_url, "deploy", "A")
        assert code == 2 and problem in err
    # The same release staged with its size (signed, by the CLI's path) deploys.
    cluster.stage("A", "2")
    wait_for(cluster.queue_empty, 120, "the deploy of A 2 to finish")
    assert cluster.all_on("A", "2")
    unharmed(cluster, pids, {"A": "2", "B": "1"})


def test_abort_clears_garbage_even_when_its_history_name_is_taken(store, capsys, store_url):
    store.ensure("history")
    node = store.create("deploy/item-", b"{" * 50_000, sequential=True).rpartition("/")[2]
    store.create(f"history/{node}", b"[" * 100_000)
    code, out, err = run_cli(capsys, store_url, "abort")
    assert code == 0 and node in out
    assert store.children("deploy") == []
    code, out, err = run_cli(capsys, store_url, "history", "--json")
    records = strict_json(out)
    assert [r["state"] for r in records] == ["unreadable", "aborted"]
    assert "nested 100000 levels deep" in records[0]["reason"]
    code, out, err = run_cli(capsys, store_url, "history")
    assert code == 0 and "unreadable" in out
