"""Fuzz the store under running agents (issue 8, "bounded parsing").

One *case* writes a random or mutated value into one node of one kind (a service spec, a
staged release, a ready-queue entry, a presence node, a deploy item, a host entry, a gate,
a peer, a history record, a released marker), waits until every agent has run two full
cycles after the write (its ``status.json`` counts cycles: the second one started after the
write, so it read the value), checks, then puts the node back. Checked per case:

* the agent's pid (from supervisord) is the one it had at the start: no agent crash;
* the agents' ``cycle_errors`` counters (``status.json``) did not move: nothing read from the
  store raised out of a cycle;
* an independent prober saw at least ``quorum`` hosts answering for every service during
  the case;
* ``dcdeploy status``, ``status --json`` (strict JSON) and ``history`` did not raise.

Values written to nodes the agents act on (specs, staged releases, queue entries, presence,
deploy items) are kept to ones the model refuses: a *valid* but different value (``quorum:
0``, another staged URL) is a store writer choosing what runs, which is what signatures are
for, not parsing. A deploy runs all along: a :class:`Fuzzer` stages and queues the next
version whenever the queue is empty. Used by ``tests/test_store_fuzz.py`` (hypothesis draws
the random choices) and ``bench/fuzz_store.py`` (a seeded :class:`random.Random`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import ops
from ..cli import render_status
from .hostenv import host_rpc
from .localdc import Cluster, Prober
from ..model import (CurrentEntry, DeployItem, InvalidData, ServiceSpec, StagedRelease,
                    StagingEntry)
from ..store import BadVersion, NodeExists, NoNode
from ..waiting import wait_for

KINDS = ("services", "staged", "queue_entry", "current", "deploy", "hosts", "gate", "peers",
         "history", "released")
AGENT = "dcdeploy-agent"  # the event listener's name in conf/dcdeploy.conf

# The proofs of concept of issue 8, always among the choices.
POC_VALUES: tuple[bytes, ...] = (
    b"[" * 100_000,
    b'{"version": "2", "sha256": "' + b"0" * 64 + b'", "size": 1, "urls": ["file:///x"], '
    b'"staged_at": '
    + b"9" * 400 + b"}",
    b'{"program": "A", "quorum": 1, "healthy_secs": NaN}',
    b'{"program": "A", "quorum": 1, "healthy_secs": 1e999}',
    b'{"program": "A", "quorum": 1, "health": {"kind": "http", "target": "http://x/", '
    b'"timeout": Infinity}}',
)

EXTREMES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**63, -2**63, 10**18, 0.5, -0.0, 1e308, 1e-320, "", "A\n",
    "1\n", "\ud800", "x" * 300, "\x1b[2J", [], {}, [[[[[[[[[[1]]]]]]]]]], {"a": {"b": {}}},
)
RAW_EXTREMES: tuple[bytes, ...] = (
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 400, b"9" * 5000,
    b"1" + b"0" * 40 + b".5", b'"\\ud800"', b"[" * 9 + b"]" * 9, b"{" * 50,
)
# Names ZooKeeper accepts (no control characters, not "." or "..") that the model must refuse
# or read safely: superscript and Arabic-Indic digits pass str.isdigit() but not int().
WEIRD_NAMES = ("h0-0000009999", "zz-12", "h1-\u00b2", "x", "h0-" + "9" * 300, "-", "item-",
               "item-\u0663", "h 0-0000000001", "...", "h0")


def agent_pids(cluster: Cluster) -> dict[str, int | None]:
    """Each host's agent pid as supervisord reports it (None when it is not RUNNING)."""
    out: dict[str, int | None] = {}
    for name, layout in cluster.hosts.items():
        try:
            info = host_rpc(layout).supervisor.getProcessInfo(AGENT)
            out[name] = info["pid"] if info["statename"] == "RUNNING" else None
        except OSError:
            out[name] = None
    return out


def cycle_errors(cluster: Cluster) -> int:
    """The sum of the agents' ``cycle_errors`` counters (status.json)."""
    return sum(cluster.host_status(h).get("cycle_errors", 0) for h in cluster.hosts)


def wait_cycles(cluster: Cluster, after: int = 2, timeout: float = 120.0) -> None:
    """Block until every agent has started ``after`` cycles more than its status.json shows
    now and written their status: the last of them began after this call did, so it read
    whatever the store held then."""
    def cycles() -> dict[str, int]:
        return {h: cluster.host_status(h).get("cycles", 0) for h in cluster.hosts}

    start = cycles()
    wait_for(lambda: all(n >= start[h] + after for h, n in cycles().items()), timeout,
             f"every agent to run {after} cycles", interval=0.02)


