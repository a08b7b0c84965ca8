"""Rollout decisions as pure functions of an immutable snapshot.

Nothing here does I/O: the agent reads a :class:`ServiceView` from the store, asks these
functions what to do, and performs the answer at the edge. Each answer carries a reason in
words, which the agent logs and ``dcdeploy status`` shows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from .model import (ACTIVE_STATES, CurrentEntry, DeployItem, HostInfo, ServiceSpec,
                    StagedRelease, StagingEntry, version_key)


@dataclass(frozen=True)
class ServiceView:
    """Everything one agent needs to decide for one service, read once per cycle."""

    service: str
    spec: ServiceSpec | None
    staged: StagedRelease | None
    current: Mapping[str, CurrentEntry]  # online hosts
    staging: Sequence[StagingEntry]  # ready-to-roll queue, in sequence order
    queue: Sequence[DeployItem]  # the whole deploy queue, in sequence order
    hosts: Mapping[str, HostInfo] = field(default_factory=dict)  # registry, for "offline"
    gate_version: int = -1
    released: str | None = None  # last version whose deploy item completed (catch-up target)
    invalid: Sequence[str] = ()  # problems found parsing this service's nodes
    spec_version: int = -1  # the store's version of the spec, checked by the gate commit

    @property
    def head(self) -> DeployItem | None:
        """The deploy item this service acts on (:func:`item_for`)."""
        return item_for(self.queue, self.service)

    def offline_hosts(self) -> list[str]:
        return sorted(h for h, info in self.hosts.items()
                      if self.service in info.services and h not in self.current)


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def waits_for(item: DeployItem, ahead: DeployItem) -> bool:
    """Must ``item`` wait for ``ahead`` (earlier in the queue, not done) to be done?

    For an item of the same service, or of a service in the item's ``after`` (every
    service it depends on, recorded by ``dcdeploy deploy``): yes. An item without
    ``after`` (written by hand) waits for every item ahead: the queue in series."""
    if ahead.service == item.service or item.after is None:
        return True
    return ahead.service in item.after


def item_for(queue: Sequence[DeployItem], service: str) -> DeployItem | None:
    """The item ``service`` acts on: its first item in the queue, unless an item ahead
    of it blocks it (an invalid item, or one it waits for: :func:`waits_for`), which is
    then returned instead (so :func:`rollout_target` says what it waits for). With no
    item of ``service`` queued, the first item (None: the queue is empty).

    Independent items roll at the same time; S2 holds per dependency edge: no host of B
    switches while an item of A, which B depends on, is ahead of B's item."""
    mine = next((i for i, item in enumerate(queue)
                 if item.service == service and item.state not in ("done", "aborted")), None)
    if mine is None:
        return queue[0] if queue else None
    for ahead in queue[:mine]:
        if ahead.state in ("done", "aborted"):
            continue
        if ahead.state == "invalid" or waits_for(queue[mine], ahead):
            return ahead
    return queue[mine]


def online_count(view: ServiceView) -> int:
    return sum(1 for entry in view.current.values() if entry.state == "serving")


def quorum_reason(view: ServiceView) -> str:
    online = online_count(view)
    quorum = view.spec.quorum if view.spec else 0
    offline = len(view.offline_hosts())
    return f"quorum: {online} online, quorum {quorum}, {offline} hosts offline"


def ready_queue(view: ServiceView, version: str) -> list[StagingEntry]:
    """Staging entries for ``version``, one per host (its earliest), in queue order."""
    seen: set[str] = set()
    out = []
    for entry in sorted(view.staging, key=lambda e: e.seq):
        if entry.version == version and entry.host not in seen:
            seen.add(entry.host)
            out.append(entry)
    return out


def only_switching_left(view: ServiceView, version: str, me: str) -> bool:
    """Is every other host in the ready queue for ``version`` mid-switch (its entry there,
    its presence gone), with at least one? A host whose switch just ended then keeps the
    duty to complete the item: one of those hosts ends last, but it may see this host
    still queued, this host's leaving not yet in its view. A host still waiting in the
    queue switches after this one and completes the item itself."""
    others = [e for e in ready_queue(view, version) if e.host != me]
    return bool(others) and all(e.host not in view.current for e in others)


