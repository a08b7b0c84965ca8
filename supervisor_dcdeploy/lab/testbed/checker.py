"""Evaluate docs/design.md §5 (S1-S5, L1-L3) on a recorded history (see :mod:`.history`).

Pure functions of the event list: no I/O, no clock. The checker trusts nothing the agents
say about themselves when an independent observation exists: quorum is checked on what the
prober saw as well as on what the gate records claim; order, containment and integrity on
what hosts were *seen serving*, correlated with the store's items and staged releases.

Strictness: a host counts as down from the first to the last of a run of samples that were
not a 200 (refused, another status, or a timeout: a client that gets no answer is not
served), so a prober that cannot tell is charged to the product, not forgiven. A faulted
host counts as down like any other. The only allowance for injected faults is the one
docs/design.md §6 states: after a crash a host keeps counting as online until its session
expires, and a take-down committed while its presence was still recorded, within the
session timeout of the crash, may overlap its outage (``docs/testbed.md`` lists every
allowance with its size). Every fault must show evidence that it took effect (F), and the
prober must have sampled every endpoint without gaps over the judged window (P).
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

PROPERTIES = ("S1", "S2", "S3", "S4", "S5", "L1", "L2", "L3", "F", "P")
TITLES = {
    "S1": "quorum", "S2": "order", "S3": "integrity", "S4": "containment",
    "S5": "nothing lost", "L1": "convergence", "L2": "unreachable hosts don't block",
    "L3": "self-sufficiency", "F": "faults took effect", "P": "prober coverage",
}
FINISHED = ("done", "aborted")
TERMINAL = ("done", "aborted", "failed")
HALTED = ("failed", "paused", "aborted")
EXCLUDING = {"process", "unobservable"}
# Faults that crash a host's services (or cut every client off it) at a known moment: the
# moment is ``detail["crashed_at"]`` (a list) when the fault recorded it, else the fault's
# start (or, for supervisord_kill, whose heal kills the orphans, its end).
CRASHING = {"host_kill": "start", "link_cut": "start", "reboot_isolated": "start",
            "supervisord_kill": "end"}


@dataclass(frozen=True)
class Params:
    """Tolerances, in seconds. Each one is a bound the design promises, with slack for a
    shared 2-core machine; none is a sampling artefact the checker needs to be correct."""

    # S1: ZooKeeper expires a session up to one tick after its timeout, and the recorder sees
    # the deletion a few milliseconds later; a take-down committed this long after the
    # crashed host's session timeout still counts as decided on its stale presence.
    expiry_slack: float = 1.0
    session_timeout: float = 4.0  # used when the history's topology does not say
    max_gap: float = 0.1  # P: longest stretch of an endpoint's timeline without a sample
    s4_hold: float = 10.0  # S4: the operator acts no sooner than this after a failure
    block_window: float = 20.0  # L2: an item done this soon after only unreachable hosts lag
    catchup: float = 45.0  # L2: a returning host serves again within this
    rollback_window: float = 30.0  # S4: the failed host is back on the previous version
    unhealthy_window: float = 30.0  # S4: nobody keeps serving an unhealthy release longer
    takedown_grace: float = 1.0  # L3: a take-down committed just before a cut may still start
    switch_max: float = 30.0  # L3: longest switch a cut-off host may be in
    boot_max: float = 45.0  # L3: a rebooted, cut-off host serves again within this
    # L3: the reboot fault lifts the cut as soon as its own check sees the host serve; the
    # prober samples on its own clock, so its first sample may come a little after that.
    probe_slack: float = 0.5
    probation: float = 5.0  # L3: a version served this briefly may not be verified yet
    strict_order: bool = True  # S2 as in docs/design.md §5; False lets independent items overlap


@dataclass(frozen=True)
class Result:
    prop: str
    status: str  # held | violated | n/a
    counterexample: str = ""
    count: int = 0
    note: str = ""

    @property
    def held(self) -> bool:
        return self.status != "violated"


# -- the history, indexed once -------------------------------------------------------------

@dataclass
class Fault:
    id: str
    kind: str
    hosts: tuple[str, ...]
    effects: frozenset[str]
    start: float
    end: float = math.inf
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    t: float
    ok: bool | None
    version: str | None
    healthy: bool | None
    dt: float = 0.0  # how long the request took (a timeout: the whole timeout)


@dataclass
class Item:
    node: str
    seq: int
    service: str = ""
    version: str = ""
    states: list[tuple[float, str | None, str]] = field(default_factory=list)  # (t, state, where)

    def at(self, t: float) -> tuple[str | None, str | None]:
        """(state, where) as last recorded at or before ``t``; (None, None) before creation."""
        state: tuple[str | None, str | None] = (None, None)
        for ts, st, where in self.states:
            if ts > t:
                break
            state = (st, where)
        return state

    def finished_at(self, t: float) -> bool:
        state, where = self.at(t)
        return where in ("history", "gone") or state in FINISHED

    def first(self, states: Sequence[str], after: float = -math.inf) -> float | None:
        for ts, st, _ in self.states:
            if ts >= after and st in states:
                return ts
        return None


def _serving(e: dict[str, Any]) -> bool:
    """A recorded ``current/`` value the agents count as online (a serving entry)."""
    data = _json(e.get("data"))
    return bool(data) and data.get("state", "serving") == "serving"


def _json(data: Any) -> dict[str, Any] | None:
    if not isinstance(data, str) or not data:
        return None
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Timeline:
    """The events of one history, sorted by ``t`` and indexed for the checks."""

    def __init__(self, events: Iterable[dict[str, Any]]) -> None:
        self.events = sorted(events, key=lambda e: e["t"])
        self.end = self.events[-1]["t"] if self.events else 0.0
        self.hosts: dict[str, dict[str, Any]] = {}
        self.quorum: dict[str, int] = {}
        self.depends: dict[str, set[str]] = {}
        self.initial: dict[str, str] = {}
        self.present: dict[str, set[str]] = {}  # versions served when recording began
        self.installed: dict[str, set[str]] = {}  # versions on some host's disk by then
        self.probes: dict[tuple[str, str], list[Sample]] = defaultdict(list)
        self.store: list[dict[str, Any]] = []
        self.faults: dict[str, Fault] = {}
        self.ops: list[dict[str, Any]] = []
        self.artifacts: dict[tuple[str, str], list[tuple[float, str, bool]]] = defaultdict(list)
        self.states: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.session_timeout: float | None = None
        self.items: dict[str, Item] = {}
        self._times: dict[tuple[str, str], list[float]] = {}
        for event in self.events:
            getattr(self, "_on_" + event["kind"], lambda e: None)(event)
        self.services = sorted({s for h in self.hosts.values() for s in h.get("services", {})}
                               | set(self.quorum))

    # indexing -----------------------------------------------------------------------------
    def _on_topology(self, e: dict[str, Any]) -> None:
        self.hosts = dict(e.get("hosts", {}))
        for svc, spec in e.get("services", {}).items():
            self.quorum[svc] = int(spec.get("quorum", 0))
            self.depends[svc] = set(spec.get("depends_on", []))
        self.initial = dict(e.get("initial", {}))
        self.present = {svc: set(v) for svc, v in e.get("present", {}).items()}
        self.installed = {svc: set(v) for svc, v in e.get("installed", {}).items()}
        if isinstance(e.get("session_timeout"), (int, float)):
            self.session_timeout = float(e["session_timeout"])

    def _on_probe(self, e: dict[str, Any]) -> None:
        self.probes[(e["service"], e["host"])].append(
            Sample(e["t"], e.get("ok"), e.get("version"), e.get("healthy"),
                   float(e.get("dt") or 0.0)))

    def _on_store(self, e: dict[str, Any]) -> None:
        self.store.append(e)
        parts = e["path"].split("/")
        if parts[0] == "services" and len(parts) == 2:
            spec = _json(e.get("data"))
            if spec and isinstance(spec.get("quorum"), int):
                self.quorum[parts[1]] = spec["quorum"]
                deps = spec.get("depends_on") or []
                if isinstance(deps, list):
                    self.depends[parts[1]] = {d for d in deps if isinstance(d, str)}
        if parts[0] in ("deploy", "history") and len(parts) == 2:
            digits = parts[1].rpartition("-")[2]
            if not digits.isdigit():
                return
            item = self.items.setdefault(parts[1], Item(parts[1], int(digits)))
            data = _json(e.get("data"))
            if e.get("data") is None:
                # a deletion from deploy/ is a move when history/ has (or gets) the item
                if parts[0] == "deploy":
                    item.states.append((e["t"], item.at(e["t"])[0], "gone"))
                return
            if data is None:
                return
            item.service = item.service or str(data.get("service", ""))
            item.version = item.version or str(data.get("version", ""))
            item.states.append((e["t"], data.get("state"), parts[0]))

    def _on_fault(self, e: dict[str, Any]) -> None:
        if e.get("phase") == "start":
            self.faults[e["id"]] = Fault(e["id"], e["fault"], tuple(e.get("hosts", ())),
                                         frozenset(e.get("effects", ())), e["t"],
                                         detail=dict(e.get("detail", {})))
        elif e["id"] in self.faults:
            fault = self.faults[e["id"]]
            fault.end = e["t"]
            fault.detail.update(e.get("detail", {}))

    def _on_op(self, e: dict[str, Any]) -> None:
        self.ops.append(e)

    def _on_artifact(self, e: dict[str, Any]) -> None:
        self.artifacts[(e["service"], e["version"])].append(
            (e["t"], e["sha256"], bool(e.get("broken"))))

    def _on_state(self, e: dict[str, Any]) -> None:
        self.states.append(e)

    def _on_final(self, e: dict[str, Any]) -> None:
        self.final = e

    # queries ------------------------------------------------------------------------------
    def hosts_of(self, svc: str) -> list[str]:
        return sorted(h for h, info in self.hosts.items() if svc in info.get("services", {}))

    def first_ok_after(self, host: str, t: float) -> float:
        best = math.inf
        for (svc, h), samples in self.probes.items():
            if h == host:
                for s in samples:
                    if s.t >= t and s.ok:
                        best = min(best, s.t)
                        break
        return best

    def exclusions(self, host: str, effects: set[str] = EXCLUDING) -> list[tuple[float, float]]:
        """Windows in which ``host`` is excluded from the prober's counts: from a fault's
        start until the host is first seen serving after the fault's end."""
        out = []
        for f in self.faults.values():
            if host in f.hosts and f.effects & effects:
                out.append((f.start, self.first_ok_after(host, f.end)))
        return out

    def latest(self, svc: str, host: str, t: float) -> Sample | None:
        """The last sample of (svc, host) at or before ``t`` (binary search)."""
        samples = self.probes.get((svc, host))
        if not samples:
            return None
        times = self._times.get((svc, host))
        if times is None or len(times) != len(samples):
            times = self._times[(svc, host)] = [x.t for x in samples]
        i = bisect.bisect_right(times, t)
        return samples[i - 1] if i else None

    def down_runs(self, svc: str, host: str) -> list[tuple[float, float]]:
        """Intervals [first start, last end] of consecutive samples that were not a 200:
        refused, another status, or a timeout (a client that gets no answer is not
        served; the timed-out request's whole duration counts)."""
        runs: list[tuple[float, float]] = []
        start: float | None = None
        last = 0.0
        for s in self.probes.get((svc, host), ()):
            if s.ok is not True:
                start = s.t if start is None else start
                last = s.t + s.dt
            elif start is not None:
                runs.append((start, last))
                start = None
        if start is not None:
            runs.append((start, last))
        return runs

    def crashes(self, host: str, svc: str) -> list[tuple[float, float, "Fault"]]:
        """(crash moment, first seen serving ``svc`` after the fault, fault) for every fault
        that crashed ``host`` or cut every client off it (:data:`CRASHING`)."""
        out = []
        for f in self.faults.values():
            if host not in f.hosts:
                continue
            moments = f.detail.get("crashed_at")
            if isinstance(moments, list) and moments:
                at = [float(m) for m in moments if isinstance(m, (int, float))]
            elif f.kind in CRASHING:
                at = [f.start if CRASHING[f.kind] == "start" else f.end]
            else:
                continue
            for c in at:
                after = max(c, f.end)
                back = next((s.t for s in self.probes.get((svc, host), ())
                             if s.t >= after and s.ok), math.inf)
                out.append((c, back, f))
        return out

    def store_index(self) -> dict[int, int]:
        """id(store event) -> its position in record order."""
        if not hasattr(self, "_store_index"):
            self._store_index = {id(e): i for i, e in enumerate(self.store)}
        return self._store_index

    def presence_at(self, svc: str, host: str, gate: dict[str, Any]) -> bool:
        """Was ``current/<svc>/<host>`` present, holding a serving entry, when ``gate`` (a
        recorded gate value) was committed? Decided on the recorded view in record order
        (the recorder's one session gets notifications in zxid order), refined by zxid: an
        entry recorded later but written before the gate's ``mzxid`` was there; the
        deletion of the gate host's own entry by the same transaction is not "before"."""
        path = f"current/{svc}/{host}"
        i = self.store_index()[id(gate)]
        zxid = gate.get("mzxid")
        own = f"current/{svc}/{(_json(gate.get('data')) or {}).get('host')}"
        j = i
        while j > 0:  # the records of the gate's own transaction just before it
            prev = self.store[j - 1]
            if prev["path"] == gate["path"] or prev["path"].startswith("deploy/") or \
                    (prev["path"] == own and prev.get("data") is None):
                j -= 1
            else:
                break
        state = False
        for e in self.store[:j]:
            if e["path"] == path:
                state = _serving(e)
        if not state and isinstance(zxid, int):
            for e in self.store[i + 1:]:
                if e["path"] == path:
                    mz = e.get("mzxid")
                    state = _serving(e) and isinstance(mz, int) and mz < zxid
                    break
        return state

    def present_others(self, svc: str, gate: dict[str, Any], host: str) -> list[str]:
        """Hosts other than ``host`` with a serving entry in ``current/<svc>`` at ``gate``."""
        names = {e["path"].split("/")[2] for e in self.store
                 if e["path"].startswith(f"current/{svc}/") and e["path"].count("/") == 2}
        return sorted(h for h in names if h != host and self.presence_at(svc, h, gate))

    def takedown_commit(self, svc: str, host: str, run_start: float, switch_max: float
                        ) -> dict[str, Any] | None:
        """The recorded gate value with which ``host`` took ``svc`` down for a down-run
        starting at ``run_start``: the last one naming it, recorded before the run began
        (or within a second after: the recorder and the prober run on their own), with no
        other down-run of the host starting between the two (else it belongs to an earlier
        switch). The host may well be seen serving between the commit and the run: it
        stops its program only after the commit (chaos seed 1501, trial 4: 0.14 s of
        answers between h4's commit and its stop made the checker miss the take-down).

        Nor when the host was back in ``current/<svc>`` (a serving entry written after the
        commit) before the run began: that take-down was over, every later gate counts the
        host as online again, so a later outage is not the commit's. The check above cannot
        see that when the switch's own run began a little before the recorder saw the
        commit (chaos seed 1705, trial 4: h4's switch run began 33 ms before its gate was
        recorded, so that gate was lent to a timeout under ``netem`` 11 s later, after h4
        had switched and registered again, and the netem allowance was refused)."""
        best = None
        for e, gsvc, data in self.gates():
            if gsvc != svc or not data or data.get("host") != host:
                continue
            if run_start - switch_max <= e["t"] <= run_start + 1.0:
                best = e
        if best is not None and any(best["t"] < start < run_start
                                    for start, _ in self.down_runs(svc, host)):
            return None
        if best is not None and self.rejoined(svc, host, best, run_start):
            return None
        return best

    def rejoined(self, svc: str, host: str, gate: dict[str, Any], before: float) -> bool:
        """Was a serving ``current/<svc>/<host>`` entry written after ``gate`` (a recorded
        gate value: later in record order, and by zxid when both are known) recorded
        before ``before``? That is the host registering again after the take-down."""
        path = f"current/{svc}/{host}"
        zxid = gate.get("mzxid")
        for e in self.store[self.store_index()[id(gate)] + 1:]:
            if e["t"] >= before:
                break
            if e["path"] != path or not _serving(e):
                continue
            mz = e.get("mzxid")
            if isinstance(zxid, int) and isinstance(mz, int) and mz < zxid:
                continue  # written before the commit, recorded late: not a return
            return True
        return False

    def staged_sha(self, svc: str, version: str, t: float) -> str | None:
        sha = None
        for e in self.store:
            if e["t"] > t:
                break
            if e["path"] == f"staging/{svc}":
                data = _json(e.get("data"))
                if data and data.get("version") == version and isinstance(data.get("sha256"), str):
                    sha = data["sha256"].lower()
        return sha

    def true_sha(self, svc: str, version: str, t: float) -> str | None:
        sha = None
        for ts, digest, _ in self.artifacts.get((svc, version), ()):
            if ts <= t:
                sha = digest
        return sha

    def gates(self) -> list[tuple[dict[str, Any], str, dict[str, Any] | None]]:
        """(event, service, parsed data) for every recorded gate node value, except the
        value a gate already held when recording began (recorded before the first operator
        action: a commit of an earlier run, judged there)."""
        if hasattr(self, "_gates"):
            return self._gates
        first_op = self.ops[0]["t"] if self.ops else -math.inf
        out = []
        seen: set[str] = set()
        for e in self.store:
            parts = e["path"].split("/")
            if parts[0] == "gate" and len(parts) == 2 and e.get("data") is not None:
                initial = e["path"] not in seen and e["t"] < first_op
                seen.add(e["path"])
                if not initial:
                    out.append((e, parts[1], _json(e.get("data"))))
        self._gates = out
        return out

    def present_before(self, path: str, t: float) -> bool:
        """Did the recorded view hold ``path`` just before ``t``? (True when never seen:
        the conservative answer for a quorum check.)"""
        present = True
        for e in self.store:
            if e["t"] >= t:
                break
            if e["path"] == path:
                present = e.get("data") is not None
        return present

    def registered(self, svc: str, host: str, t: float) -> bool:
        """Did the recorded view hold a serving ``current/<svc>/<host>`` entry at ``t``?
        (False when never recorded: the recorder sees every entry present when it starts.)"""
        state = False
        for e in self.store:
            if e["t"] > t:
                break
            if e["path"] == f"current/{svc}/{host}":
                state = _serving(e)
        return state

    def garbage_on(self, path: str, t: float) -> bool:
        return any("garbage" in f.effects and f.detail.get("path") == path
                   and f.start <= t <= f.end + 1.0 for f in self.faults.values())

    def resolving_op(self, t: float, svc: str) -> float:
        """Time of the first resume/abort for ``svc`` (or for every service) after ``t``."""
        for op in self.ops:
            if op["t"] >= t and op.get("action") in ("resume", "abort") and \
                    op.get("service") in (None, svc):
                return op["t"]
        return math.inf


