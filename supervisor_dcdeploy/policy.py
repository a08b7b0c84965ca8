"""Rollout policy beyond one service in series: parallel waves, failure-domain budgets,
canaries, and the prediction model behind ``dcdeploy plan`` (issue 10).

Pure functions of an immutable snapshot, like :mod:`decisions`: nothing here does I/O,
every answer carries a reason in words. This is the model the planner and its tests
use; the agent's gate acts on waves, rack budgets and rack order through
:func:`decisions.may_take_down` and :func:`decisions.admission`, which differ from it where
docs/policy.md ("What the agent acts on") says.

The snapshot the gate sees is a :class:`GateView`: per service a :class:`ServiceState`
(registered hosts with their racks, online hosts with their versions, who is switching),
the deploy queue, and the deploy-wide ``host_parallel``. A take-down admitted by
:func:`admit_take_down` is committed atomically by the caller, and the next decision sees
it (:func:`apply_take_down` is that commit, for tests and for simulation).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .decisions import Decision, ServiceView, dependencies, ready_queue
from .model import ACTIVE_STATES, MAX_HOST_PARALLEL, DeployItem, InvalidData, _get, check_name
MAX_SOAK_SECS = 7 * 24 * 3600.0
MAX_COUNT = 100_000
# Without recorded switch timings, a batch is predicted to take the service's healthy_secs
# plus this much for stop and start (a guess, said so in the plan: "timing_source").
FALLBACK_SWITCH_S = 10.0
# The plan uses at most this many of a service's latest timing records.
TIMING_WINDOW = 20


class HasDeps(Protocol):
    """A spec, or anything with its ``depends_on`` (a :class:`ServiceState`)."""

    @property
    def depends_on(self) -> tuple[str, ...]: ...


# --------------------------------------------------------------------------------------
# Policy: the new optional fields of a service spec


@dataclass(frozen=True)
class Policy:
    """The rollout policy fields of ``/dc/services/<svc>``, all optional.

    ``max_down_per_rack``: at most this many hosts of one rack not serving at once (None:
    no rack budget). ``rack_order``: finish one rack before the next; ``rack_names`` gives the
    order (racks not named follow, sorted), empty means sorted. ``canary``: the first
    this many hosts (spread over racks) switch, then the item holds for ``soak_secs`` or
    until approved (``soak_secs`` 0: until approved). ``verify_peers``: count only hosts
    that answer a health probe (issue 10 item 5; parsed here, not decided here)."""

    max_down_per_rack: int | None = None
    rack_order: bool = False
    rack_names: tuple[str, ...] = ()
    canary: int = 0
    soak_secs: float = 0.0
    verify_peers: bool = False

    @classmethod
    def parse(cls, where: str, data: Mapping[str, Any]) -> Policy:
        """The policy fields of a spec's raw JSON object; raises :class:`InvalidData`
        naming the field for a value of the wrong type or out of bounds."""
        k = _get(where, data, "max_down_per_rack", int, None)
        if k is not None and not 1 <= k <= MAX_COUNT:
            raise InvalidData(where, "max_down_per_rack", f"must be 1..{MAX_COUNT}, got {k}")
        order = _get(where, data, "rack_order", (bool, list), False)
        racks: tuple[str, ...] = ()
        if isinstance(order, list):
            for i, rack in enumerate(order):
                check_name(where, f"rack_order[{i}]", rack)
            if len(set(order)) != len(order):
                raise InvalidData(where, "rack_order", f"names a rack twice: {order!r}")
            racks, order = tuple(order), True
        canary = _get(where, data, "canary", int, 0)
        if not 0 <= canary <= MAX_COUNT:
            raise InvalidData(where, "canary", f"must be 0..{MAX_COUNT}, got {canary}")
        soak = float(_get(where, data, "soak_secs", (int, float), 0.0))
        if not (math.isfinite(soak) and 0 <= soak <= MAX_SOAK_SECS):
            raise InvalidData(where, "soak_secs", f"must be 0..{MAX_SOAK_SECS:g}, got {soak}")
        if soak and not canary:
            raise InvalidData(where, "soak_secs", "a soak needs canaries (set canary >= 1)")
        return cls(max_down_per_rack=k, rack_order=bool(order), rack_names=racks,
                   canary=canary, soak_secs=soak,
                   verify_peers=_get(where, data, "verify_peers", bool, False))

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults, for the spec's JSON."""
        out: dict[str, Any] = {}
        if self.max_down_per_rack is not None:
            out["max_down_per_rack"] = self.max_down_per_rack
        if self.rack_order:
            out["rack_order"] = list(self.rack_names) if self.rack_names else True
        if self.canary:
            out["canary"] = self.canary
        if self.soak_secs:
            out["soak_secs"] = self.soak_secs
        if self.verify_peers:
            out["verify_peers"] = True
        return out