def rollout_target(view: ServiceView) -> tuple[str | None, str]:
    """The version this service is rolling to now, and why (None: nothing to roll).

    Rolling happens for this service's item when no item it waits for is ahead of it
    (:func:`item_for`), so a service is never switched while an item of a service it
    depends on is not done (S2, per dependency edge). With the queue empty,
    hosts left behind (offline when the item completed) catch up to the released version,
    through the same gate (L2)."""
    head = view.head
    staged = view.staged
    if head is not None:
        if head.state == "invalid":
            return None, f"deploy queue blocked at {head.node}: {head.reason}"
        if head.service != view.service:
            return None, f"waiting for {head.service} {head.version} ({head.node}) to finish"
        if head.state not in ACTIVE_STATES:
            return None, f"deploy {head.node} is {head.state}" + (
                f": {head.reason}" if head.reason else "")
        if staged is None or staged.version != head.version:
            have = staged.version if staged else "nothing"
            return None, (f"deploy {head.node} wants {head.version} but {have} is staged: "
                          "stage it, or abort the deploy")
        return head.version, f"deploy {head.node}"
    if staged is not None and view.released == staged.version:
        return staged.version, f"catch up with released version {staged.version}"
    return None, "no deploy queued"


def override_racks(policy: Any, item: DeployItem | None) -> Any:
    """``policy`` (a spec's :class:`policy.Policy`) with the rack budget and rack order of
    deploy ``item`` in place of its own where the item sets them (``dcdeploy deploy
    --max-down-per-rack K --rack-order [R1,R2,...]``)."""
    if item is None:
        return policy
    changes: dict[str, Any] = {}
    if item.max_down_per_rack is not None:
        changes["max_down_per_rack"] = item.max_down_per_rack
    if item.rack_order:
        changes.update(rack_order=True, rack_names=item.rack_names)
    return replace(policy, **changes) if changes else policy


def rack_policy(view: ServiceView) -> Any:
    """The rack policy in force for the service now: the spec's, overridden by the deploy
    item it acts on when that item is its own. The gate decides on it after its synced
    read and commits against the item's version (a CAS or a check of the item), so the
    override is part of the same atomic commit as the quorum."""
    assert view.spec is not None
    head = view.head
    return override_racks(view.spec.policy,
                          head if head is not None and head.service == view.service else None)


def needs_racks(view: ServiceView) -> bool:
    """Does the service's policy decide on racks (a rack budget or a rack order)? Then
    every ready-queue entry's and presence's rack must be known (read) before deciding."""
    if view.spec is None:
        return False
    policy = rack_policy(view)
    return policy.max_down_per_rack is not None or bool(policy.rack_order)


def entry_rack(view: ServiceView, entry: StagingEntry) -> str:
    """A queued host's rack: from its ready-queue entry, else its presence ("": unknown,
    which is a rack of its own)."""
    if entry.rack:
        return entry.rack
    present = view.current.get(entry.host)
    return present.rack if present else ""


def rack_turn(view: ServiceView, target: str) -> tuple[str | None, str]:
    """With ``rack_order``: the rack whose hosts may switch now, and why (None: no order).

    Racks go in the order the policy names, then the others sorted; a rack is done when
    none of its hosts is queued or switching for ``target`` and every online host of it
    runs ``target``. Offline hosts do not hold their rack back (they catch up)."""
    policy = rack_policy(view) if view.spec else None
    if policy is None or not policy.rack_order:
        return None, "no rack order"
    queued = ready_queue(view, target)
    pending: dict[str, set[str]] = {}
    for entry in queued:
        pending.setdefault(entry_rack(view, entry), set()).add(entry.host)
    for host, entry in view.current.items():
        rack = pending.setdefault(entry.rack, set())
        if entry.version != target:
            rack.add(host)
    present = set(pending)
    order = [r for r in policy.rack_names if r in present] + sorted(present - set(policy.rack_names))
    for rack in order:
        if pending[rack]:
            done = order[:order.index(rack)]
            return rack, (f"rack order: rack {rack or '(none)'}'s turn" +
                          (f" ({', '.join(r or '(none)' for r in done)} done)" if done else ""))
    return None, "rack order: every rack done"


