"""Prometheus metrics: each agent's ``/metrics`` and the fleet gauges of ``dcdeploy web``.

Built on ``prometheus_client`` (the reference client: text format, histograms, its own
small HTTP server in a daemon thread). Each agent and each web server has its own
:class:`CollectorRegistry`, never the process-global one, so that several agents in one
test process (or a library user's own metrics) do not collide.

Most values are read at scrape time from what the agent already keeps for
``status.json`` (version, phase, download progress, session state, store requests): a
collector, no bookkeeping on the agent's path. Only events are counted as they happen
(switch durations, health-check failures, rollbacks), by the three ``on_*`` hooks.

Names follow Prometheus conventions: ``dcdeploy_`` prefix, base units in names
(``_seconds``, ``_bytes``), ``_total`` on counters, ``_info`` on the one-valued version
gauge, enum-style gauges (one series per state, the current one at 1) for phase and
session state."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .agent.worker import Agent

# Phases a service's reconciler reports (agent/reconciler.py ``set(phase=...)``).
PHASES = ("serving", "switching", "failed", "down", "installing", "recovering")
SESSION_STATES = ("connected", "suspended", "lost", "unreachable", "not authorized")
# Switches hold a healthy period (seconds to minutes): buckets from 100 ms to 10 min.
SWITCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DEFAULT_PORT = 9700


class ListenError(ValueError):
    pass


def parse_listen(where: str, text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``HOST`` (with ``default_port``) -> (host, port); a
    clear :class:`ListenError` naming ``where`` and the value otherwise. IPv6 in brackets."""
    text = text.strip()
    if not text:
        raise ListenError(f"{where}: empty address (expected HOST:PORT, e.g. "
                          f"127.0.0.1:{default_port})")
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if port_text == "" and text.endswith(":"):
        raise ListenError(f"{where}: {text!r} has no port after ':'")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ListenError(f"{where}: {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ListenError(f"{where}: {text!r}: port {port} is not in 1..65535")
    return host or "0.0.0.0", port


def _enum(name: str, doc: str, labels: list[str], states: Iterable[str],
          rows: Iterable[tuple[list[str], str | None]]) -> GaugeMetricFamily:
    """An enum-style gauge: for each row, one series per state, 1 for the row's state."""
    family = GaugeMetricFamily(name, doc, labels=[*labels, "state"])
    known = list(states)
    for values, current in rows:
        for state in known + ([current] if current and current not in known else []):
            family.add_metric([*values, state], 1.0 if state == current else 0.0)
    return family


class _AgentCollector(Collector):
    """Reads the agent's status at scrape time: ``agent.status`` is made from immutable
    values (agent/status.py), ``agent.fetch_progress`` is a copy taken under the fetch
    manager's lock, so this thread never reads a value half-written."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        services = {svc: dict(status) for svc, status in list(agent.status.items())}
        info = GaugeMetricFamily("dcdeploy_service_version_info",
                                 "The release this host runs, as a label (value always 1)",
                                 labels=["service", "version"])
        for svc, status in sorted(services.items()):
            if status.get("version"):
                info.add_metric([svc, str(status["version"])], 1.0)
        yield info
        yield _enum("dcdeploy_service_phase", "The agent's phase for each service "
                    "(1 for the current one)", ["service"], PHASES,
                    [([svc], status.get("phase")) for svc, status in sorted(services.items())])
        done = GaugeMetricFamily("dcdeploy_download_completed_bytes",
                                 "Bytes of the staged release downloaded so far",
                                 labels=["service"])
        size = GaugeMetricFamily("dcdeploy_download_size_bytes",
                                 "Size of the staged release being downloaded (when known)",
                                 labels=["service"])
        progress = dict(agent.fetch_progress)  # live, published by the fetch threads
        for svc in sorted(services):
            fetch = {**progress.get(svc, {}), **(services[svc].get("fetch") or {})}
            if isinstance(fetch.get("done"), int):
                done.add_metric([svc], float(fetch["done"]))
            if isinstance(fetch.get("total"), int):
                size.add_metric([svc], float(fetch["total"]))
        yield done
        yield size
        session = agent.session.value if agent._started else "unreachable"
        if getattr(agent, "_denied", False):
            session = "not authorized"
        yield _enum("dcdeploy_store_session_state", "The agent's store session "
                    "(1 for the current state)", [], SESSION_STATES, [([], session)])
        requests = CounterMetricFamily("dcdeploy_store_requests",
                                       "Store round trips made by this agent",
                                       labels=["kind"])
        counter = agent.store.ops
        requests.add_metric(["read"], float(counter.reads))
        requests.add_metric(["write"], float(counter.writes))
        yield requests


class AgentMetrics:
    """One agent's metrics. The ``on_*`` hooks are cheap and never raise."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_AgentCollector(agent))
        self.switch_seconds = Histogram(
            "dcdeploy_switch_duration_seconds", "Stop, start and health check (with the "
            "healthy hold) of one switch, by outcome (ok, rolled_back, failed)",
            ["service", "outcome"], buckets=SWITCH_BUCKETS, registry=self.registry)
        self.health_failures = Counter(
            "dcdeploy_health_check_failures", "Health checks that did not pass after a start "
            "(switch, rollback or recovery)", ["service"], registry=self.registry)
        self.rollbacks = Counter(
            "dcdeploy_rollbacks", "Switches rolled back to the previous release",
            ["service"], registry=self.registry)
        self._server: Any = None

    def on_switch(self, svc: str, seconds: float, outcome: str) -> None:
        self.switch_seconds.labels(svc, outcome).observe(max(0.0, seconds))

    def on_health_failure(self, svc: str) -> None:
        self.health_failures.labels(svc).inc()

    def on_rollback(self, svc: str) -> None:
        self.rollbacks.labels(svc).inc()

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``listen`` (HOST:PORT) in a daemon thread; returns the
        bound address. Raises :class:`ListenError` or OSError (port taken)."""
        host, port = parse_listen("metrics_listen", listen, DEFAULT_PORT)
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._server = server
        return str(server.server_address[0]), int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _FleetCollector(Collector):
    def __init__(self, latest: Latest) -> None:
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        yield from fleet_metrics(self.latest.get())


class Latest:
    """The last status a web server read (set by its one refresher thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, Any] | None = None

    def set(self, status: dict[str, Any]) -> None:
        with self._lock:
            self._status = status

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            return self._status


DEPLOY_ITEM_STATES = ("waiting", "rolling", "paused", "blocked", "failed")


def fleet_metrics(status: dict[str, Any] | None) -> list[Metric]:
    """Fleet gauges from one ``ops.status`` object (pure: unit-tested on plain dicts)."""
    online = GaugeMetricFamily("dcdeploy_fleet_hosts_online",
                               "Hosts registered as serving, per service", labels=["service"])
    quorum = GaugeMetricFamily("dcdeploy_fleet_quorum_hosts",
                               "The service's quorum: hosts that must stay online",
                               labels=["service"])
    hosts = GaugeMetricFamily("dcdeploy_fleet_hosts", "Hosts that run the service "
                              "(registered in the store)", labels=["service"])
    items = GaugeMetricFamily("dcdeploy_fleet_deploy_items",
                              "Items in the deploy queue, by state", labels=["state"])
    problems = GaugeMetricFamily("dcdeploy_fleet_store_problems",
                                 "Invalid nodes found in the store (not acted on)")
    if status is None:
        return [online, quorum, hosts, items, problems]
    for svc, data in sorted(status.get("services", {}).items()):
        online.add_metric([svc], float(sum(1 for e in data["current"].values()
                                           if e.get("state") == "serving")))
        if data.get("quorum") is not None:
            quorum.add_metric([svc], float(data["quorum"]))
        hosts.add_metric([svc], float(sum(1 for h in status.get("hosts", {}).values()
                                          if svc in h.get("services", {}))))
    counts = {state: 0 for state in DEPLOY_ITEM_STATES}
    for item in status.get("deploy", []):
        counts[item["state"]] = counts.get(item["state"], 0) + 1
    for state, n in sorted(counts.items()):
        items.add_metric([state], float(n))
    problems.add_metric([], float(len(status.get("problems", []))))
    return [online, quorum, hosts, items, problems]


def fleet_registry(latest: Latest) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_FleetCollector(latest))
    return registry


__all__ = ["AgentMetrics", "Latest", "ListenError", "fleet_metrics", "fleet_registry",
           "parse_listen"]