def check_host_parallel(where: str, value: Any) -> int:
    """``--host-parallel N``: how many of its services one host may have down at once."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_HOST_PARALLEL:
        raise InvalidData(where, "host_parallel", f"must be 1..{MAX_HOST_PARALLEL}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# The snapshot


@dataclass(frozen=True)
class ServiceState:
    """One service as the gate sees it.

    ``racks``: every host registered for the service, with its rack ("" when unknown).
    ``online``: hosts with a serving presence, with their version. ``switching``: hosts
    that took themselves down through the gate and are not back. A registered host in
    neither is offline. ``target``: the version of this service's deploy item.
    ``canaries_done_at``: when the last canary came back on the target (None: not yet);
    ``approved``: ``dcdeploy approve`` was given for the item."""

    name: str
    quorum: int = 0
    max_parallel: int = 1
    depends_on: tuple[str, ...] = ()
    policy: Policy = Policy()
    racks: Mapping[str, str] = field(default_factory=dict)
    online: Mapping[str, str] = field(default_factory=dict)
    switching: frozenset[str] = frozenset()
    target: str | None = None
    canaries_done_at: float | None = None
    approved: bool = False

    def offline(self) -> set[str]:
        return set(self.racks) - set(self.online) - set(self.switching)

    def done(self) -> set[str]:
        return {h for h, v in self.online.items() if v == self.target}

    def rack(self, host: str) -> str:
        return self.racks.get(host, "")

    def down_in_rack(self, rack: str) -> list[str]:
        """Registered hosts of ``rack`` not serving: switching or offline."""
        return sorted(h for h, r in self.racks.items() if r == rack and h not in self.online)


@dataclass(frozen=True)
class GateView:
    """The snapshot at the gate: every service, the deploy queue (sequence order), the
    deploy-wide per-host limit, and the time (for the soak)."""

    services: Mapping[str, ServiceState]
    queue: Sequence[DeployItem] = ()
    host_parallel: int = 1
    now: float = 0.0


def _rack_name(rack: str) -> str:
    return rack or "(none)"


def service_state(view: ServiceView, policy: Policy = Policy(),
                  target: str | None = None) -> ServiceState:
    """The :class:`ServiceState` of today's per-service snapshot, for wiring.

    Registered hosts are those whose registry entry lists the service, plus any online;
    a host's rack is its presence's, else its registry entry's. Switching hosts are those
    with a ready-queue entry for ``target`` (default: the staged version) but no presence:
    the entry is ephemeral, so its owner is alive and mid-switch, while a crashed host's
    entry went with its session (the rule ``decisions.deploy_status`` already uses)."""
    target = target if target is not None else (view.staged.version if view.staged else None)
    racks = {h: info.rack for h, info in view.hosts.items() if view.service in info.services}
    racks.update({h: e.rack or racks.get(h, "") for h, e in view.current.items()})
    online = {h: e.version for h, e in view.current.items() if e.state == "serving"}
    switching = frozenset(e.host for e in ready_queue(view, target) if e.host not in view.current
                          ) if target is not None else frozenset()
    racks.update({h: racks.get(h, "") for h in switching})
    spec = view.spec
    return ServiceState(name=view.service, quorum=spec.quorum if spec else 0,
                        max_parallel=spec.max_parallel if spec else 1,
                        depends_on=spec.depends_on if spec else (), policy=policy,
                        racks=racks, online=online, switching=switching, target=target)


# --------------------------------------------------------------------------------------
# Parallel waves


def _blocker(item: DeployItem, ahead: Sequence[DeployItem],
             specs: Mapping[str, HasDeps]) -> str | None:
    """Why ``item`` may not roll now (None: it may)."""
    if item.state == "invalid":
        return f"invalid: {item.reason}"
    if item.service not in specs:
        return f'service "{item.service}" is not defined'
    if item.state not in ACTIVE_STATES:
        return f"{item.state}" + (f": {item.reason}" if item.reason else "")
    deps = dependencies(specs, item.service)  # type: ignore[arg-type]
    for before in ahead:
        if before.state == "invalid":
            return f"deploy queue blocked at {before.node}: {before.reason}"
        if before.state in ("done", "aborted"):
            continue
        if before.service == item.service:
            return f"waiting for the earlier item of {item.service} ({before.node}) to finish"
        if before.service in deps:
            return (f"waiting for {before.service} {before.version} ({before.node}, "
                    f"{before.state}): {item.service} depends on it")
    return None


def active_items(queue: Sequence[DeployItem],
                 specs: Mapping[str, HasDeps]) -> list[tuple[DeployItem, str]]:
    """The items that may roll now, each with the reason.

    An item may roll when it is waiting or rolling and no item ahead of it in the queue,
    not done, is of its own service or of a service it depends on (directly or not);
    independent items roll at the same time. An invalid item blocks every item after it."""
    out = []
    for i, item in enumerate(queue):
        if _blocker(item, queue[:i], specs) is None:
            deps = sorted(dependencies(specs, item.service))  # type: ignore[arg-type]
            out.append((item, "no item ahead it depends on" + (
                f" (depends on {', '.join(deps)})" if deps else "")))
    return out


def blocked_items(queue: Sequence[DeployItem],
                  specs: Mapping[str, HasDeps]) -> list[tuple[DeployItem, str]]:
    """The items not done that may not roll now, each with the reason (with
    :func:`active_items`, every item not done or aborted)."""
    out = []
    for i, item in enumerate(queue):
        if item.state in ("done", "aborted"):
            continue
        why = _blocker(item, queue[:i], specs)
        if why is not None:
            out.append((item, why))
    return out


def waves(queue: Sequence[DeployItem], specs: Mapping[str, HasDeps]) -> list[list[DeployItem]]:
    """The items in waves: wave 0 may roll now, wave n when waves before it are done.

    Items that never roll (paused, failed, invalid, undefined, or behind one of those) are
    in no wave; :func:`blocked_items` names them."""
    pending = list(queue)
    out: list[list[DeployItem]] = []
    while True:
        wave = [item for item, _ in active_items(pending, specs)]
        if not wave:
            return out
        out.append(wave)
        nodes = {i.node for i in wave}
        pending = [replace(i, state="done") if i.node in nodes else i for i in pending]


# --------------------------------------------------------------------------------------
# Canaries and rack order


@dataclass(frozen=True)
class CanaryStatus:
    canaries: tuple[str, ...]
    holding: bool
    reason: str


def rack_sequence(svc: ServiceState) -> list[str]:
    """The racks of the service in rolling order: those the policy names, then the
    others sorted."""
    present = set(svc.racks.values())
    named = [r for r in svc.policy.rack_names if r in present]
    return named + sorted(present - set(named))


def canary_hosts(svc: ServiceState) -> tuple[str, ...]:
    """The first ``canary`` hosts, spread over racks: one per rack in rack order, round
    robin, hosts sorted inside a rack. With ``rack_order`` they come from the first racks
    instead (a canary in a later rack could not switch before the first rack is done,
    which the canary hold forbids: a deadlock). Chosen among hosts not offline (a canary
    that cannot switch would hold the item for ever). The wired version should record the
    set in the deploy item when it starts, so it does not move when hosts come and go."""
    n = svc.policy.canary
    if n <= 0:
        return ()
    offline = svc.offline()
    by_rack = {r: sorted(h for h, hr in svc.racks.items() if hr == r and h not in offline)
               for r in rack_sequence(svc)}
    if svc.policy.rack_order:
        return tuple([h for hosts in by_rack.values() for h in hosts][:n])
    out: list[str] = []
    depth = 0
    while len(out) < n and any(len(hs) > depth for hs in by_rack.values()):
        for hosts in by_rack.values():
            if depth < len(hosts) and len(out) < n:
                out.append(hosts[depth])
        depth += 1
    return tuple(out)


def canary_status(svc: ServiceState, now: float) -> CanaryStatus:
    """Which hosts are canaries, and whether the item holds the others back.

    It holds until every canary is back on the target, then for ``soak_secs`` after
    ``canaries_done_at`` (with ``soak_secs`` 0: until approved); an approval ends it."""
    canaries = canary_hosts(svc)
    if not canaries:
        return CanaryStatus((), False, "no canaries")
    names = ", ".join(canaries)
    if svc.approved:
        return CanaryStatus(canaries, False, f"canaries {names} approved")
    pending = [h for h in canaries if h not in svc.done()]
    if pending:
        return CanaryStatus(canaries, True,
                            f"canary: waiting for {', '.join(pending)} to serve {svc.target}")
    soak = svc.policy.soak_secs
    if not soak:
        return CanaryStatus(canaries, True, f"canary: {names} on {svc.target}, "
                                            f"holding until approved (dcdeploy approve {svc.name})")
    if svc.canaries_done_at is None:
        return CanaryStatus(canaries, True, "canary: soak not started yet")
    left = svc.canaries_done_at + soak - now
    if left > 0:
        return CanaryStatus(canaries, True, f"canary: soaking, {left:.0f} s of {soak:g} s left "
                                            f"(or dcdeploy approve {svc.name})")
    return CanaryStatus(canaries, False, f"canary: soaked {soak:g} s on {names}")


def rack_turn(svc: ServiceState, rack: str) -> Decision:
    """With ``rack_order``: may hosts of ``rack`` switch, i.e. is every earlier rack done
    (every online host on the target, none switching)? Offline hosts do not hold a rack
    back: they catch up when they return."""
    if not svc.policy.rack_order:
        return Decision(True, "no rack order")
    done = svc.done()
    for earlier in rack_sequence(svc):
        if earlier == rack:
            return Decision(True, f"rack order: {_rack_name(rack)}'s turn")
        left = sorted(h for h, r in svc.racks.items() if r == earlier
                      and (h in svc.switching or (h in svc.online and h not in done)))
        if left:
            return Decision(False, f"rack order: rack {_rack_name(earlier)} first "
                                   f"({len(left)} hosts left: {', '.join(left)})")
    return Decision(False, f"rack {_rack_name(rack)} has no hosts of {svc.name}")


# --------------------------------------------------------------------------------------
# The gate


def admit_take_down(view: GateView, host: str, service: str) -> Decision:
    """May ``host`` take ``service`` down now to switch it to the target?

    Every rule must agree, checked in this order (the first refusal is the reason):
    the service is defined and registered on the host; its item may roll (no dependency
    item ahead unfinished); the host is not on the target nor already switching; fewer than
    ``max_parallel`` hosts of the service switch; the host has fewer than
    ``host_parallel`` services switching; if the host is online, the rest keep ``quorum``
    and its rack keeps its budget (at most ``max_down_per_rack`` hosts not serving); with
    ``rack_order``, earlier racks are done; with canaries, a non-canary waits for the
    hold to end. The caller commits the answer atomically with the snapshot it read."""
    svc = view.services.get(service)
    if svc is None:
        return Decision(False, f"service {service} is not defined")
    if host not in svc.racks:
        return Decision(False, f"{host} is not registered for {service}")
    items = [i for i, _ in active_items(view.queue, view.services) if i.service == service]
    if not items:
        mine = [i for i in view.queue
                if i.service == service and i.state not in ("done", "aborted")]
        if not mine:
            return Decision(False, f"no deploy queued for {service}")
        why = {i.node: r for i, r in blocked_items(view.queue, view.services)}
        return Decision(False, f"deploy {mine[0].node}: {why[mine[0].node]}")
    item = items[0]
    if svc.target != item.version:
        return Decision(False, f"deploy {item.node} wants {item.version} but the snapshot's "
                               f"target is {svc.target}")
    if host in svc.switching:
        return Decision(False, f"{host} is already switching {service}")
    if svc.online.get(host) == svc.target:
        return Decision(False, f"already on {svc.target}")
    switching = sorted(svc.switching)
    if len(switching) >= svc.max_parallel:
        return Decision(False, f"max_parallel {svc.max_parallel}: switching now "
                               f"{', '.join(switching)}")
    mine_down = sorted(s.name for s in view.services.values() if host in s.switching)
    # As the agent's decisions.host_room: the item's own limit, and no more than any
    # running switch's item allows, so a deploy asking for one at a time is not overruled.
    limit = min([item_host_parallel(view, item)] +
                [item_host_parallel(view, i) for s in mine_down
                 if (i := _first_item(view.queue, s)) is not None])
    if len(mine_down) >= limit:
        return Decision(False, f"host_parallel {limit}: {host} is switching "
                               f"{', '.join(mine_down)}")
    rack = svc.rack(host)
    if host in svc.online:
        online = len(svc.online)
        if online - 1 < svc.quorum:
            return Decision(False, f"quorum: {online} online, quorum {svc.quorum}, "
                                   f"{len(svc.offline())} hosts offline")
        budget = svc.policy.max_down_per_rack
        down = svc.down_in_rack(rack)
        if budget is not None and len(down) + 1 > budget:
            return Decision(False, f"rack budget: rack {_rack_name(rack)} has {len(down)} "
                                   f"down ({', '.join(down)}), max_down_per_rack {budget}")
    turn = rack_turn(svc, rack)
    if not turn:
        return turn
    canary = canary_status(svc, view.now)
    if canary.holding and host not in canary.canaries:
        return Decision(False, canary.reason)
    what = "canary take-down" if host in canary.canaries and canary.holding else "take-down"
    return Decision(True, f"deploy {item.node}: {what} to {svc.target} keeps quorum "
                          f"{svc.quorum}" + (f" and rack {_rack_name(rack)} within "
                                             f"{svc.policy.max_down_per_rack}"
                                             if svc.policy.max_down_per_rack else ""))


def item_host_parallel(view: GateView, item: DeployItem) -> int:
    """How many of a host's services may switch at once for ``item``: its own
    ``host_parallel`` (``deploy --host-parallel N``), else the view's."""
    return item.host_parallel if item.host_parallel is not None else view.host_parallel