def admission(view: ServiceView, target: str) -> dict[str, str | None]:
    """Every host queued for ``target``: None when it may pass the gate now (or is
    switching already), else why not.

    Queued hosts without a presence (switching, or not serving anyway) come first: each
    holds a slot of ``max_parallel`` and counts as down in its rack; the first
    ``max_parallel`` of them may pass (taking them down costs no serving host). Then, in
    queue order, each serving host takes a free slot unless its rack is at its budget
    (``max_down_per_rack``, counting the hosts down and those ahead of it that may go) or
    it is not its rack's turn (``rack_order``); such a host is skipped and takes no slot,
    so hosts behind it in other racks may go. Hosts down or admitted never exceed
    ``max_parallel``, nor those of one rack its budget."""
    assert view.spec is not None
    queue = ready_queue(view, target)
    slots = view.spec.max_parallel
    budget = rack_policy(view).max_down_per_rack
    turn, turn_why = rack_turn(view, target)
    down: Counter[str] = Counter()
    out: dict[str, str | None] = {}
    for position, entry in enumerate(queue):
        if entry.host not in view.current:
            out[entry.host] = None if slots > 0 else (
                f"queue position {position + 1}, max_parallel {view.spec.max_parallel}")
            down[entry_rack(view, entry)] += 1
            slots -= 1
    for position, entry in enumerate(queue):
        if entry.host in out:
            continue
        rack = entry_rack(view, entry)
        if budget is not None and down[rack] >= budget:
            out[entry.host] = (f"rack budget: rack {rack or '(none)'} has {down[rack]} "
                               f"switching or ahead, max_down_per_rack {budget}")
        elif turn is not None and rack != turn:
            out[entry.host] = turn_why
        elif slots <= 0:
            out[entry.host] = (f"queue position {position + 1}, max_parallel "
                               f"{view.spec.max_parallel}")
        else:
            out[entry.host] = None
            down[rack] += 1
            slots -= 1
    return out


def may_take_down(view: ServiceView, host: str, local_version: str | None,
                  switching_here: Mapping[str, int] | Sequence[str] = ()) -> Decision:
    """May ``host`` take itself down now to switch to the rollout target?

    True only when: there is a target; this host runs something else; the host switches
    fewer than ``host_parallel`` other services now (:func:`host_room`; the item's
    setting, default 1); :func:`admission` lets its ready-queue entry pass (within
    ``max_parallel``, its rack's budget and turn); and, if it is online, taking it away
    leaves at least ``quorum`` online. The caller must re-check this on a synced read and
    commit through the gate CAS (the snapshot may be stale by then)."""
    if view.spec is None:
        return Decision(False, f"service {view.service} is not defined")
    target, why = rollout_target(view)
    if target is None:
        return Decision(False, why)
    if local_version == target:
        return Decision(False, f"already on {target}")
    room = host_room(view, switching_here)
    if not room:
        return room
    verdicts = admission(view, target)
    if host not in verdicts:
        return Decision(False, f"not ready for {target} (not in the staging queue)")
    if verdicts[host] is not None:
        return Decision(False, verdicts[host])
    if host in view.current:
        online = online_count(view)
        if online - 1 < view.spec.quorum:
            return Decision(False, quorum_reason(view))
    budget = rack_policy(view).max_down_per_rack
    return Decision(True, f"{why}: take-down to {target} keeps quorum {view.spec.quorum}" + (
        f" and rack {entry_rack_of(view, host) or '(none)'} within max_down_per_rack {budget}"
        if budget is not None else ""))


def entry_rack_of(view: ServiceView, host: str) -> str:
    entry = next((e for e in view.staging if e.host == host), None)
    if entry is not None:
        return entry_rack(view, entry)
    present = view.current.get(host)
    return present.rack if present else ""