def below_quorum(prober: Prober, samples: list, svc: str,
                 quorum: int) -> list[tuple[float, int, float, list[str]]]:
    """Runs of consecutive samples in which fewer than ``quorum`` hosts answered for ``svc``:
    (start time, samples, seconds, hosts silent in the first sample of the run)."""
    runs: list[tuple[float, int, float, list[str]]] = []
    start = None
    n = 0
    for sample in [*samples, None]:
        low = sample is not None and prober.serving(sample, svc) < quorum
        if low and start is None:
            start, n = sample, 0
        if low:
            n += 1
            last = sample
        elif start is not None:
            silent = sorted(h for (h, s), v in start.versions.items() if s == svc and v is None)
            runs.append((start.t, n, last.t - start.t, silent))
            start = None
    return runs


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, sometimes nested past the model's depth limit."""
    roll = rng.random()
    if depth > 12 or roll < 0.5:
        return rng.choice(EXTREMES) if rng.random() < 0.5 else rng.choice(
            [rng.randint(-10**6, 10**6), rng.random() * 10**rng.randint(0, 300),
             "".join(rng.choice("aZ09.-_+ \n\"\\[]{}") for _ in range(rng.randint(0, 12)))])
    if roll < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["version", "state", "quorum", "x", "", "sha256", "size", "fetch"]):
            random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def mutate(rng: random.Random, original: bytes | None) -> bytes:
    """A random or mutated value; ``original`` is the node's current data, if any."""
    how = rng.randrange(9)
    if how == 0:
        return rng.choice(POC_VALUES)
    if how == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if how == 2:
        return json.dumps(random_json(rng)).encode()
    try:
        data = json.loads(original or b"")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return json.dumps(random_json(rng)).encode()
    keys = list(data) or ["version"]
    key = rng.choice(keys + ["extra"])
    if how == 3:  # one field replaced by a raw extreme literal (NaN, 400 digits, ...)
        body = json.dumps({k: v for k, v in data.items() if k != key})
        literal = rng.choice(RAW_EXTREMES).decode()
        return (body[:-1] + (", " if len(body) > 2 else "") + f'"{key}": {literal}' + "}").encode()
    if how == 4:  # one field replaced by an extreme JSON value
        return json.dumps({**data, key: rng.choice(EXTREMES)}).encode()
    if how == 5:  # one field deleted
        return json.dumps({k: v for k, v in data.items() if k != key}).encode()
    if how == 6:  # truncated
        raw = original or b""
        return raw[:rng.randint(0, max(0, len(raw) - 1))]
    if how == 7:  # bytes flipped
        raw = bytearray(original or b"{}")
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return json.dumps({**data, key: random_json(rng)}).encode()


def _parser(path: str) -> Callable[[bytes], Any] | None:
    """The model parser the agents use for ``path``, or None for nodes they do not act on."""
    parts = path.split("/")
    if parts[0] == "services" and len(parts) == 2:
        return lambda raw: ServiceSpec.parse(parts[1], raw)
    if parts[0] == "staging" and len(parts) == 2:
        return lambda raw: StagedRelease.parse(parts[1], raw)
    if parts[0] == "staging" and len(parts) == 3:
        return lambda raw: StagingEntry.parse(parts[1], parts[2], raw)
    if parts[0] == "current" and len(parts) == 3:
        return lambda raw: CurrentEntry.parse(parts[1], parts[2], raw)
    if parts[0] == "deploy" and len(parts) == 2:
        return lambda raw: DeployItem.parse(parts[1], raw).to_json()
    return None


def acted_on_safely(path: str, value: bytes, original: bytes | None) -> bool:
    """True when writing ``value`` at ``path`` cannot change what the agents do beyond
    refusing it: the model rejects it, or it means the same as ``original``."""
    parse = _parser(path)
    if parse is None:
        return True
    try:
        new = parse(value)
    except Exception:  # noqa: BLE001 - refused (InvalidData; anything else the agents show)
        return True
    if original is None:
        return False
    try:
        return new == parse(original)
    except InvalidData:
        return False


@dataclass
class Tally:
    cases: int = 0
    agent_crashes: int = 0
    cycle_errors: int = 0
    services_below_quorum: int = 0
    cli_errors: int = 0
    deploys_done: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"cases": self.cases, "agent_crashes": self.agent_crashes,
                "cycle_errors": self.cycle_errors,
                "services_below_quorum": self.services_below_quorum,
                "cli_errors": self.cli_errors}


