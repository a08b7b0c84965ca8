"""Canaries at the gate (issue 10 item 3, docs/policy.md "Canaries, as wired").

Pure functions of a :class:`decisions.ServiceView` and the head deploy item; the agent
does the I/O. A deploy item with ``canary`` N holds every host but its canaries back:

1. the canaries are the first N hosts spread over racks (:func:`policy.canary_hosts`),
   chosen by the first host to pass the gate and recorded in the item in that same commit
   (so they do not move when hosts come and go);
2. while the hold lasts, only canaries may pass the gate, and ``max_parallel`` counts
   positions among the canaries' ready-queue entries (a non-canary ahead in the queue must
   not take a canary's slot: that would deadlock);
3. the hold ends on ``dcdeploy approve`` or ``soak_secs`` after the last canary serves the
   target (``canaries_done_at``, stamped by a canary); with ``soak_secs`` 0, only approval
   ends it;
4. during the hold each canary checks its own health; a failure marks the item failed with
   ``rollback`` set, and every canary on the target goes back to its previous version,
   through the gate (quorum holds for the way back too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .decisions import Decision, ServiceView, may_take_down, online_count
from .model import ACTIVE_STATES, DeployItem
from .policy import Policy, canary_hosts, service_state


@dataclass(frozen=True)
class Hold:
    """What the canary rule says for one host at one moment.

    ``holding``: non-canaries may not pass. ``refusal``: this host may not pass the gate
    (None: ask :func:`decisions.may_take_down` with ``view``, whose ready queue holds only
    the canaries' entries while holding). ``record``: the canary set to write into the
    item with the gate commit (empty: already recorded or no canaries). ``soak_ends``:
    when the hold ends by itself (None: not known yet, or only approval ends it)."""

    canaries: tuple[str, ...]
    holding: bool
    reason: str
    view: ServiceView
    refusal: Decision | None = None
    record: tuple[str, ...] = ()
    soak_ends: float | None = None


def gate_decision(hold: Hold, host: str, active: str | None) -> Decision:
    """The canary rule's refusal, else the usual gate on the canary-filtered view."""
    if hold.refusal is not None:  # a Decision is falsy when it refuses: test for None
        return hold.refusal
    return may_take_down(hold.view, host, active)


def item_of(view: ServiceView) -> DeployItem | None:
    """The head item when it is this service's and active."""
    head = view.head
    if head is None or head.service != view.service or head.state not in ACTIVE_STATES:
        return None
    return head


def choose(view: ServiceView, item: DeployItem) -> tuple[str, ...]:
    """The recorded canaries, else the first ``item.canary`` hosts not offline, spread
    over racks."""
    if item.canaries:
        return item.canaries
    state = service_state(view, Policy(canary=item.canary), item.version)
    return canary_hosts(state)


def needs_choice(view: ServiceView) -> bool:
    """The head item has canaries not chosen yet: the choice needs every presence's rack
    (resolve the view first; the mirror reads other hosts' presences lazily)."""
    item = item_of(view)
    return item is not None and item.canary > 0 and not item.canaries and not item.approved


def serving_target(view: ServiceView, hosts: tuple[str, ...], target: str) -> list[str]:
    return [h for h in hosts if (e := view.current.get(h)) is not None and e.version == target]


def hold(view: ServiceView, host: str, now: float) -> Hold:
    """The canary rule for ``host`` on ``view`` at ``now`` (see the module docstring)."""
    item = item_of(view)
    if item is None or item.canary <= 0:
        return Hold((), False, "no canaries", view)
    canaries = choose(view, item)
    record = () if item.canaries else canaries
    names = ", ".join(canaries) or "(none)"
    if item.approved:
        return Hold(canaries, False, f"canaries {names} approved", view)
    if not canaries:
        return _holding(view, host, canaries, record, None,
                        f"canary: no host of {view.service} is online to be a canary")
    # Once stamped, every canary served the target: other hosts' views may not hold the
    # canaries' presence values (the mirror reads them lazily), the stamp says it.
    pending = [] if item.canaries_done_at is not None else \
        [h for h in canaries if h not in serving_target(view, canaries, item.version)]
    if pending:
        return _holding(view, host, canaries, record, None,
                        f"canary: waiting for {', '.join(pending)} to serve {item.version}")
    if not item.soak_secs:
        return _holding(view, host, canaries, record, None,
                        f"canary: {names} on {item.version}, holding until approved "
                        f"(dcdeploy approve {view.service})")
    if item.canaries_done_at is None:
        return _holding(view, host, canaries, record, None,
                        f"canary: {names} on {item.version}, soak starting")
    ends = item.canaries_done_at + item.soak_secs
    if now < ends:
        return _holding(view, host, canaries, record, ends,
                        f"canary: soaking, {ends - now:.0f} s of {item.soak_secs:g} s left "
                        f"(or dcdeploy approve {view.service})")
    return Hold(canaries, False, f"canary: soaked {item.soak_secs:g} s on {names}", view,
                soak_ends=ends)


def _holding(view: ServiceView, host: str, canaries: tuple[str, ...],
             record: tuple[str, ...], ends: float | None, reason: str) -> Hold:
    if host not in canaries:
        return Hold(canaries, True, reason, view, refusal=Decision(False, reason),
                    soak_ends=ends)
    only = replace(view, staging=[e for e in view.staging if e.host in canaries])
    return Hold(canaries, True, reason, only, record=record, soak_ends=ends)


def should_stamp(view: ServiceView) -> bool:
    """Every canary serves the target and ``canaries_done_at`` is not set yet: the soak
    starts now (the view must have every presence's value: resolve it first)."""
    item = item_of(view)
    return (item is not None and item.canary > 0 and bool(item.canaries)
            and item.canaries_done_at is None and not item.approved
            and len(serving_target(view, item.canaries, item.version)) == len(item.canaries))


def soaking(view: ServiceView, host: str, now: float) -> bool:
    """``host`` is a canary serving the target while the hold lasts: it checks its own
    health continuously, and a failure fails the item (with rollback)."""
    item = item_of(view)
    if item is None or host not in item.canaries:
        return False
    entry = view.current.get(host)
    if entry is None or entry.version != item.version:
        return False
    return hold(view, host, now).holding


def failed_in_hold(view: ServiceView, host: str, active: str | None, now: float) -> bool:
    """``host``, a canary whose service stopped running while on the item's version during
    the hold: the canary failed (recovery would quietly start the old version, and the
    soak must not then pass as if the release had held)."""
    item = item_of(view)
    return (item is not None and item.canary > 0 and host in item.canaries
            and active == item.version and hold(view, host, now).holding)


def rollback_item(view: ServiceView) -> DeployItem | None:
    """The head item of this service when it failed during a canary hold (``rollback``):
    its canaries go back to their previous version."""
    head = view.head
    if head is None or head.service != view.service or head.state != "failed" \
            or not head.rollback:
        return None
    return head


def may_roll_back(view: ServiceView, host: str, active: str | None,
                  previous: str | None) -> Decision:
    """May canary ``host`` take itself down now to go back to ``previous``? Only when the
    item failed during the hold, the host is one of its canaries and runs the item's
    version, a previous version is known, and (if online) the others keep quorum."""
    item = rollback_item(view)
    if item is None:
        return Decision(False, "no canary rollback")
    if host not in item.canaries:
        return Decision(False, f"{host} is not a canary of {item.node}")
    if active != item.version:
        return Decision(False, f"not on {item.version}")
    if previous is None or previous == item.version:
        return Decision(False, f"no previous version to go back to from {item.version}")
    if view.spec is None:
        return Decision(False, f"service {view.service} is not defined")
    if host in view.current and online_count(view) - 1 < view.spec.quorum:
        return Decision(False, f"canary rollback: {online_count(view)} online, quorum "
                               f"{view.spec.quorum}")
    return Decision(True, f"canary rollback of {item.node}: back to {previous}")
