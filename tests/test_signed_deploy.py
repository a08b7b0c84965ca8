"""Hosts trust a key, not the store: real ZooKeeper, real supervisord, the real agent.

Every host of the data center pins the operator key (localdc.Cluster). A store writer
without that key writes an unsigned release, one signed by another key, an expired one,
replays an older signed release and an older deploy item, and sets ``quorum: 0`` in the
signed spec. Each is refused by every host and named in ``dcdeploy status``; nothing
switches, which is checked on what an independent prober recorded and on the gate node."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from cluster import Cluster, wait_for

from supervisor_dcdeploy import ops, trust
from supervisor_dcdeploy.cli import main as cli
from supervisor_dcdeploy.model import DeployItem, StagedRelease, dumps


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 3, {"A": {"quorum": 2, "max_parallel": 1}})
    try:
        yield c
    finally:
        c.stop_all()


def reads(cluster: Cluster, host: str) -> int:
    """The host's cycle count (status.json; an idle cycle reads nothing from the store)."""
    return cluster.host_status(host).get("cycles", -1)


def full_cycles(cluster: Cluster) -> None:
    """Wait until every host has run a whole cycle that started after this call: the
    agent rewrites status.json (with a higher cycle count) at the end of each cycle, so the
    second rewrite seen after now ends a cycle that began after now."""
    for host in cluster.hosts:
        for _ in range(2):
            before = reads(cluster, host)
            wait_for(lambda h=host, b=before: reads(cluster, h) > b, 30,
                     f"{host} to finish a cycle")


def refused_by_all(cluster: Cluster, fragment: str) -> str:
    """The `dcdeploy status` problem line naming ``fragment``, once every host reports it."""
    everyone = f"refused by {', '.join(sorted(cluster.hosts))}: "
    return wait_for(lambda: next((p for p in ops.status(cluster.store)["problems"]
                                  if p.startswith(everyone) and fragment in p), None), 60,
                    f"every host to refuse: {fragment}")


def status_text(capsys, store_url: str) -> str:
    assert cli(["--store", store_url, "status"]) == 0
    return capsys.readouterr().out


def installed(cluster: Cluster, host: str) -> tuple[str | None, str | None]:
    fetch = cluster.host_status(host).get("services", {}).get("A", {}).get("fetch") or {}
    return fetch.get("version"), fetch.get("state")


def queue_signed(cluster: Cluster, svc: str, version: str) -> str:
    """A deploy item signed by the operator key, written straight into the store (`dcdeploy
    deploy` refuses to sign an item for a staged release its key does not vouch for)."""
    item = DeployItem("item-", -1, svc, version, updated=time.time())
    signature = trust.sign(cluster.signer, trust.payload_of(item),
                           trust.next_counter(time.time(), None), time.time() + 3600)
    path = cluster.store.create("deploy/item-", dataclasses.replace(
        item, signature=signature).to_json(), sequential=True)
    return path.rpartition("/")[2]


def assert_nothing_switched(cluster: Cluster, gate_version: int) -> None:
    assert cluster.all_on("A", "1")
    assert cluster.store.get("gate/A")[1] == gate_version, "a host passed the gate"
    assert sorted(cluster.store.children("current/A")) == sorted(cluster.hosts)