@dataclass
class Write:
    path: str
    created: bool  # we created the node: restore deletes it
    original: bytes | None
    version: int  # the version our write gave the node


class Fuzzer:
    """Drives one :class:`~.localdc.Cluster` whose hosts are running (see module doc)."""

    def __init__(self, cluster: Cluster, quorum: dict[str, int], prober: Prober,
                 case_timeout: float = 120.0) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.quorum = quorum
        self.prober = prober
        self.case_timeout = case_timeout
        self.tally = Tally()
        self.pids = self.agent_pids()
        self.errors = self.cycle_errors()
        self.next_version = 2
        self.deploy_started = time.monotonic()

    # -- observations ------------------------------------------------------------------
    def agent_pids(self) -> dict[str, int | None]:
        return agent_pids(self.cluster)

    def cycle_errors(self) -> int:
        return cycle_errors(self.cluster)

    def wait_cycles(self) -> None:
        wait_cycles(self.cluster, 2, self.case_timeout)

    # -- the deploy that runs all along -----------------------------------------------
    def keep_deploying(self) -> None:
        """Queue the next version of every service when the queue is empty; abort a deploy
        stuck for longer than the case timeout (counted in ``problems``)."""
        queue = self.store.children("deploy")
        if queue:
            if time.monotonic() - self.deploy_started > self.case_timeout:
                self.tally.problems.append(f"deploy stuck, aborted: {ops.status(self.store)}")
                ops.abort(self.store)
            return
        if self.next_version > 2:
            self.tally.deploys_done += 1
        version = str(self.next_version)
        self.next_version += 1
        for svc in self.cluster.services:
            self.cluster.stage(svc, version)
        ops.deploy(self.store, list(self.cluster.services))
        self.deploy_started = time.monotonic()

    # -- one case ---------------------------------------------------------------------
    def targets(self, kind: str) -> list[tuple[str, bool]]:
        """(path, create?) choices for a kind: existing nodes to overwrite, new ones."""
        svcs = list(self.cluster.services)
        hosts = list(self.cluster.hosts)
        if kind == "services":
            return [(f"services/{s}", False) for s in svcs]
        if kind == "staged":
            return [(f"staging/{s}", False) for s in svcs]
        if kind == "gate":
            return [(f"gate/{s}", False) for s in svcs]
        if kind == "released":
            return [(f"released/{s}", False) for s in svcs]
        if kind == "hosts":
            return [(f"hosts/{h}", False) for h in hosts] + \
                [(f"hosts/{n}", True) for n in WEIRD_NAMES if "/" not in n]
        if kind == "peers":
            return [(f"peers/{'ab' * 20}/{n}", True) for n in [*hosts, *WEIRD_NAMES]]
        out = []
        if kind == "queue_entry":
            for s in svcs:
                out += [(f"staging/{s}/{n}", False) for n in self.store.children(f"staging/{s}")]
                out += [(f"staging/{s}/{n}", True) for n in WEIRD_NAMES]
        elif kind == "current":
            for s in svcs:
                out += [(f"current/{s}/{n}", False) for n in self.store.children(f"current/{s}")]
                out += [(f"current/{s}/{n}", True) for n in WEIRD_NAMES if n not in hosts]
        elif kind == "deploy":
            out += [(f"deploy/{n}", False) for n in self.store.children("deploy")]
            out += [("deploy/item-", True)] + [(f"deploy/{n}", True) for n in WEIRD_NAMES]
        elif kind == "history":
            out += [(f"history/{n}", False) for n in self.store.children("history")[-5:]]
            out += [(f"history/{n}", True) for n in WEIRD_NAMES]
        return out

    def write(self, rng: random.Random, kind: str) -> Write | None:
        """Write one value of ``kind``; None when the chosen node changed under us."""
        path, create = rng.choice(self.targets(kind))
        try:
            original, version = (None, -1) if create else self.store.get(path)
        except NoNode:
            return None
        for _ in range(20):
            value = mutate(rng, original if original is not None else self._sample(kind))
            if acted_on_safely(path, value, original):
                break
        else:
            value = POC_VALUES[0]
        try:
            if create:
                path = self.store.create(path, value, sequential=path == "deploy/item-")
                return Write(path, True, None, 0)
            return Write(path, False, original, self.store.set(path, value, version))
        except (NodeExists, NoNode, BadVersion):
            return None

    def _sample(self, kind: str) -> bytes:
        """A valid value of the kind to mutate, for nodes created new."""
        samples = {
            "queue_entry": b'{"version": "2"}',
            "current": b'{"version": "2", "state": "serving", "since": 1, "rack": "r0"}',
            "deploy": b'{"service": "A", "version": "2", "state": "waiting", "reason": null, '
                      b'"host": null, "updated": 1}',
            "hosts": b'{"rack": "r0", "services": ["A"], "last_seen": 1, "fetch": {}}',
            "peers": b'{"address": "127.0.0.1", "port": 6881, "rack": "r0", "complete": false}',
            "history": b'{"service": "A", "version": "2", "state": "done"}',
        }
        return samples.get(kind, b"{}")

    def restore(self, w: Write) -> None:
        try:
            if w.created:
                self.store.delete(w.path)
                parent = w.path.rpartition("/")[0]
                if parent.startswith("peers/"):
                    self.store.delete(parent)
            else:
                self.store.set(w.path, w.original or b"", w.version)
        except (NoNode, BadVersion):
            pass  # an agent rewrote or removed it meanwhile: its value stands

    def check_cli(self) -> None:
        try:
            data = ops.status(self.store)
            json.dumps(data, sort_keys=True, allow_nan=False)
            render_status(data)
            json.dumps(ops.history(self.store, 20), allow_nan=False)
        except Exception as exc:  # noqa: BLE001 - counted: the CLI must not raise
            self.tally.cli_errors += 1
            self.tally.problems.append(f"cli: {type(exc).__name__}: {exc}"[:300])

    def round(self, rng: random.Random, kinds: list[str]) -> None:
        """One case per kind in ``kinds``, written together, processed, checked, restored."""
        self.keep_deploying()
        t0 = time.time()
        writes = [w for w in (self.write(rng, k) for k in kinds) if w is not None]
        try:
            self.wait_cycles()
        except TimeoutError as exc:  # counted below through the agents' counters and pids
            self.tally.problems.append(f"{exc} after {[w.path for w in writes]}")
        try:
            self.check_cli()
        finally:
            for w in writes:
                self.restore(w)
        self.tally.cases += len(writes)
        pids = self.agent_pids()
        crashed = [h for h in pids if pids[h] != self.pids[h]]
        if crashed:
            self.tally.agent_crashes += len(crashed)
            self.tally.problems.append(f"agent pid changed on {crashed}: {self.pids} -> {pids}")
            self.pids = pids
        errors = self.cycle_errors()
        if errors != self.errors:
            self.tally.cycle_errors += errors - self.errors
            self.tally.problems.append(f"cycle errors +{errors - self.errors} after "
                                       f"{[w.path for w in writes]}")
            self.errors = errors
        t1 = time.time()
        samples = [s for s in self.prober.samples if t0 <= s.t <= t1]
        for svc, q in self.quorum.items():
            dips = below_quorum(self.prober, samples, svc, q)
            if dips:
                self.tally.services_below_quorum += 1
                self.tally.problems.append(
                    f"below quorum: {svc} during {[w.path for w in writes]}: "
                    + "; ".join(f"{n} sample(s) over {secs:.2f}s from {t:.2f}, silent: {silent}"
                                for t, n, secs, silent in dips))


