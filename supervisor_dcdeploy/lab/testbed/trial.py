"""One recorded deploy with faults: the unit of the integration tests and of
``bench/chaos.py``.

:func:`plan` draws a fault schedule from a seed (pure: the same seed gives the same kinds,
hosts, moments and durations); :func:`run_deploy` stages a new version of every service,
queues the deploy, runs the schedule against the live testbed while the prober and the store
recorder write the history, heals everything, waits for convergence and returns the
checker's verdict. Faults run one after another (never two at once), so a trial's outcome
is attributable to one fault at a time.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import structlog

from ... import ops
from ...snapshot import read_queue
from . import checker
from .bed import Testbed
from .faults import KINDS, Fault, FaultRunner
from .history import HistoryWriter
from .recorder import Endpoint, Prober, StoreRecorder, snapshot_state

log = structlog.get_logger(__name__)

DURATIONS = {  # (min, max) seconds a fault lasts before it is healed
    "agent_kill": (0.0, 0.0), "supervisord_kill": (1.0, 3.0), "host_kill": (2.0, 5.0),
    "agent_stop": (6.0, 8.0),  # longer than the 4 s session timeout
    "link_cut": (5.0, 8.0), "store_filter": (5.0, 8.0), "zk_leader_kill": (2.0, 4.0),
    "netem": (3.0, 6.0), "disk_full": (3.0, 6.0), "garbage": (2.0, 4.0),
    "reboot_isolated": (6.0, 9.0),
}
# L2 ("unreachable hosts don't block") is judged only while a host stays unreachable for
# block_window (20 s) after the others are done: the last fault of a trial, when it makes a
# host unreachable, lasts this long half of the time.
LONG_KINDS = ("host_kill", "link_cut", "store_filter")
LONG = (28.0, 36.0)
# Faults that can hit a host in the middle of its own switch (after its gate commit, before
# it is healthy again): drawn for half of these among a trial's first two faults; the
# runner then waits for a switch.
MID_SWITCH_KINDS = ("agent_kill", "agent_stop", "supervisord_kill", "host_kill",
                    "reboot_isolated", "disk_full")
MID_SWITCH_WAIT = 20.0  # seconds to wait for a switch to hit; then inject anyway
S4_HOLD = 10.5  # the operator waits this long after a failure (S4 is judged over >= 10 s)
# How long the prober waits for an answer before it counts the sample as not serving. 0.25 s
# charged whole-machine stalls to the protocol: on this shared 2-core machine (load 10-55)
# three hosts' services at once answered nothing within 0.25 s, with no refusal, no gate
# record and no fault on them (chaos seed 1401 trial 4; the CI set's isolation group), and
# S1 reported them. A stopped service is refused at once whatever this is; a hung one
# still counts after a second.
PROBE_TIMEOUT = 1.0

# Samples per second per endpoint. A machine stall of S seconds leaves a gap of about
# period + S - dt, and P allows 0.1 s. This machine stalls real-time threads for up to ~75 ms
# at times (kernel side, no steal; docs/testbed.md, "Prober coverage under machine stalls"):
# at 25 Hz (40 ms) such a stall fails P, as one CI run did (0.110 s); at 50 Hz (20 ms) the
# same injected 75 ms stalls left gaps of at most 94 ms. The cost is ~5 s more prober CPU a
# minute.
PROBE_RATE = 50.0


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the deploy was queued (or after the previous fault healed)
    kind: str
    host: str | None
    duration: float
    detail: dict[str, Any] = field(default_factory=dict)
    mid_switch: bool = False  # wait for a host to start a switch, then hit that host


def plan(seed: int, hosts: Sequence[str], kinds: Sequence[str], n: int,
         window: float = 20.0, disk_host: str | None = None,
         order: Sequence[str] | None = None) -> list[Planned]:
    """``n`` faults of the given kinds, drawn from ``seed`` alone: the moments spread over
    ``window`` seconds, hosts and durations uniformly (``disk_full`` always on
    ``disk_host``, the one with a small tmpfs, when given). ``order`` fixes the kinds (one
    per fault, e.g. from :func:`cover`) instead of drawing them. The last fault, when it
    makes a host unreachable, lasts :data:`LONG` half of the time (L2); half of the first
    two faults, when of :data:`MID_SWITCH_KINDS`, are timed into a switch."""
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0.5, window) for _ in range(n))
    out = []
    for i, at in enumerate(moments):
        kind = rng.choice(list(kinds))
        if order is not None:
            kind = order[i]
        cls = KINDS[kind]
        host = rng.choice(list(hosts)) if cls.needs_host else None
        if kind == "disk_full" and disk_host is not None:
            host = disk_host
        lo, hi = DURATIONS[kind]
        detail: dict[str, Any] = {}
        if kind == "garbage":
            detail["target"] = rng.choice(cls.TARGETS)  # type: ignore[attr-defined]
        if kind == "netem":
            detail["netem"] = (f"delay {rng.choice([20, 50, 100])}ms 10ms "
                               f"loss {rng.choice([1, 5, 10])}%")
        duration = rng.uniform(lo, hi)
        if i == n - 1 and kind in LONG_KINDS and rng.random() < 0.5:
            duration = rng.uniform(*LONG)
        # Only early faults: a late one often finds the deploy finished, nothing switching.
        mid = kind in MID_SWITCH_KINDS and rng.random() < 1 / 2 and i < 2
        out.append(Planned(round(at, 3), kind, host, round(duration, 3), detail, mid))
    return out


def cover(seed: int, kinds: Sequence[str], trials: int, per_trial: int) -> list[list[str]]:
    """Kinds for ``trials`` x ``per_trial`` faults such that every kind appears at least once
    (when there are enough slots): each kind once, then random ones, shuffled by ``seed``."""
    rng = random.Random(seed)
    slots = trials * per_trial
    pool = list(kinds)[:slots] + [rng.choice(list(kinds)) for _ in range(slots - len(kinds))]
    rng.shuffle(pool)
    return [pool[t * per_trial:(t + 1) * per_trial] for t in range(trials)]


@dataclass
class TrialResult:
    version: str
    events: list[dict[str, Any]]
    results: list[checker.Result]
    metrics: dict[str, Any]
    converged: bool
    injected: Counter = field(default_factory=Counter)
    during_deploy: Counter = field(default_factory=Counter)
    mid_switch: Counter = field(default_factory=Counter)  # landed between stop and healthy

    @property
    def violations(self) -> list[checker.Result]:
        return checker.violations(self.results)


def _deploy_active(bed: Testbed) -> bool:
    assert bed.store is not None
    return bool(bed.store.children("deploy"))


def _gate(bed: Testbed, svc: str) -> tuple[int, str | None]:
    """(node version, host named) of ``gate/<svc>``; (-1, None) when unreadable."""
    assert bed.store is not None
    try:
        data, version = bed.store.get(f"gate/{svc}")
        record = json.loads(data) if data else {}
        return version, record.get("host") if isinstance(record, dict) else None
    except Exception:  # noqa: BLE001 - no gate yet, or the store busy: nothing to see
        return -1, None


def wait_switch(bed: Testbed, host: str | None, timeout: float
                ) -> tuple[str, str, int] | None:
    """Block until a host (``host`` if given) takes a service down through the gate: a gate
    version bump naming it whose presence is gone. Returns (host, service, gate version), or
    None after ``timeout`` or as soon as the deploy queue is empty (nothing will switch)."""
    assert bed.store is not None
    seen = {svc: _gate(bed, svc)[0] for svc in bed.services}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _deploy_active(bed):
        for svc in bed.services:
            version, who = _gate(bed, svc)
            if version > seen[svc] and who in bed.hosts and host in (None, who):
                if bed.store.exists(f"current/{svc}/{who}") is None:
                    return who, svc, version
            seen[svc] = max(seen[svc], version)
        time.sleep(0.02)
    return None


def run_deploy(bed: Testbed, version: str, schedule: Sequence[Planned], history: Path,
               timeout: float = 180.0, max_resumes: int = 3, broken: Sequence[str] = (),
               corrupt: Sequence[str] = (), give_up_after: float = 25.0,
               kinds: Mapping[str, type[Fault]] | None = None) -> TrialResult:
    """Deploy ``version`` of every service with ``schedule`` injected; block until healed
    and converged (or ``timeout`` after the last heal); check the history.

    Faults needing the tmpfs host are redirected to it (``disk_full``). A deploy halted by
    a failed health check is resumed (an ``op`` event), at most ``max_resumes`` times.

    ``broken`` services get a release that fails its health check, ``corrupt`` ones a URL
    serving bytes other than the staged sha256 (the ``artifact`` event records their real
    digest). With either, the operator aborts the deploy (a failed broken item at once, a
    deploy that cannot start after ``give_up_after`` seconds), and convergence means every
    host still serving the version it had.

    ``kinds`` replaces fault classes by kind (the Vagrant VMs' ``netem``, done over ssh:
    :mod:`..vmtrial`); by default :data:`.faults.KINDS`."""
    assert bed.store is not None
    writer = HistoryWriter(history)
    services = list(bed.services)
    served = {svc: [bed.version(h, svc) for h in bed.hosts] for svc in services}
    initial = {svc: _majority(v) for svc, v in served.items()}
    present = {svc: sorted({x for x in v if x}) for svc, v in served.items()}
    writer.emit("topology", **bed.topology(), initial=initial, present=present,
                installed=_installed(bed))
    recorder = StoreRecorder(writer, bed.ensemble.connect_string).start()
    prober = Prober(writer, [Endpoint(h, s, host.addr, bed.services[s].port)
                             for h, host in bed.hosts.items() for s in services],
                    rate=PROBE_RATE, timeout=PROBE_TIMEOUT).start()
    runner = FaultRunner(bed, writer)
    injected: Counter = Counter()
    during: Counter = Counter()
    mid: Counter = Counter()
    failed_seen: dict[str, float] = {}
    converged = False
    try:
        for svc in services:
            if svc in corrupt:
                good, sha = bed.release(svc, version)
                bad = good.with_name(f"{svc}-{version}-corrupt.tar.gz")
                data = bytearray(good.read_bytes())
                data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other digest
                bad.write_bytes(bytes(data))
                assert bed.store is not None
                ops.stage(bed.store, svc, version, sha256=sha, urls=[f"file://{bad}"],
                          size=len(data))
                writer.emit("artifact", service=svc, version=version,
                            sha256=hashlib.sha256(data).hexdigest(), broken=False)
            else:
                _, sha = bed.stage(svc, version, broken=svc in broken)
                writer.emit("artifact", service=svc, version=version, sha256=sha,
                            broken=svc in broken)
            writer.emit("op", action="stage", service=svc, version=version)
        writer.emit("op", action="deploy", services=services)
        bed.deploy(services)
        t0 = time.monotonic()
        started = t0
        doomed = bool(broken or corrupt)
        want = initial if doomed else {svc: version for svc in services}
        for planned in schedule:
            host = planned.host
            if planned.kind == "disk_full" and bed.config.disk_host:
                host = bed.config.disk_host
            _sleep_until(t0 + planned.at)
            detail = dict(planned.detail)
            if planned.mid_switch:
                # Hit a host between its gate commit and its healthy check: its recovery
                # must come from local state (docs/design.md §4.7).
                t_wait = time.monotonic()
                hit = wait_switch(bed, host if planned.kind == "disk_full" else None,
                                  MID_SWITCH_WAIT)
                detail["mid_switch"] = {"waited_s": round(time.monotonic() - t_wait, 3)}
                if hit is not None:
                    host = hit[0]
                    detail["mid_switch"].update(service=hit[1], gate_version=hit[2])
            fault = {**KINDS, **(kinds or {})}[planned.kind](bed, host, detail)
            active = _deploy_active(bed)
            if planned.mid_switch and "service" in detail["mid_switch"]:
                svc = detail["mid_switch"]["service"]
                gone = bed.store.exists(f"current/{svc}/{host}") is None
                fault.detail["landed_mid_switch"] = gone
                mid[planned.kind] += int(gone)
            runner.inject(fault)
            injected[planned.kind] += 1
            during[planned.kind] += int(active)
            time.sleep(planned.duration)
            runner.heal(fault)
            t0 = max(t0, time.monotonic() - planned.at)  # faults never overlap
        deadline = time.monotonic() + timeout
        resumes = 0
        while time.monotonic() < deadline:
            head = _failed_head(bed)
            if head is not None:
                # The operator does not act at once: S4 (nobody else takes the version,
                # the failed host rolls back) is judged over this hold.
                since = failed_seen.setdefault(f"{head.node}@{head.data_version}",
                                               time.monotonic())
                if time.monotonic() - since < S4_HOLD:
                    time.sleep(0.25)
                    continue
            if doomed and _deploy_active(bed) and (
                    head is not None or time.monotonic() - started > give_up_after):
                writer.emit("op", action="abort", service=None,
                            reason=head.reason if head else "no progress")
                abort_if_stuck(bed)
                continue
            if head is not None and resumes < max_resumes:
                # A fault can make a health check fail (loss, a paused agent): the deploy
                # halts (S4) until an operator acts. Act as one, on the record.
                resumes += 1
                writer.emit("op", action="resume", service=head.service,
                            reason=head.reason)
                try:
                    ops.resume(bed.store)
                except ops.OpError as exc:
                    log.warning("trial.resume_failed", error=str(exc))
                continue
            if not _deploy_active(bed) and all(
                    bed.version(h, s) == want[s] for s in services for h in bed.hosts) \
                    and _all_present(bed):
                converged = True
                break
            time.sleep(0.25)
        time.sleep(1.0)  # let the prober see the settled state
    finally:
        runner.heal_all()
        for name, node in bed.hosts.items():
            snapshot_state(writer, name, node.layout.root)
        writer.emit("final", settled=True, converged=converged)
        prober.stop()
        recorder.stop()
        writer.close()
    events = writer.events
    return TrialResult(version, events, checker.check(events), checker.metrics(events),
                       converged, injected, during, mid)


def abort_if_stuck(bed: Testbed) -> None:
    """Leave an empty queue for the next trial (a failed item is aborted by the operator)."""
    assert bed.store is not None
    try:
        if bed.store.children("deploy"):
            ops.abort(bed.store)
    except ops.OpError:
        pass


def _all_present(bed: Testbed) -> bool:
    """Every host registered (``current/<svc>/<host>``) for every service: serving is not
    enough, a host whose agent or supervisord is gone serves outside the protocol (L1)."""
    assert bed.store is not None
    try:
        return all(set(bed.hosts) <= set(bed.store.children(f"current/{svc}"))
                   for svc in bed.services)
    except Exception:  # noqa: BLE001 - store busy (leader election): look again later
        return False


def _failed_head(bed: Testbed):
    assert bed.store is not None
    try:
        queue, _ = read_queue(bed.store)
    except Exception:  # noqa: BLE001 - store busy (leader election): look again later
        return None
    return queue[0] if queue and queue[0].state == "failed" else None


def _installed(bed: Testbed) -> dict[str, list[str]]:
    """Versions some host may start from its own disk when recording begins (staged by an
    earlier run: a host recovering onto one of them is not starting something never staged):
    its local state's ``active`` and ``previous`` (design §4.7 step 2: the last verified
    version, or the one before an unverified switch), the state's ``installed`` keys, and
    every complete release directory (step 3: the newest installed release).

    The agent does not fill the state's ``installed`` map, so reading only it listed
    nothing, and chaos seed 1806 trial 6 reported b 6, staged in trial 5 and h2's
    ``previous``, as "never staged"."""
    from ...localstate import ReleaseDir, read_state
    out: dict[str, set[str]] = {svc: set() for svc in bed.services}
    for host in bed.hosts.values():
        root = host.layout.root
        for svc in out:
            try:
                out[svc] |= set(ReleaseDir(root, svc).installed())
            except OSError:
                pass
        try:
            data = read_state(root) or {}
        except (OSError, ValueError):
            continue
        for svc, st in (data.get("services") or {}).items():
            if svc in out and isinstance(st, dict):
                out[svc] |= set((st.get("installed") or {}))
                out[svc] |= {v for v in (st.get("active"), st.get("previous"))
                             if isinstance(v, str) and v}
    return {svc: sorted(v) for svc, v in out.items()}


def _majority(values: list[str | None]) -> str | None:
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else None


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Background(threading.Thread):
    """Run a callable in a thread, keeping its exception for :meth:`result`."""

    def __init__(self, fn, *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc

    def result(self, timeout: float | None = None) -> Any:
        self.join(timeout)
        if self.error:
            raise self.error
        return self.value