def _first_item(queue: Sequence[DeployItem], service: str) -> DeployItem | None:
    return next((i for i in queue
                 if i.service == service and i.state not in ("done", "aborted")), None)


def apply_take_down(view: GateView, host: str, service: str) -> GateView:
    """The state after the gate commit of ``host`` taking ``service`` down."""
    svc = view.services[service]
    online = {h: v for h, v in svc.online.items() if h != host}
    new = replace(svc, online=online, switching=svc.switching | {host})
    return replace(view, services={**view.services, service: new})


def apply_back(view: GateView, host: str, service: str, now: float | None = None) -> GateView:
    """The state after ``host`` comes back serving ``service``'s target; stamps
    ``canaries_done_at`` when it was the last canary."""
    svc = view.services[service]
    new = replace(svc, online={**svc.online, host: svc.target or ""},
                  switching=svc.switching - {host})
    canaries = canary_hosts(svc)
    if canaries and new.canaries_done_at is None and set(canaries) <= new.done():
        new = replace(new, canaries_done_at=view.now if now is None else now)
    return replace(view, services={**view.services, service: new})


def item_done(svc: ServiceState) -> Decision:
    """Is the service's item done: nobody switching, at least quorum (and one) online,
    every online host on the target? Offline hosts do not block (they catch up)."""
    if svc.switching:
        return Decision(False, f"{len(svc.switching)} hosts switching")
    needed = max(1, svc.quorum)
    if len(svc.online) < needed:
        return Decision(False, f"{len(svc.online)} hosts online, fewer than {needed}")
    behind = sorted(h for h, v in svc.online.items() if v != svc.target)
    if behind:
        return Decision(False, f"hosts not on {svc.target}: {', '.join(behind)}")
    return Decision(True, f"all {len(svc.online)} online hosts run {svc.target}")