PROBE_TIMEOUT = 2.0  # a host that is down refuses at once; a slow answer is still serving


def fuzz_prober(cluster: Cluster, hz: float = 20.0) -> Prober:
    """The independent prober for a fuzz run, started. Its 2 s answer timeout: with 0.2 s,
    on a shared 2-core machine at load 13-22, single samples showed two or three hosts of
    *both* services silent at once (10,000 cases: 3 such cases; 3,000 more: 16), which no
    take-down explains (max_parallel 1); a stopped program refuses connections at once."""
    return Prober(cluster.endpoints(), hz=hz, timeout=PROBE_TIMEOUT).start()


def fuzz_cluster(workdir, store, store_url, hosts: int = 3,
                 poll_interval: float = 0.2) -> tuple[Cluster, dict[str, int]]:
    """Three hosts, A (quorum 2) and B (quorum 2, depends on A), booted on version 1."""
    services = {"A": {"quorum": 2, "max_parallel": 1},
                "B": {"quorum": 2, "max_parallel": 1, "depends_on": ["A"]}}
    cluster = Cluster(workdir, store, store_url, hosts, services, poll_interval=poll_interval)
    cluster.boot({"A": "1", "B": "1"})
    return cluster, {s: spec["quorum"] for s, spec in services.items()}


__all__ = ["Fuzzer", "KINDS", "POC_VALUES", "Tally", "acted_on_safely", "agent_pids",
           "below_quorum", "cycle_errors", "fuzz_cluster", "fuzz_prober", "mutate",
           "random_json",
           "wait_cycles"]