def test_refused_operator_data_is_never_acted_on(cluster, workdir, capsys, store_url):
    store = cluster.store
    cluster.boot({"A": "1"})
    prober = cluster.prober().start()
    gate = store.get("gate/A")[1]
    url2, sha2 = cluster.release("A", "2")
    size2 = Path(url2.removeprefix("file://")).stat().st_size
    unsigned = StagedRelease.parse("A", dumps({"version": "2", "sha256": sha2,
                                               "size": size2, "urls": [url2]}))
    try:
        # 1. An unsigned release, and a (signed) deploy item that wants it.
        store.set("staging/A", unsigned.to_json())
        problem = refused_by_all(cluster, "staging/A: unsigned (no signature)")
        with pytest.raises(ops.OpError, match="does not verify with your key"):
            ops.deploy(store, ["A"])  # the operator's side will not vouch for it ...
        queue_signed(cluster, "A", "2")  # ... and a signed item does not make hosts act
        full_cycles(cluster)
        assert_nothing_switched(cluster, gate)
        for host in cluster.hosts:
            assert not (cluster.hosts[host].root / "A" / "releases" / "2").exists()
            assert cluster.host_status(host)["services"]["A"]["refused"] == \
                [problem.split(": ", 1)[1]]
        out = status_text(capsys, store_url)
        assert "PROBLEMS" in out and problem in out
        ops.abort(store)

        # 2. A release signed by a key the hosts do not pin.
        _, _, other_id = trust.generate(workdir / "intruder")
        ops.stage(store, "A", "2", sha256=sha2, urls=[url2], size=size2,
                  signer=trust.load_signer(workdir / "intruder" / "operator.key"))
        refused_by_all(cluster, f"staging/A: signed by unknown key {other_id}")
        queue_signed(cluster, "A", "2")
        full_cycles(cluster)
        assert_nothing_switched(cluster, gate)
        assert not any((h.root / "A" / "releases" / "2").exists()
                       for h in cluster.hosts.values())
        ops.abort(store)

        # 3. A release signed by the right key, but expired.
        now = time.time()
        signature = trust.sign(cluster.signer, trust.payload_of(unsigned),
                               trust.next_counter(now, None), now - 60)
        store.set("staging/A", dataclasses.replace(unsigned, signature=signature).to_json())
        problem = refused_by_all(cluster, "staging/A: signature expired at")
        queue_signed(cluster, "A", "2")
        full_cycles(cluster)
        assert_nothing_switched(cluster, gate)
        assert problem in status_text(capsys, store_url)
        ops.abort(store)

        # 4. A replay: 2 and then 3 are staged (signed), hosts install both; the store
        # writer puts the older signed 2 back and queues it.
        cluster.stage("A", "2")
        old = store.get("staging/A")[0]
        wait_for(lambda: len(store.children("staging/A")) == 3, 60, "every host ready for 2")
        three = cluster.stage("A", "3")
        wait_for(lambda: all(installed(cluster, h) == ("3", "installed")
                             for h in cluster.hosts), 60, "every host to install 3")
        store.set("staging/A", old)
        refused_by_all(cluster, "staging/A: counter")
        assert "a replay of older data" in " ".join(ops.status(store)["problems"])
        (item2,) = ops.deploy(store, ["A"])  # a signed item for 2: the release is not
        replayed = item2.node
        full_cycles(cluster)
        assert_nothing_switched(cluster, gate)
        ops.abort(store)

        # 5. quorum 0 (and every host at once) written into the signed spec.
        ops.stage(store, "A", "3", sha256=three.sha256, urls=list(three.urls),
                  size=three.size)  # re-signed
        wait_for(lambda: len(store.children("staging/A")) == 3, 60, "every host ready for 3")
        raw, _ = store.get("services/A")
        store.set("services/A", dumps({**json.loads(raw), "quorum": 0, "max_parallel": 3}))
        problem = refused_by_all(cluster, "services/A: bad signature")
        (item,) = cluster.deploy(["A"])
        full_cycles(cluster)
        assert_nothing_switched(cluster, gate)
        for host in cluster.hosts:
            assert cluster.host_status(host)["services"]["A"]["reason"] == \
                problem.split(": ", 1)[1]
        restored = time.time()
        cluster.define()  # the operator signs the spec again
        wait_for(cluster.queue_empty, 120, "the deploy of 3 to finish with the signed spec")
        assert cluster.all_on("A", "3")

        # 6. The aborted item for 2 (signed, older counter) replayed into the queue.
        record = json.loads(store.get(f"history/{replayed}")[0])
        store.create("deploy/item-", dumps({**record, "state": "waiting", "reason": None}),
                     sequential=True)
        refused_by_all(cluster, "deploy/item-")
        full_cycles(cluster)
        assert cluster.all_on("A", "3")
        ops.abort(store)
    finally:
        prober.stop()
    # What the prober saw: nobody ever served 2, nobody went down before the operator
    # signed the spec again, and the deploy of 3 kept the signed quorum (2), not 0.
    assert prober.first_seen("A", "2") is None
    first_down = next((s.t for s in prober.samples if prober.serving(s, "A") < 3), None)
    assert first_down is not None and first_down > restored
    assert min(prober.serving(s, "A") for s in prober.samples) >= 2
    assert json.loads(store.get("gate/A")[0])["quorum"] == 2
    assert item.node in {h["item"] for h in cluster.history() if h["state"] == "done"}