def host_parallel(view: ServiceView) -> int:
    """How many of its services a host may switch at once while this service's item
    rolls: the item's ``host_parallel`` (``dcdeploy deploy --host-parallel N``), else 1."""
    head = view.head
    if head is not None and head.service == view.service and head.host_parallel:
        return head.host_parallel
    return 1


def host_room(view: ServiceView,
              switching_here: Mapping[str, int] | Sequence[str] = ()) -> Decision:
    """May this host start a switch of ``view.service`` while it switches the services in
    ``switching_here``? Given as {service: the ``host_parallel`` of the item that switch is
    for}, or as names (their limit taken as this item's). The host may have at most
    ``min`` of its own item's limit and every running switch's limit down at once: a deploy
    that asked for one service down at a time is not overruled by a later one asking for
    more. ``view.service`` itself is not counted (the agent runs one switch of a service
    at a time and does not ask for a service it is switching)."""
    limits = dict(switching_here) if isinstance(switching_here, Mapping) else \
        {s: host_parallel(view) for s in switching_here}
    limits.pop(view.service, None)
    limit = min([host_parallel(view), *limits.values()])
    if len(limits) >= limit:
        return Decision(False, f"host_parallel {limit}: this host is switching "
                               f"{', '.join(sorted(limits))}")
    return Decision(True, f"host_parallel {limit}: {len(limits)} other service"
                          f"{'' if len(limits) == 1 else 's'} switching here")


def watch_width(view: ServiceView) -> int:
    """How many ready-queue entries from the front may be let through as others leave:
    ``max_parallel``, or the whole queue under a rack policy (a host far back may be the
    next one admitted when a rack frees up)."""
    if view.spec is None:
        return 1
    if needs_racks(view):
        return max(len(view.staging), view.spec.max_parallel)
    return view.spec.max_parallel


def most_popular(entries: Iterable[CurrentEntry], target: str | None = None) -> str | None:
    """The version most online hosts run; ties go to ``target``, then to the newer version."""
    counts = Counter(e.version for e in entries if e.state == "serving")
    if not counts:
        return None
    best = max(counts.values())
    tied = [v for v, n in counts.items() if n == best]
    if target in tied:
        return target
    return max(tied, key=version_key)


def item_complete(view: ServiceView) -> Decision:
    """Is the head deploy item (which must be this service's) done?

    Done when nobody is queued or mid-switch for it (a switching host keeps its staging entry
    until it is back), at least quorum hosts (and at least one) are online, and every online
    host runs the version.
    Offline hosts do not block (L2): they catch up when they return."""
    head = view.head
    if head is None or head.service != view.service or head.state not in ACTIVE_STATES:
        return Decision(False, "not the head item")
    if ready_queue(view, head.version):
        return Decision(False, f"{len(ready_queue(view, head.version))} hosts queued or switching")
    # At least quorum hosts must be back: after an outage longer than the session timeout
    # every presence is gone at once, and the first host back must not see itself alone
    # on the new version and call the deploy done.
    needed = max(1, view.spec.quorum if view.spec else 1)
    if len(view.current) < needed:
        return Decision(False, f"{len(view.current)} hosts online, fewer than "
                               f"{'quorum ' + str(needed) if needed > 1 else 'one'}")
    behind = sorted(h for h, e in view.current.items() if e.version != head.version)
    if behind:
        return Decision(False, f"hosts not on {head.version}: {', '.join(behind)}")
    return Decision(True, f"all {len(view.current)} online hosts run {head.version}")