# --------------------------------------------------------------------------------------
# Prediction (dcdeploy plan)


@dataclass(frozen=True)
class SwitchTiming:
    """One host's switch of one service, as an agent would record it in history:
    seconds to stop the old version, to start the new one, and from started to healthy
    (the health check passing for ``healthy_secs``)."""

    service: str
    host: str
    version: str
    stop_s: float
    start_s: float
    healthy_s: float
    at: float = 0.0

    @property
    def total_s(self) -> float:
        return self.stop_s + self.start_s + self.healthy_s

    @classmethod
    def parse(cls, where: str, data: Mapping[str, Any]) -> SwitchTiming:
        nums = {}
        for name in ("stop_s", "start_s", "healthy_s"):
            value = float(_get(where, data, name, (int, float)))
            if not (math.isfinite(value) and 0 <= value <= 86400):
                raise InvalidData(where, name, f"must be 0..86400 seconds, got {value}")
            nums[name] = value
        return cls(service=check_name(where, "service", _get(where, data, "service", str)),
                   host=check_name(where, "host", _get(where, data, "host", str)),
                   version=_get(where, data, "version", str),
                   at=float(_get(where, data, "at", (int, float), 0.0)), **nums)

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "host": self.host, "version": self.version,
                "stop_s": self.stop_s, "start_s": self.start_s, "healthy_s": self.healthy_s,
                "at": self.at}


