"""``dcdeploy plan`` on a real fleet (issue 10 item 4): the agents record their switch
timings, the plan predicts from them, ``deploy`` records the prediction and ``history``
puts it beside the actual duration. Plus the new commands' bad input."""

from __future__ import annotations

import json

import pytest
from cluster import Cluster, wait_for

from supervisor_dcdeploy import ops

SERVICES = {"A": {"quorum": 1, "max_parallel": 1, "healthy_secs": 0.5}}


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 3, SERVICES)
    try:
        yield c
    finally:
        c.stop_all()


def ready(cluster: Cluster, version: str) -> None:
    wait_for(lambda: sum(1 for n in cluster.store.children("staging/A")) >= 3
             and cluster.status()["services"]["A"]["staged"]["version"] == version, 60,
             f"every host ready for {version}")


def test_plan_predicts_from_recorded_switches_and_history_compares(cluster, run):
    cluster.boot({"A": "1"})
    # No history yet: the plan says it uses the fallback.
    cluster.stage("A", "2")
    code, out, err = run("plan", "A", "--json")
    assert code == 0, err
    first = json.loads(out)
    (item,) = first["items"]
    assert item["timing_source"].startswith("fallback")
    assert item["batches"] == 3 and item["k"] == 1  # 3 hosts, one at a time (max_parallel 1)
    ready(cluster, "2")
    code, out, err = run("deploy", "A")
    assert code == 0 and "predicted total" in out, (out, err)
    wait_for(cluster.queue_empty, 90, "the deploy to 2 to finish")
    done = [h for h in cluster.history() if h.get("version") == "2"][0]
    assert len(done["timings"]) == 3 and {t["host"] for t in done["timings"]} == \
        set(cluster.hosts)
    assert all(t["version"] == "2" and t["healthy_s"] >= 0.5 for t in done["timings"])

    # With history: the plan's batch is the median of the recorded switches.
    cluster.stage("A", "3")
    code, out, err = run("plan", "A")
    assert code == 0 and "history: median of 3 switches" in out, out
    code, out, err = run("plan", "A", "--json")
    planned = json.loads(out)
    assert planned["schema"] == 1 and planned["total_s"] is not None
    # ... plus the median idle time between them (one host back, the next one's gate):
    # the next switch starts only after the previous host registered again.
    (item,) = planned["items"]
    assert item["timing_source"].startswith(
        "history: median of 3 switches, plus the median handoff"), item["timing_source"]
    switches = sorted(t["stop_s"] + t["start_s"] + t["healthy_s"] for t in done["timings"])
    assert item["batch_s"] > switches[1]
    ready(cluster, "3")
    code, out, err = run("deploy", "A")
    assert code == 0, err
    wait_for(cluster.queue_empty, 90, "the deploy to 3 to finish")
    code, out, err = run("history", "--json")
    record = [h for h in json.loads(out) if h.get("version") == "3"][0]
    assert record["predicted_s"] == planned["total_s"]  # the same plan, recorded by deploy
    assert record["actual_s"] is not None and record["actual_s"] > 0
    code, out, err = run("history")
    line = [ln for ln in out.splitlines() if " 3 " in ln and "done" in ln][0]
    assert "predicted" in line and "actual" in line and "actual -" not in line


@pytest.mark.parametrize("argv,fragment", [
    (["deploy", "A", "--canary", "-1"], "--canary -1"),
    (["deploy", "A", "--soak", "30"], "--soak needs --canary"),
    (["deploy", "A", "--canary", "1", "--soak", "nan"], "--soak nan"),
    (["plan", "nosuch"], '"nosuch" is not defined'),
    (["plan", "A", "--canary", "1", "--soak", "-5"], "--soak -5"),
    (["approve", "A"], 'no deploy of "A" is queued'),
    (["approve", "not a name"], "not a valid name"),
    (["history", "--limit", "0"], "--limit 0"),
    (["plan", "A", "--host-parallel", "0"], "--host-parallel: field 'host_parallel': "
                                            "must be 1..64, got 0"),
    (["plan", "A", "--host-parallel", "65"], "got 65"),
    (["plan", "A", "--max-down-per-rack", "0"], "--max-down-per-rack: 0 is outside"),
    (["plan", "A", "--rack-order", "r1,r1"], "--rack-order: names a rack twice"),
])
def test_bad_input_exit_2_with_the_reason(store, run, argv, fragment):
    ops.service_set(store, "A", program="A", quorum=0)
    code, out, err = run(*argv)
    assert code == 2 and fragment in err, (code, out, err)