def _subtract(interval: tuple[float, float],
              windows: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    pieces = [interval]
    for ws, we in windows:
        nxt = []
        for a, b in pieces:
            if we < a or ws > b:
                nxt.append((a, b))
                continue
            if a < ws:
                nxt.append((a, ws))
            if we < b:
                nxt.append((we, b))
        pieces = nxt
    return pieces


def _fmt(t: float, tl: Timeline) -> str:
    t0 = tl.events[0]["t"] if tl.events else 0.0
    return f"t={t - t0:.2f}s"


# -- the properties ------------------------------------------------------------------------

Found = list[tuple[float, str]]  # (time, detail)


def check_s1(tl: Timeline, p: Params) -> tuple[Found, str]:
    found: Found = []
    gaps = 0
    last_version: dict[str, int] = {}
    for e, svc, data in tl.gates():
        zv = e.get("zversion")
        if isinstance(zv, int):
            if svc in last_version and zv > last_version[svc] + 1:
                gaps += zv - last_version[svc] - 1
            last_version[svc] = max(zv, last_version.get(svc, -1))
        if data is None:
            continue  # an empty gate (created, never bumped) or garbage
        online, quorum = data.get("online"), data.get("quorum")
        if not isinstance(online, int) or not isinstance(quorum, int):
            if not tl.garbage_on(e["path"], e["t"]):
                found.append((e["t"], f"gate/{svc} v{zv}: take-down record without online/"
                                      f"quorum: {e.get('data')!r}"))
            continue
        # A host that is not in current/ (still recovering) is not counted in ``online``
        # and takes nothing away from it: the agent's record says so, or the recorded view.
        was_online = data.get("was_online")
        if not isinstance(was_online, bool):
            was_online = tl.present_before(f"current/{svc}/{data.get('host')}", e["t"])
        if online - (1 if was_online else 0) < quorum:
            found.append((e["t"], f"gate/{svc} v{zv}: {data.get('host')} went down with "
                                  f"online={online} quorum={quorum}"))
        spec_q = tl.quorum.get(svc)
        if spec_q is not None and quorum < spec_q:
            found.append((e["t"], f"gate/{svc} v{zv}: {data.get('host')} used quorum={quorum}"
                                  f" but the service's quorum is {spec_q}"))
        # Not trusting the record: recount from the recorded current/ view at the commit.
        host = str(data.get("host"))
        need = max(quorum, spec_q or 0)
        if tl.presence_at(svc, host, e):
            others = tl.present_others(svc, e, host)
            if len(others) < need:
                found.append((e["t"], f"gate/{svc} v{zv}: {host} went down while the recorded "
                                      f"view had {len(others)} other host(s) online "
                                      f"({', '.join(others) or 'none'}), quorum {need}"))
    session = tl.session_timeout if tl.session_timeout is not None else p.session_timeout
    for svc in tl.services:
        hosts = tl.hosts_of(svc)
        allowed = len(hosts) - tl.quorum.get(svc, 0)
        pieces = [(a, b, h) for h in hosts for a, b in tl.down_runs(svc, h)]
        crashes = {h: tl.crashes(h, svc) for h in hosts}
        for a, _, _ in sorted(pieces):
            down = {h: (x, y) for x, y, h in pieces if x <= a <= y}
            if len(down) <= allowed:
                continue
            slow = _slow_excuse(tl, svc, a, down, crashes, allowed, p) | \
                _lossy_excuse(tl, svc, down, p)
            excused = slow | {h for h in down if _stale_excuse(
                tl, svc, h, a, {g: r for g, r in down.items() if g not in slow}, crashes,
                session, p)}
            if len(down) - len(excused) > allowed:
                names = ", ".join(sorted(down))
                found.append((a, f"{svc}: prober saw {len(down)} of {len(hosts)} hosts down "
                                 f"({names}) at once, quorum {tl.quorum.get(svc)}"
                                 + (f"; excused {', '.join(sorted(excused))}"
                                    if excused else "")))
                break
    note = f"{gaps} gate bump(s) not observed" if gaps else ""
    return found, note


def _slow_excuse(tl: Timeline, svc: str, t: float, down: dict[str, tuple[float, float]],
                 crashes: dict[str, list[tuple[float, float, Fault]]], allowed: int,
                 p: Params) -> set[str]:
    """Hosts down at ``t`` only by timeouts, when injected crashes alone already take
    ``allowed`` (= N - quorum) hosts down at ``t``: the faults used the whole budget, no
    take-down is involved (no gate record), and the service was never seen stopped (no
    refusal in the run): a slow answer on a loaded machine, not something the protocol
    did. Any refusal, or a gate record, and the host counts."""
    crashed = {h for h in down if any(c <= t <= back for c, back, _ in crashes.get(h, ()))}
    if len(crashed) < allowed:
        return set()
    out = set()
    for g, (start, end) in down.items():
        if g in crashed or tl.takedown_commit(svc, g, start, p.switch_max) is not None:
            continue
        run = [s for s in tl.probes.get((svc, g), ()) if start <= s.t <= end]
        if run and all(s.ok is None for s in run):
            out.add(g)
    return out


def _lossy_excuse(tl: Timeline, svc: str, down: dict[str, tuple[float, float]],
                  p: Params) -> set[str]:
    """Hosts down only by timeouts, every one of them sent while an injected network fault
    (``netem``: delay and loss) was on that host: a request whose SYN the fault dropped gets
    no answer within the prober's timeout (TCP resends it after 1 s). The service was not
    stopped (no refusal) and nothing took it down (no gate record); any refusal or gate
    record and the host counts (chaos seed 1403, trial 0: 10 % loss on h4 while h3 switched
    with h2 correctly counted as down after a kill)."""
    out = set()
    for g, (start, end) in down.items():
        faults = [f for f in tl.faults.values() if g in f.hosts and "network" in f.effects]
        run = [s for s in tl.probes.get((svc, g), ()) if start <= s.t <= end]
        if not faults or not run or any(s.ok is not None for s in run):
            continue
        if tl.takedown_commit(svc, g, start, p.switch_max) is not None:
            continue
        if all(any(f.start <= s.t <= f.end for f in faults) for s in run):
            out.add(g)
    return out


def _stale_excuse(tl: Timeline, svc: str, host: str, t: float,
                  down: dict[str, tuple[float, float]],
                  crashes: dict[str, list[tuple[float, float, Fault]]], session: float,
                  p: Params) -> bool:
    """May ``host``, down at ``t`` because of an injected crash, be left out of the count?

    docs/design.md §6: the gate cannot know of a crash that comes after its commit, and it
    counts a crashed host as online until its session expires. So ``host`` is excused iff
    it is down because of a crash at ``c`` (from ``c`` until it serves ``svc`` again) and
    every other host down at ``t`` either went down through the gate before ``c``, or within
    the session timeout (plus :attr:`Params.expiry_slack`) after it while ``host``'s entry
    was still in the recorded ``current/`` view, or is itself down because of an injected
    crash (which the gate counted as down once its entry was gone). A host down without a
    gate record and without a crash (another failure, a timeout, a rogue stop) excuses
    nothing."""
    def crashed(h: str) -> list[float]:
        return [c for c, back, _ in crashes.get(h, ()) if c <= t <= back]

    for c in crashed(host):
        ok = True
        for g, (start, _) in down.items():
            if g == host:
                continue
            commit = tl.takedown_commit(svc, g, start, p.switch_max)
            if commit is None:
                if crashed(g):
                    continue  # an injected failure of its own, not a take-down
                ok = False
                break
            if commit["t"] < c:
                continue
            if commit["t"] > c + session + p.expiry_slack or \
                    not tl.presence_at(svc, host, commit):
                ok = False
                break
        if ok:
            return True
    return False


def _before_items(tl: Timeline, item: Item, p: Params) -> list[Item]:
    out = []
    for other in tl.items.values():
        if other.seq >= item.seq or not other.states:
            continue
        if not p.strict_order and other.service != item.service and \
                other.service not in _closure(tl, item.service):
            continue
        out.append(other)
    return out


def _closure(tl: Timeline, svc: str) -> set[str]:
    seen: set[str] = set()
    todo = list(tl.depends.get(svc, ()))
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo += tl.depends.get(dep, ())
    return seen


def _item_for(tl: Timeline, svc: str, version: str, t: float) -> Item | None:
    best = None
    for item in tl.items.values():
        if item.service == svc and item.version == version and item.states and \
                item.states[0][0] <= t + 1.0:
            best = item if best is None or item.seq > best.seq else best
    return best


def _finished_before(tl: Timeline, item: Item, gate: dict[str, Any]) -> bool:
    """Was ``item`` finished when ``gate`` was committed? By zxid when both carry one (the
    item's move to ``history/`` and the gate are transactions of one ensemble: their zxids
    order them exactly), else by the recorder's clock; no slack either way."""
    zxid = gate.get("mzxid")
    if isinstance(zxid, int):
        for e in tl.store:
            if e["path"] == f"history/{item.node}" and isinstance(e.get("mzxid"), int):
                return e["mzxid"] < zxid
    return item.finished_at(gate["t"])


def check_s2(tl: Timeline, p: Params) -> tuple[Found, str]:
    found: Found = []
    for e, svc, data in tl.gates():
        if not data or not data.get("host"):
            continue
        item = tl.items.get(str(data.get("item"))) or \
            _item_for(tl, svc, str(data.get("version")), e["t"])
        if item is None:
            continue
        for other in _before_items(tl, item, p):
            if other.states[0][0] <= e["t"] and not _finished_before(tl, other, e):
                found.append((e["t"], f"{data['host']} took {svc} down for {item.node} "
                                      f"while earlier {other.node} ({other.service} "
                                      f"{other.version}) was {other.at(e['t'])[0]}"))
    for (svc, host), samples in tl.probes.items():
        prev = None
        for s in samples:
            if not s.ok or s.version is None:
                continue
            if prev is not None and s.version != prev:
                item = _item_for(tl, svc, s.version, s.t)
                if item is not None:
                    for other in _before_items(tl, item, p):
                        if other.states[0][0] <= s.t and not other.finished_at(s.t):
                            found.append((s.t, f"{host} started {svc} {s.version} "
                                               f"({item.node}) while earlier {other.node} "
                                               f"({other.service}) was {other.at(s.t)[0]}"))
            prev = s.version
    return found, ""


def check_s3(tl: Timeline, p: Params) -> tuple[Found, str]:
    found: Found = []
    reported: set[tuple[str, str, str]] = set()
    for (svc, host), samples in tl.probes.items():
        for s in samples:
            if not s.ok or s.version is None or (svc, host, s.version) in reported:
                continue
            staged = tl.staged_sha(svc, s.version, s.t)
            if staged is None:
                if s.version != tl.initial.get(svc, s.version) and \
                        s.version not in tl.present.get(svc, ()) and \
                        s.version not in tl.installed.get(svc, ()):
                    reported.add((svc, host, s.version))
                    found.append((s.t, f"{host} serves {svc} {s.version}, which was never "
                                       "staged"))
                continue
            true = tl.true_sha(svc, s.version, s.t)
            if true is not None and true != staged:
                reported.add((svc, host, s.version))
                found.append((s.t, f"{host} serves {svc} {s.version} whose bytes have sha256 "
                                   f"{true[:12]}.. but {staged[:12]}.. was staged"))
    for e in tl.states:
        data = e.get("data") if e.get("ok") else None
        for svc, st in (data or {}).get("services", {}).items():
            for version, sha in (st.get("installed") or {}).items():
                staged = tl.staged_sha(svc, version, e["t"])
                if staged and isinstance(sha, str) and sha.lower() != staged:
                    found.append((e["t"], f"{e['host']} installed {svc} {version} with sha256 "
                                          f"{sha[:12]}.. but {staged[:12]}.. was staged"))
    return found, ""


def _failures(tl: Timeline, item: Item) -> list[tuple[float, dict[str, Any]]]:
    """(time, store record) of every transition of ``item`` into ``failed`` (a resumed
    item can fail again)."""
    out = []
    was_failed = False
    for e in tl.store:
        if e["path"] not in (f"deploy/{item.node}", f"history/{item.node}"):
            continue
        data = _json(e.get("data"))
        if data is None:
            continue
        failed = data.get("state") == "failed"
        if failed and not was_failed:
            out.append((e["t"], e))
        was_failed = failed
    return out


def check_s4(tl: Timeline, p: Params) -> tuple[Found, str]:
    found: Found = []
    for item in tl.items.values():
        for t_f, mark in _failures(tl, item):
            _check_failure(tl, p, item, t_f, mark, found)
    _check_broken(tl, p, found)
    return found, ""


def _before_mark(e: dict[str, Any], mark: dict[str, Any]) -> bool:
    """Was store record ``e`` committed before the failure ``mark``? By zxid when both have
    one, else by the recorder's clock; no slack."""
    if isinstance(e.get("mzxid"), int) and isinstance(mark.get("mzxid"), int):
        return e["mzxid"] < mark["mzxid"]
    return e["t"] <= mark["t"]


def _check_failure(tl: Timeline, p: Params, item: Item, t_f: float, mark: dict[str, Any],
                   found: Found) -> None:
    svc, version = item.service, item.version
    t_op = tl.resolving_op(t_f, svc)
    failed_host = (_json(mark.get("data")) or {}).get("host")
    if t_op - t_f < p.s4_hold:
        found.append((t_op, f"the operator acted {t_op - t_f:.1f}s after {item.node} failed: "
                            f"containment is judged over a hold of {p.s4_hold:g}s"))
    allowed = {failed_host}
    for e, gsvc, data in tl.gates():
        if gsvc != svc or not data or e["t"] >= t_op:
            continue
        if _before_mark(e, mark):
            if e["t"] >= t_f - p.switch_max and (data.get("item") == item.node or
                                                 data.get("version") == version):
                allowed.add(data.get("host"))
        else:
            found.append((e["t"], f"{data.get('host')} took {svc} down after {item.node} "
                                  f"failed on {failed_host}, before any operator action"))
    for (s_svc, host), samples in tl.probes.items():
        if s_svc != svc:
            continue
        if any(s.ok and s.version == version and s.t < t_f for s in samples):
            allowed.add(host)
        if host in allowed:
            continue
        for s in samples:
            if t_f < s.t < t_op and s.ok and s.version == version:
                found.append((s.t, f"{host} started {svc} {version} after {item.node} "
                                   f"failed on {failed_host}"))
                break
    if failed_host and (svc, failed_host) in tl.probes:
        samples = tl.probes[(svc, failed_host)]
        before = [s for s in samples if s.ok and s.version and s.version != version
                  and s.t < t_f]
        # Judged at the end of the rollback window, or just before an operator acted
        # (a resume lets the failed host take the version again: S4 ends there).
        horizon = min(t_f + p.rollback_window, tl.end, t_op)
        excluded = any(a <= horizon <= b for a, b in tl.exclusions(failed_host))
        due = horizon >= t_f + p.rollback_window or t_op < t_f + p.rollback_window
        if before and not excluded and due and horizon > t_f:
            after = [s for s in samples if s.ok and t_f <= s.t <= horizon]
            prev = before[-1].version
            if not after or after[-1].version != prev:
                now = after[-1].version if after else "nothing"
                found.append((horizon, f"{failed_host} serves {now} "
                                       f"{horizon - t_f:.1f}s after {item.node} failed "
                                       f"(no operator action yet), not the previous {prev}"))


def _check_broken(tl: Timeline, p: Params, found: Found) -> None:
    for (svc, version), records in tl.artifacts.items():
        if not any(broken for _, _, broken in records):
            continue
        for item in tl.items.values():
            if item.service == svc and item.version == version:
                t_done = item.first(("done",))
                if t_done is not None:
                    found.append((t_done, f"{item.node}: broken {svc} {version} marked done"))
    for (svc, host), samples in tl.probes.items():
        start = None
        for s in samples:
            if s.healthy is False and s.ok:
                start = s.t if start is None else start
                if s.t - start > p.unhealthy_window:
                    found.append((s.t, f"{host} kept serving unhealthy {svc} {s.version} for "
                                       f"more than {p.unhealthy_window:g}s"))
                    break
            elif s.healthy is True or s.ok is False:
                start = None


def check_s5(tl: Timeline, p: Params) -> tuple[Found, str]:
    found: Found = []
    for e in tl.states:
        if not e.get("ok"):
            found.append((e["t"], f"{e['host']}: local state unreadable: {e.get('error')}"))
            continue
        services = (e.get("data") or {}).get("services", {})
        for svc, st in services.items():
            active = st.get("active")
            installed = st.get("installed") or {}
            if active is not None and installed and active not in installed:
                found.append((e["t"], f"{e['host']}: state says {svc} active={active} but "
                                      f"installed={sorted(installed)}"))
            fault = tl.faults.get(str(e.get("fault")))
            if fault is not None and active is not None:
                seen = [s.version for s in tl.probes.get((svc, e["host"]), ())
                        if s.ok and s.t <= fault.start]
                targets = {i.version for i in tl.items.values() if i.service == svc
                           and i.states and i.states[0][0] <= fault.start}
                if seen and active not in targets | {seen[-1]}:
                    found.append((e["t"], f"{e['host']}: after {fault.kind} the state says "
                                          f"{svc} active={active}, but it served {seen[-1]}"))
    for item in tl.items.values():
        wheres = [w for _, _, w in item.states]
        if "gone" in wheres and "history" not in wheres:
            found.append((item.states[-1][0], f"{item.node} ({item.service} {item.version}) "
                                              "left the deploy queue without a history record"))
        for ts, st, where in item.states:
            if where == "history" and st not in TERMINAL:
                found.append((ts, f"history/{item.node} has non-final state {st!r}"))
                break
    return found, ""


def _target(tl: Timeline, svc: str, t: float) -> str | None:
    done = [i for i in tl.items.values() if i.service == svc and i.first(("done",)) is not None
            and i.first(("done",)) <= t]  # type: ignore[operator]
    if done:
        return max(done, key=lambda i: i.seq).version
    return tl.initial.get(svc)


def check_l1(tl: Timeline, p: Params) -> tuple[Found, str] | None:
    if not tl.final or not tl.final.get("settled"):
        return None
    found: Found = []
    t = tl.final["t"]
    for item in tl.items.values():
        state, where = item.at(t)
        if where == "deploy":
            found.append((t, f"deploy queue not empty at the end: {item.node} "
                             f"({item.service} {item.version}) is {state}"))
    for svc in tl.services:
        target = _target(tl, svc, t)
        for host in tl.hosts_of(svc):
            last = tl.latest(svc, host, t)
            if last is None or not last.ok:
                found.append((t, f"{host} not serving {svc} at the end"))
            elif target is not None and last.version != target:
                found.append((t, f"{host} serves {svc} {last.version} at the end, target "
                                 f"{target}"))
            elif not tl.registered(svc, host, t):
                # Serving, but outside the protocol: no gate counts it and it takes no part
                # in the next deploy (its agent or supervisord gone, or no session).
                found.append((t, f"{host} serves {svc} at the end without a serving entry "
                                 f"in current/{svc}"))
    return found, ""


def check_l2(tl: Timeline, p: Params) -> tuple[Found, str] | None:
    unreachable = EXCLUDING | {"store_cut"}
    host_faults = [f for f in tl.faults.values() if f.effects & unreachable and f.hosts]
    if not host_faults:
        return None
    found: Found = []
    judged = 0
    for item in tl.items.values():
        if not item.states or not item.service:
            continue
        hosts = tl.hosts_of(item.service)
        times = sorted({s.t for h in hosts for s in tl.probes.get((item.service, h), ())
                        if s.t >= item.states[0][0]})
        for t in times:
            state, where = item.at(t)
            if where != "deploy" or state in HALTED:
                continue
            lagging = [f for f in host_faults if f.start <= t and
                       f.end >= t + p.block_window and set(f.hosts) & set(hosts)]
            if not lagging:
                continue
            out = {h for f in lagging for h in f.hosts}
            rest = [h for h in hosts if h not in out]
            if not rest or any((s := tl.latest(item.service, h, t)) is None or not s.ok
                               or s.version != item.version for h in rest):
                continue
            horizon = t + p.block_window
            if horizon > tl.end:
                break
            judged += 1
            if not item.finished_at(horizon) and item.at(horizon)[0] not in HALTED:
                found.append((horizon, f"{item.node} ({item.service}) not done "
                                       f"{p.block_window:g}s after every reachable host ran "
                                       f"{item.version}; unreachable: {', '.join(sorted(out))}"))
            break
    for f in host_faults:
        # A host that came back while cut off from the store cannot know the most popular
        # version: it starts its last known one (L3) and catches up by rolling later (L1).
        if f.end == math.inf or "store_cut" in f.effects:
            continue
        for host in f.hosts:
            for svc in tl.hosts.get(host, {}).get("services", {}):
                samples = tl.probes.get((svc, host), [])
                restarted = any(s.ok is False and f.start <= s.t for s in samples
                                if s.t <= f.end + p.catchup)
                if not restarted:
                    continue
                back = next((s for s in samples if s.ok and s.t >= f.end), None)
                if back is not None and any(
                        g is not f and host in g.hosts and f.end <= g.start <= back.t
                        for g in host_faults):
                    continue  # a later fault on the host came first: judged on its own
                if back is None or back.t > f.end + p.catchup:
                    if f.end + p.catchup <= tl.end:
                        found.append((f.end + p.catchup, f"{host} not serving {svc} "
                                                         f"{p.catchup:g}s after {f.kind} ended"))
                    continue
                others: Counter[str] = Counter()
                for h in tl.hosts_of(svc):
                    s = tl.latest(svc, h, back.t)
                    if h != host and s is not None and s.ok and s.version:
                        others[s.version] += 1
                allowed: set[str | None] = \
                    {v for v, n in others.items() if n == max(others.values())}
                allowed |= {i.version for i in tl.items.values() if i.service == svc
                            and i.at(back.t)[1] == "deploy"}
                allowed |= {_target(tl, svc, back.t)}
                first_restart = next((s for s in samples if s.ok is False and s.t >= f.start),
                                     None)
                was = tl.latest(svc, host, f.start)
                if first_restart is not None and back.version not in allowed and \
                        not (was and was.version == back.version and first_restart.t > back.t):
                    found.append((back.t, f"{host} came back on {svc} {back.version} after "
                                          f"{f.kind}; others served {dict(others)}"))
    return found, f"an item judged with a host unreachable {judged} time(s)" if judged else \
        "no item had every reachable host done while one stayed unreachable"


def check_l3(tl: Timeline, p: Params) -> tuple[Found, str] | None:
    cuts = [f for f in tl.faults.values() if "store_cut" in f.effects and f.hosts]
    if not cuts:
        return None
    found: Found = []
    for f in cuts:
        for host in f.hosts:
            windows = [w for w in tl.exclusions(host) if not (w[0] == f.start and "reboot"
                                                               in f.effects)]
            for svc in tl.hosts.get(host, {}).get("services", {}):
                if "reboot" in f.effects:
                    boot = float(f.detail.get("restarted_at", f.start))
                    before = [s for s in tl.probes.get((svc, host), ())
                              if s.ok and s.t < f.start]
                    back = next((s for s in tl.probes.get((svc, host), ())
                                 if s.ok and s.t >= boot), None)
                    if back is None or back.t > min(f.end + p.probe_slack, boot + p.boot_max):
                        if min(f.end, boot + p.boot_max) <= tl.end:
                            found.append((min(f.end, boot + p.boot_max),
                                          f"{host} did not start {svc} after a reboot with "
                                          "the store unreachable"))
                        continue
                    taken = {d.get("version") for e, g, d in tl.gates()
                             if g == svc and d and d.get("host") == host and e["t"] < f.start}
                    allowed = {before[-1].version} | taken if before else set()
                    if before:
                        # "Last known" is the last *verified* version: a switch still in its
                        # healthy hold when the host went down is not, and the agent then
                        # starts the version before it (docs/protocol.md, local files).
                        last = before[-1].version
                        run_start = before[-1].t
                        for s in reversed(before):
                            if s.version != last:
                                break
                            run_start = s.t
                        # The hold runs only while the host's agent does: an agent stopped
                        # or killed during the run starts its hold again when it is back
                        # (chaos seed 1614 trial 6: agent_stop mid-switch for 6.6 s, then
                        # a reboot 1.75 s after it resumed, with 8 served for 8.2 s).
                        held_from = max([run_start] + [
                            a.end for a in tl.faults.values()
                            if a.kind in ("agent_stop", "agent_kill") and host in a.hosts
                            and a.start < f.start and a.end > run_start])
                        if f.start - held_from < p.probation:
                            earlier = [s.version for s in before if s.t < run_start]
                            if earlier:
                                allowed.add(earlier[-1])
                    if before and back.version not in allowed:
                        found.append((back.t, f"{host} rebooted without the store started "
                                              f"{svc} {back.version}, last known "
                                              f"{before[-1].version}"))
                    continue
                # Judged outside the windows in which the host could not be seen or was
                # crashed: a run whose first sample was already in flight when the link went
                # down starts a few ms before the fault's record and is the fault's, not a
                # 30 s outage of its own (CI chaos seed 13, trial 5).
                runs = [piece for run in tl.down_runs(svc, host)
                        for piece in _subtract(run, windows)]
                for a, b in runs:
                    if f.start + p.takedown_grace < a <= f.end:
                        found.append((a, f"{host} stopped serving {svc} while cut off from "
                                         f"the store ({f.kind})"))
                        break
                    if a <= f.end and b >= f.start and b - a > p.switch_max:
                        found.append((b, f"{host} down {b - a:.1f}s on {svc} while cut off "
                                         "from the store"))
                        break
    return found, ""


def check_f(tl: Timeline, p: Params) -> tuple[Found, str] | None:
    """Every injected fault recorded evidence that it took effect (``detail.took_effect``
    True, with ``detail.evidence``: the pid gone, the process stopped, packets dropped, the
    leader changed...). A fault that did not is not a test of anything."""
    if not tl.faults:
        return None
    found: Found = []
    mid = 0
    for f in tl.faults.values():
        if f.detail.get("landed_mid_switch"):
            mid += 1
        if f.detail.get("took_effect") is not True:
            why = f.detail.get("evidence") or "no evidence recorded"
            found.append((f.start, f"{f.id} ({f.kind} on {', '.join(f.hosts) or 'the store'})"
                                   f" did not take effect: {why}"))
    return found, f"{mid} landed mid-switch" if mid else ""


def _window(tl: Timeline) -> tuple[float, float]:
    """The judged window: from the deploy (or the first sample) to the final event."""
    start = next((op["t"] for op in tl.ops if op.get("action") == "deploy"), None)
    if start is None:
        start = min((s[0].t for s in tl.probes.values() if s), default=tl.end)
    end = tl.final["t"] if tl.final else tl.end
    return start, end


def check_p(tl: Timeline, p: Params) -> tuple[Found, str] | None:
    """Per endpoint, the longest stretch of the judged window covered by no sample is at
    most ``max_gap`` (a sample covers [t, t + dt]; a timeout covers its whole wait, as "not
    serving"). A prober that died early, stalled, or caught up in bursts shows here."""
    if not tl.probes and not tl.hosts:
        return None
    w0, w1 = _window(tl)
    found: Found = []
    worst = 0.0
    for svc in tl.services:
        for host in tl.hosts_of(svc):
            covered_to = w0
            gap, at = 0.0, w0
            for smp in tl.probes.get((svc, host), ()):
                if smp.t > w1:
                    break
                if smp.t - covered_to > gap:
                    gap, at = smp.t - covered_to, covered_to
                covered_to = max(covered_to, smp.t + smp.dt)
            if w1 - covered_to > gap:
                gap, at = w1 - covered_to, covered_to
            worst = max(worst, gap)
            if gap > p.max_gap:
                found.append((at, f"{svc}@{host}: no sample for {gap:.3f}s "
                                  f"(at most {p.max_gap:g}s)"))
    return found, f"largest gap {worst:.3f}s"


CHECKS = {"S1": check_s1, "S2": check_s2, "S3": check_s3, "S4": check_s4, "S5": check_s5,
          "L1": check_l1, "L2": check_l2, "L3": check_l3, "F": check_f, "P": check_p}


def check(events: Iterable[dict[str, Any]], params: Params | None = None) -> list[Result]:
    """Evaluate every property; one :class:`Result` per property, in ``PROPERTIES`` order.

    A liveness property is ``n/a`` when the history gives it nothing to judge (L1 without a
    settled ``final`` event, L2/L3 without a matching fault). The counter-example is the
    earliest one found; ``count`` is how many were found."""
    tl = Timeline(events)
    p = params or Params()
    results = []
    for prop in PROPERTIES:
        out = CHECKS[prop](tl, p)
        if out is None:
            results.append(Result(prop, "n/a"))
            continue
        found, note = out
        if found:
            found.sort(key=lambda x: x[0])
            t, detail = found[0]
            results.append(Result(prop, "violated", f"{_fmt(t, tl)}: {detail}", len(found), note))
        else:
            results.append(Result(prop, "held", "", 0, note))
    return results


def violations(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if r.status == "violated"]


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width table: property, status, first counter-example (or a note)."""
    rows = [("property", "result", "first counter-example")]
    for r in results:
        detail = r.counterexample + (f" (+{r.count - 1} more)" if r.count > 1 else "")
        rows.append((f"{r.prop} {TITLES[r.prop]}", r.status, detail or r.note))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows)


def metrics(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts and timings: faults by kind; for each ZooKeeper leader kill, the election time
    the fault recorded and how long until the deploy moved again (the first gate bump or
    deploy item change after the kill), when an item was rolling at the kill."""
    tl = Timeline(events)
    kinds = Counter(f.kind for f in tl.faults.values())
    elections, resumes = [], []
    for f in tl.faults.values():
        if f.kind != "zk_leader_kill":
            continue
        if isinstance(f.detail.get("election_s"), (int, float)):
            elections.append(float(f.detail["election_s"]))
        rolling = any(i.at(f.start) == ("rolling", "deploy") for i in tl.items.values())
        if not rolling:
            continue
        for e in tl.store:
            head = e["path"].split("/")[0]
            if e["t"] > f.start and head in ("gate", "deploy", "history"):
                resumes.append(e["t"] - f.start)
                break
    return {"faults": dict(sorted(kinds.items())), "election_s": elections,
            "resume_s": resumes}