def parse_timings(where: str, records: Any) -> tuple[list[SwitchTiming], list[str]]:
    """The valid records of a list read from history, and a problem in words for each
    one that is not (a bad record is reported and left out, never raised)."""
    if not isinstance(records, list):
        return [], [f"{where}: expected a list of switch records, got {type(records).__name__}"]
    good, problems = [], []
    for i, raw in enumerate(records):
        if not isinstance(raw, dict):
            problems.append(f"{where}[{i}]: expected an object, got {raw!r:.40}")
            continue
        try:
            good.append(SwitchTiming.parse(f"{where}[{i}]", raw))
        except InvalidData as exc:
            problems.append(str(exc))
    return good, problems


def batch_seconds(service: str, timings: Iterable[SwitchTiming],
                  healthy_secs: float = 0.0) -> tuple[float, str]:
    """Predicted seconds for one batch of ``service`` and where the number comes from:
    the median stop + start + healthy of its latest :data:`TIMING_WINDOW` switches plus
    the median handoff between them (:func:`handoffs`; one per batch: between batches,
    and the item's own start and completion), or, with none recorded, ``healthy_secs`` +
    :data:`FALLBACK_SWITCH_S`."""
    mine = sorted((t for t in timings if t.service == service), key=lambda t: t.at)
    mine = mine[-TIMING_WINDOW:]
    if not mine:
        return (healthy_secs + FALLBACK_SWITCH_S,
                (f"fallback: healthy_secs {healthy_secs:g} + {FALLBACK_SWITCH_S:g} s "
                 "(no recorded switches)"))
    switch = statistics.median(t.total_s for t in mine)
    gaps = handoffs(mine)
    if not gaps:
        return switch, f"history: median of {len(mine)} switches"
    gap = statistics.median(gaps)
    return (switch + gap, f"history: median of {len(mine)} switches, plus the median "
                          f"handoff {gap:.2f} s of {len(gaps)}")