def recovery_version(current: Iterable[CurrentEntry], installed: Iterable[str],
                     local_active: str | None, target: str | None = None) -> tuple[str | None, str]:
    """Which version a host whose service is not running should start, and why.

    The most popular version online, when it is installed here; else the version this host
    last ran; else any installed version (newest). With the store unreachable pass no
    ``current``: the local state decides (L3)."""
    installed = set(installed)
    current = list(current)
    popular = most_popular(current, target)
    if popular is not None and popular in installed:
        return popular, f"most popular version online is {popular}"
    # A tie: the tie-break's winner may not be here yet (the head's target, still to be
    # fetched) while another version as popular is; that one beats going back to the last
    # active version (seen in chaos seed 2027 trial 20: 22 and 21 tied, 21 installed, 20
    # started).
    counts = Counter(e.version for e in current if e.state == "serving")
    tied = [v for v, n in counts.items() if counts and n == max(counts.values())]
    for version in sorted(tied, key=version_key, reverse=True):
        if version in installed:
            return version, f"most popular version online is {version} (tied with {popular}, " \
                            "which is not installed here yet)"
    if local_active is not None and local_active in installed:
        why = f"last active version {local_active}"
        if popular is not None:
            why += f" (most popular {popular} is not installed here yet)"
        return local_active, why
    if installed:
        newest = max(installed, key=version_key)
        return newest, f"newest installed version {newest}"
    return None, "no release installed"


def resumed_hold(since: float | None, healthy: bool, now: float,
                 healthy_secs: float) -> tuple[float | None, bool]:
    """The hold of a version this host runs but never recorded verified: its agent was
    killed or stopped during the switch's hold (docs/design.md §4.4, §4.7). The hold starts
    again when the agent is back and first sees the version healthy, starts over at any
    failed check, and verifies the version once it has lasted ``healthy_secs``. Returns
    (when the hold began, or None; whether the version is now verified).

    Without this a version that went on serving (registered, counted by the rollout) stayed
    unverified for good, and an isolated reboot later started the version before it (chaos
    seed 1806 trial 6: b 6 on h2, with the fleet on 7 and 8)."""
    if not healthy:
        return None, False
    if since is None:
        since = now
    return since, now - since >= healthy_secs


def deploy_status(view: ServiceView, item: DeployItem) -> tuple[str, str | None]:
    """How ``dcdeploy status`` shows a queue item: its stored state, or ``blocked`` with the
    reason when it is the active head and nothing can move."""
    if item.state not in ACTIVE_STATES or view.head is None or view.head.node != item.node:
        return item.state, item.reason
    target, why = rollout_target(view)
    if target is None:
        return "blocked", why
    if view.spec is None:
        return "blocked", f"service {view.service} is not defined"
    first = ready_queue(view, target)[: view.spec.max_parallel]
    switching = [e for e in first if e.host not in view.current]
    if first and not switching and online_count(view) - 1 < view.spec.quorum:
        return "blocked", quorum_reason(view)
    complete = item_complete(view)
    if not first and not complete:
        failed = verify_failures(view, target)
        if failed:
            return "blocked", (f"{len(failed)} hosts failed to verify {target}: " + "; ".join(
                f"{h}: {why}" for h, why in sorted(failed.items())))
        waiting = f"waiting for hosts to download and verify ({complete.reason})"
        failing = download_failures(view, target)
        if failing:  # a dead URL or a full disk may heal: not blocked, but say why it waits
            named = sorted(failing.items())[:SHOWN_FAILURES]
            waiting += (f"; {len(failing)} hosts failed to download {target} and retry: "
                        + "; ".join(f"{h}: {why}" for h, why in named)
                        + (f"; and {len(failing) - len(named)} more"
                           if len(failing) > len(named) else ""))
        return ("rolling" if item.state == "rolling" else item.state), waiting
    return ("rolling" if item.state == "rolling" or switching else item.state), None


def verify_failures(view: ServiceView, version: str) -> dict[str, str]:
    """Hosts that should fetch ``version`` and all reported failing to, with their errors;
    empty while any of them has not (yet) failed.

    The hosts that should have it are those online for the service not yet on ``version``;
    each reports its download in the host registry (``fetch``: version, state, error, and
    ``kind`` "verify" when the bytes did not match the staged sha256 or size), and keeps the
    last error while it retries. Only verification failures count: a full disk or a dead
    URL may heal by itself, bytes that do not match never will, so with every host failing
    to verify no host will ever join the ready queue and the item is blocked until a
    release that verifies is staged (abort, then stage and deploy it)."""
    expected = sorted(h for h, e in view.current.items() if e.version != version)
    failed: dict[str, str] = {}
    for host in expected:
        info = view.hosts.get(host)
        fetch = (info.fetch.get(view.service) if info else None) or {}
        if not isinstance(fetch, dict) or fetch.get("version") != version \
                or fetch.get("kind") != "verify" or not fetch.get("error") \
                or fetch.get("state") == "installed":
            return {}
        failed[host] = str(fetch["error"])
    return failed