def test_approve_without_canaries_is_refused(store, run):
    ops.service_set(store, "A", program="A", quorum=0)
    ops.stage(store, "A", "2", sha256="a" * 64, urls=["file:///x"], size=1)
    ops.deploy(store, ["A"])
    code, _, err = run("approve", "A")
    assert code == 2 and "has no canaries" in err
    assert run("abort")[0] == 0
    ops.deploy(store, ["A"], canary=1)
    code, out, err = run("approve", "A")
    assert code == 0 and "approved" in out, err
    item = ops.status(store)["deploy"][0]
    raw = json.loads(store.get(f"deploy/{item['item']}")[0])
    assert raw["approved"] is True and raw["signature"]  # the approval is signed
    code, _, err = run("approve", "A")
    assert code == 2 and "already approved" in err


def fleet_online(store, services, hosts):
    """Presences of ``hosts`` serving version 1 of each of ``services`` (the test's own
    session holds them), and the hosts in the registry: what the plan counts as online."""
    from supervisor_dcdeploy.model import CurrentEntry, HostInfo
    for h in hosts:
        store.create(f"hosts/{h}", HostInfo(h, "r0", tuple(services)).to_json())
        for svc in services:
            store.create(f"current/{svc}/{h}", CurrentEntry(h, "1", rack="r0").to_json(),
                         ephemeral=True)


def test_plan_takes_deploys_host_parallel(store, run):
    """``plan --host-parallel N`` predicts the deploy ``deploy --host-parallel N`` runs
    (issue 10 item 4): two independent services on the same 4 hosts, one batch each
    (max_parallel 4, quorum 0), no history (the fallback's batch): with the default a host
    does its two switches one after the other (the busiest host bounds the total at two
    batches), with 2 both at once (one batch). A queued item keeps its own N (1 here, as
    written without the flag), and ``deploy`` records the plan made with its own flags."""
    hosts = ["h0", "h1", "h2", "h3"]
    for svc in ("A", "B"):
        ops.service_set(store, svc, program=svc, quorum=0, max_parallel=4, healthy_secs=1)
        ops.stage(store, svc, "2", sha256="a" * 64, urls=["file:///x"], size=1)
    fleet_online(store, ["A", "B"], hosts)

    def plan(*flags, names=("A", "B")):
        code, out, err = run("plan", *names, "--json", *flags)
        assert code == 0, err
        return json.loads(out)

    one, two = plan(), plan("--host-parallel", "2")
    batch = one["items"][0]["batch_s"]
    assert one["items"][0]["timing_source"].startswith("fallback")
    assert (one["host_parallel"], two["host_parallel"]) == (1, 2)
    assert {i["host_parallel"] for i in one["items"]} == {1}
    assert {i["host_parallel"] for i in two["items"]} == {2}
    assert one["dag_bound_s"] == two["dag_bound_s"] == batch
    assert (one["host_bound_s"], one["total_s"]) == (2 * batch, 2 * batch)
    assert (two["host_bound_s"], two["total_s"]) == (batch, batch)
    code, out, _ = run("plan", "A", "B", "--host-parallel", "2")
    assert code == 0 and "with host_parallel 2" in out, out

    # B queued without the flag: its item runs with 1, whatever A's plan asks for.
    assert run("deploy", "B")[0] == 0
    mixed = plan("--host-parallel", "2", names=("A",))
    by = {i["service"]: i for i in mixed["items"]}
    assert (by["B"]["host_parallel"], by["A"]["host_parallel"]) == (1, 2)
    assert mixed["host_bound_s"] == pytest.approx(batch + batch / 2)
    code, out, _ = run("plan", "A", "--host-parallel", "2")
    assert "host_parallel 1 (queued with it)" in out, out

    # deploy prints (and records per item) the plan of its own flags.
    assert run("abort")[0] == 0
    code, out, err = run("deploy", "A", "B", "--host-parallel", "2")
    assert code == 0, err
    assert f"predicted total {batch:.1f} s" in out, out
    items = [json.loads(store.get(f"deploy/{n}")[0]) for n in store.children("deploy")]
    assert {i["host_parallel"] for i in items} == {2}
