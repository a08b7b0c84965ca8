"""Each agent's /metrics on a real local data center (real ZooKeeper, supervisord, agents),
scraped during deploys and parsed with prometheus_client's own text parser."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from cluster import Cluster, wait_for
from prometheus_client.parser import text_string_to_metric_families

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.lab.zkserver import free_port

SERVICES = {"A": {"quorum": 2, "max_parallel": 1, "healthy_secs": 0.3}}


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def versions(sample: dict, svc: str) -> set[str]:
    return {dict(labels)["version"] for (name, labels), value in sample.items()
            if name == "dcdeploy_service_version_info" and dict(labels)["service"] == svc
            and value == 1}


@pytest.fixture
def cluster(workdir, store, store_url):
    c = Cluster(workdir, store, store_url, 3, SERVICES)
    c.metrics = {}  # type: ignore[attr-defined]
    for name, layout in c.hosts.items():
        c.metrics[name] = f"127.0.0.1:{free_port()}"  # type: ignore[attr-defined]
        layout.agent_extra["metrics_listen"] = c.metrics[name]  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop_all()


def test_agent_metrics_follow_a_deploy_and_a_rollback(cluster):
    cluster.boot({"A": "1"})
    wait_for(lambda: all(versions(scrape(a), "A") == {"1"} for a in cluster.metrics.values()),
             30, "every agent's /metrics to show A 1")
    # Scrape every host all through the deploy: the version label moves from 1 to 2 once.
    seen: dict[str, list[str]] = {h: [] for h in cluster.hosts}
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            for host, address in cluster.metrics.items():
                got = versions(scrape(address), "A")
                if len(got) == 1 and (not seen[host] or seen[host][-1] != min(got)):
                    seen[host].append(min(got))
            stop.wait(0.05)

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        cluster.stage("A", "2")
        wait_for(lambda: len(cluster.store.children("staging/A")) == 3, 60,
                 "every host ready for A 2")
        ops.deploy(cluster.store, ["A"])
        wait_for(cluster.queue_empty, 120, "the deploy of A 2 to finish")
        wait_for(lambda: all(s and s[-1] == "2" for s in seen.values()), 30,
                 "every agent's /metrics to show A 2")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert seen == {h: ["1", "2"] for h in cluster.hosts}, seen
    for host, address in cluster.metrics.items():
        got = scrape(address)
        assert got[("dcdeploy_switch_duration_seconds_count",
                    (("outcome", "ok"), ("service", "A")))] == 1, host
        assert got[("dcdeploy_store_session_state", (("state", "connected"),))] == 1
        assert got[("dcdeploy_store_requests_total", (("kind", "read"),))] > 0
        assert got[("dcdeploy_download_completed_bytes", (("service", "A"),))] > 0
        assert got.get(("dcdeploy_rollbacks_total", (("service", "A"),)), 0) == 0

    # A broken release: the first host to take it fails its check and rolls back.
    cluster.stage("A", "3", broken=True)
    wait_for(lambda: len(cluster.store.children("staging/A")) == 3, 60,
             "every host ready for the broken A 3")
    ops.deploy(cluster.store, ["A"])
    failed = wait_for(lambda: next((d for d in cluster.status()["deploy"]
                                    if d["state"] == "failed"), None), 90, "the deploy to fail")
    host = next(h for h in cluster.hosts if f"host {h}:" in failed["reason"])
    wait_for(lambda: scrape(cluster.metrics[host]).get(
        ("dcdeploy_rollbacks_total", (("service", "A"),))) == 1, 30,
        f"{host}'s rollback counter at 1")
    got = scrape(cluster.metrics[host])
    assert got[("dcdeploy_health_check_failures_total", (("service", "A"),))] >= 1
    assert got[("dcdeploy_switch_duration_seconds_count",
                (("outcome", "rolled_back"), ("service", "A")))] == 1
    assert versions(got, "A") == {"2"}
    for other in set(cluster.hosts) - {host}:
        assert scrape(cluster.metrics[other]).get(
            ("dcdeploy_rollbacks_total", (("service", "A"),)), 0) == 0