SHOWN_FAILURES = 5  # hosts named in a waiting deploy's reason (the count covers all)


def download_failures(view: ServiceView, version: str) -> dict[str, str]:
    """Hosts that should fetch ``version`` whose last download of it failed (any kind:
    network, disk, bytes), with their errors, as they report them in the host registry.
    Unlike :func:`verify_failures` one host is enough: it is shown, not acted on."""
    failed: dict[str, str] = {}
    for host in sorted(h for h, e in view.current.items() if e.version != version):
        info = view.hosts.get(host)
        fetch = (info.fetch.get(view.service) if info else None) or {}
        if isinstance(fetch, dict) and fetch.get("version") == version and \
                fetch.get("error") and fetch.get("state") != "installed":
            failed[host] = str(fetch["error"])
    return failed


class DependencyError(ValueError):
    pass


def check_acyclic(specs: Mapping[str, ServiceSpec]) -> None:
    """Raise :class:`DependencyError` naming a cycle or an undefined dependency."""
    for name, spec in specs.items():
        for dep in spec.depends_on:
            if dep not in specs:
                raise DependencyError(
                    f'service "{name}" depends on "{dep}", which is not defined '
                    f"(define it with: dcdeploy service set {dep} ...)")
    state: dict[str, int] = {}  # 1: on the path, 2: finished

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in specs[name].depends_on:
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise DependencyError("dependency cycle: " + " -> ".join(cycle))
            if state.get(dep) is None:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(specs):
        if name not in state:
            visit(name, [name])


def dependencies(specs: Mapping[str, ServiceSpec], name: str) -> set[str]:
    """Every service ``name`` depends on, directly or not."""
    out: set[str] = set()
    todo = list(specs[name].depends_on)
    while todo:
        dep = todo.pop()
        if dep not in out:
            out.add(dep)
            todo.extend(specs[dep].depends_on if dep in specs else ())
    return out


def deploy_order(specs: Mapping[str, ServiceSpec], staged: Mapping[str, StagedRelease | None],
                 requested: Sequence[str], queued: Sequence[DeployItem] = ()) -> list[str]:
    """Order ``requested`` so that A comes before B when B depends on A.

    Raises :class:`DependencyError` for an unknown or unstaged service, a cycle, a request
    naming a service twice, or one that would queue a service after a queued item that
    depends on it."""
    if not requested:
        raise DependencyError("name at least one service to deploy")
    for name in requested:
        if name not in specs:
            raise DependencyError(f'service "{name}" is not defined '
                                  f"(define it with: dcdeploy service set {name} ...)")
        if staged.get(name) is None:
            raise DependencyError(f'service "{name}" has no staged release '
                                  f"(stage one with: dcdeploy stage {name} VERSION --url ...)")
    dupes = sorted(n for n, c in Counter(requested).items() if c > 1)
    if dupes:
        raise DependencyError(f"service named twice: {', '.join(dupes)}")
    check_acyclic(specs)
    pending = [i for i in queued if i.state not in ("done", "aborted")]
    for item in pending:
        if item.service in requested:
            raise DependencyError(f'service "{item.service}" is already queued ({item.node}, '
                                  f"{item.version}, {item.state}): wait for it, or abort")
        if item.service in specs:
            for name in requested:
                if name in dependencies(specs, item.service):
                    raise DependencyError(
                        f'"{item.service}" (queued as {item.node}) depends on "{name}": '
                        f"deploying {name} after it would break the dependency order; "
                        f"abort and deploy both: dcdeploy deploy {name} {item.service}")
    want = set(requested)
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(requested):
        ready = sorted(n for n in want - placed
                       if not (dependencies(specs, n) & (want - placed)))
        order.append(ready[0])
        placed.add(ready[0])
    return order