def handoffs(timings: Iterable[SwitchTiming]) -> list[float]:
    """The idle seconds between switches of one item: for the switches to one version of
    one service, each gap in the union of their intervals (``at`` − total to ``at``),
    while no host of it switched (the next host's wake-up, its gate, the store's round
    trips). Records without ``at`` (0) tell nothing and are left out."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for t in timings:
        if t.at > 0:
            groups.setdefault((t.service, t.version), []).append((t.at - t.total_s, t.at))
    gaps = []
    for spans in groups.values():
        spans.sort()
        reach = spans[0][1]
        for start, end in spans[1:]:
            if start > reach:
                gaps.append(start - reach)
            reach = max(reach, end)
    return gaps


def parallelism(svc: ServiceState) -> tuple[int, dict[str, Any]]:
    """k, the hosts of ``svc`` that may switch at once, and the limits it is the minimum
    of: ``max_parallel``, the room above quorum (online − quorum), and the rack budget
    (``max_down_per_rack`` in one rack with ``rack_order``, else in each rack in use)."""
    room = len(svc.online) - svc.quorum
    limits: dict[str, Any] = {"max_parallel": svc.max_parallel, "quorum_room": room}
    k = min(svc.max_parallel, room)
    budget = svc.policy.max_down_per_rack
    if budget is not None:
        racks = {svc.rack(h) for h in svc.online if svc.online[h] != svc.target}
        rack_limit = budget if svc.policy.rack_order else budget * max(1, len(racks))
        limits["rack_budget"] = rack_limit
        k = min(k, rack_limit)
    return max(k, 0), limits


def predict_item(svc: ServiceState, timings: Iterable[SwitchTiming],
                 healthy_secs: float = 0.0) -> dict[str, Any]:
    """The prediction for one service's item (see docs/policy.md for the fields).

    batches = ceil(N / k) for the N online hosts not on the target; with ``rack_order``
    the racks go one after another, ceil(n_r / k) each; canaries add their own batches
    and the soak. ``blocked`` is set, and the duration is null, when k is 0."""
    behind = sorted(h for h, v in svc.online.items() if v != svc.target)
    k, limits = parallelism(svc)
    per_batch, source = batch_seconds(svc.name, timings, healthy_secs)
    out: dict[str, Any] = {"service": svc.name, "version": svc.target, "hosts": len(behind),
                           "k": k, "limits": limits, "batch_s": per_batch,
                           "timing_source": source, "soak_s": 0.0, "waits_for_approve": False,
                           "blocked": None,
                           "rack_policy": {"max_down_per_rack": svc.policy.max_down_per_rack,
                                           "rack_order": (list(svc.policy.rack_names) or True)
                                           if svc.policy.rack_order else None}}
    if not behind:
        out.update(batches=0, predicted_s=0.0, host_order=[])
        return out
    if k <= 0:
        out.update(batches=None, predicted_s=None, host_order=behind,
                   blocked=f"quorum: {len(svc.online)} online, quorum {svc.quorum}: "
                           "no host may switch")
        return out
    canaries = [h for h in canary_hosts(svc) if h in behind]
    rest = [h for h in behind if h not in canaries]
    batches = math.ceil(len(canaries) / k) if canaries else 0
    if svc.policy.rack_order:
        for rack in rack_sequence(svc):
            n = sum(1 for h in rest if svc.rack(h) == rack)
            batches += math.ceil(n / k)
    else:
        batches += math.ceil(len(rest) / k)
    soak = svc.policy.soak_secs if canaries else 0.0
    order = {r: i for i, r in enumerate(rack_sequence(svc))}
    rest.sort(key=lambda h: (order.get(svc.rack(h), 0) if svc.policy.rack_order else 0, h))
    out.update(batches=batches, soak_s=soak, host_order=canaries + rest,
               waits_for_approve=bool(canaries) and not svc.policy.soak_secs,
               predicted_s=batches * per_batch + soak)
    return out


def plan(view: GateView, timings: Iterable[SwitchTiming] = (),
         healthy_secs: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What ``dcdeploy plan`` prints (``--json``: this dict; schema in docs/policy.md).

    Items in waves; each item starts when the items it waits for (earlier items of its
    own service or of services it depends on) are done, so one bound on the total is the
    longest chain of predicted durations through the waves (``dag_bound_s``). Services
    rolling at once on the same hosts also share each host's ``host_parallel`` slots:
    a host must do every switch it is in, and while a switch of an item allowing N runs,
    at most N run on that host (:func:`admit_take_down`, as the agent's ``host_room``),
    so each switch holds at least 1/N of its host for its batch's seconds; the busiest
    host's sum is the second bound (``host_bound_s``; with one N for every item, its
    batch seconds over N). N is each item's ``host_parallel``, else the view's.
    ``total_s`` is the larger; ``start_s``/``finish_s`` per item follow the DAG only."""
    timings = list(timings)
    healthy_secs = healthy_secs or {}
    specs = view.services
    finish: dict[str, float] = {}
    items_out = []
    wave_list = waves(view.queue, specs)
    total: float | None = 0.0
    series: float | None = 0.0
    load: dict[str, float] = {}
    for w, wave in enumerate(wave_list):
        for item in wave:
            svc = replace(specs[item.service], target=item.version)
            pred = predict_item(svc, timings, healthy_secs.get(item.service, 0.0))
            deps = dependencies(specs, item.service)  # type: ignore[arg-type]
            idx = list(view.queue).index(item)
            after = [b.node for b in view.queue[:idx]
                     if b.node in finish and (b.service == item.service or b.service in deps)]
            start = max((finish[n] for n in after), default=0.0)
            dur = pred["predicted_s"]
            # A blocked item (no duration) makes everything after it unknown: inf inside,
            # null in the output.
            finish[item.node] = start + (dur if dur is not None else math.inf)
            pred.update(item=item.node, wave=w, after=after,
                        start_s=start if math.isfinite(start) else None,
                        finish_s=finish[item.node] if math.isfinite(finish[item.node])
                        else None)
            hp = item_host_parallel(view, item)
            pred["host_parallel"] = hp
            items_out.append(pred)
            for host in pred["host_order"]:  # each switch holds 1/hp of its host at least
                load[host] = load.get(host, 0.0) + pred["batch_s"] / hp
            if dur is None:
                total = series = None
            elif series is not None:
                series += dur
    dag: float | None = None
    busiest: float | None = None
    if total is not None:
        dag = max(finish.values(), default=0.0)
        busiest = max(load.values(), default=0.0)
        total = max(dag, busiest)
    return {"schema": 1,
            "host_parallel": view.host_parallel,
            "waves": [[i.node for i in wave] for wave in wave_list],
            "items": items_out,
            "blocked": [{"item": i.node, "service": i.service, "reason": why}
                        for i, why in blocked_items(view.queue, specs)
                        if not any(i.node == o["item"] for o in items_out)],
            "dag_bound_s": dag,
            "host_bound_s": busiest,
            "total_s": total,
            "series_s": series}
