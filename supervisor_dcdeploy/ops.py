"""Operator actions on the store: the Python API behind the ``dcdeploy`` CLI.

Every function validates its input first and raises :class:`OpError` with a sentence an
operator can act on; writes that must go together go in one transaction."""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Sequence
from typing import Any, TypeVar

from . import decisions, trust
from .model import (DeployItem, HealthCheck, HostInfo, InvalidData, ServiceSpec,
                    StagedRelease, check_name, check_version, dumps, load_json)
from .snapshot import (checked_view, read_current, read_hosts, read_queue, read_spec, read_specs,
                       read_staged, read_staging, read_view)
from .store import Create, Delete, NoNode, Store, StoreError, TransactionFailed, layout

HISTORY_CAP = 1000
RAW_KEPT = 512  # bytes of an unreadable item kept in its history record


class OpError(Exception):
    pass


Signed = TypeVar("Signed", ServiceSpec, StagedRelease, DeployItem)


def signer_or_default(signer: trust.Signer | None) -> trust.Signer | None:
    """``signer``, else the key named by ``$DCDEPLOY_SIGN_KEY``, else None (unsigned)."""
    if signer is not None:
        return signer
    try:
        return trust.default_signer()
    except trust.TrustError as exc:
        raise OpError(str(exc)) from None


def _sign(value: Signed, signer: trust.Signer | None, expires: float | None,
          previous: list[ServiceSpec | StagedRelease | DeployItem]) -> Signed:
    """``value`` with the operator's signature (unchanged without a key). The counter is
    above every counter in ``previous`` (what the store holds now) that this key signed:
    a value that does not verify with our own key cannot push the counter anywhere."""
    if signer is None:
        return value
    own = {signer.keyid: signer.public}
    counters = [trust.signature_counter(p.signature) for p in previous
                if p.signature is not None and
                trust.verify(trust.payload_of(p), p.signature, own, 0.0, None)]
    now = time.time()
    kind = trust.payload_of(value)["kind"]
    lifetime = expires if expires is not None else trust.DEFAULT_EXPIRES[kind]
    try:
        counter = trust.next_counter(now, max((c for c in counters if c is not None),
                                              default=None))
    except trust.TrustError as exc:
        raise OpError(str(exc)) from None
    return replace(value, signature=trust.sign(signer, trust.payload_of(value), counter,
                                               now + lifetime))


def _check_staged(release: StagedRelease, signer: trust.Signer | None) -> None:
    """Refuse to sign a deploy item for a staged release the operator's own key does not
    vouch for: whoever wrote the store could have put an unsigned, forged or old release
    there, and a signed item would make it look chosen by the operator."""
    if signer is None:
        return
    verdict = trust.verify(trust.payload_of(release), release.signature,
                           {signer.keyid: signer.public}, time.time(), None)
    if not verdict:
        raise OpError(f'the staged release of "{release.service}" ({release.version}) does '
                      f"not verify with your key {signer.keyid}: {verdict.reason}; stage "
                      f"it again with your key: dcdeploy stage {release.service} "
                      f"{release.version} ...")


def _ensure_service_nodes(store: Store, svc: str) -> None:
    for base in layout.PER_SERVICE:
        store.ensure(f"{base}/{svc}")
    for path in (layout.DEPLOY, layout.HISTORY, layout.HOSTS):
        store.ensure(path)


def init(store: Store, hosts: dict[str, str], previous_operator: Any = None) -> int:
    """``dcdeploy init``: set up the store's access control with this session's identity as
    the operator and ``hosts`` (host name -> credential id) as the hosts; create the
    top-level nodes, every defined service's nodes and each host's registry entry. Safe to
    run again (to add or revoke hosts). ``previous_operator`` (an identity) is the one
    being replaced: its rights are used once to hand everything to the new one.
    Returns how many nodes were created or changed."""
    if previous_operator is not None:
        add_identity = getattr(store, "add_identity", None)
        if add_identity is None:
            raise OpError("this store backend has no operator identity to rotate")
        add_identity(previous_operator)
    for name in hosts:
        try:
            check_name("init", "host", name)
        except InvalidData as exc:
            raise OpError(str(exc)) from None
    initial = {path: b"" for path in (layout.SERVICES, *layout.PER_SERVICE, *layout.TOP_LEVEL)}
    if store.exists(layout.SERVICES) is not None:
        for svc in store.children(layout.SERVICES):
            for base in layout.PER_SERVICE:
                initial[f"{base}/{svc}"] = b""
    for name in hosts:
        initial[layout.host(name)] = HostInfo(name).to_json()
    return store.secure(hosts, initial)


def service_set(store: Store, name: str, *, program: str | None, quorum: int,
                depends_on: list[str] | tuple[str, ...] = (), max_parallel: int = 1,
                health: HealthCheck | None = None, healthy_secs: float = 0.0,
                preload: bool = False, signer: trust.Signer | None = None,
                expires: float | None = None, policy: Any = None,
                verify_peers: bool = False) -> ServiceSpec:
    """Define or replace a service. Refuses an undefined dependency or a cycle.
    ``policy``: a :class:`policy.Policy` (rack budget, rack order...), default none.

    Signed with ``signer`` (default: ``$DCDEPLOY_SIGN_KEY``), valid for ``expires``
    seconds (default: trust.DEFAULT_EXPIRES); unsigned when there is no key."""
    try:
        check_name("service", "name", name)
        raw = dumps({"program": program or name, "quorum": quorum,
                     "depends_on": list(depends_on), "max_parallel": max_parallel,
                     "health": (health or HealthCheck()).to_dict(),
                     "healthy_secs": healthy_secs, "preload": preload,
                     **(policy.to_dict() if policy is not None else {}),
                     **({"verify_peers": True} if verify_peers else {})})
        spec = ServiceSpec.parse(name, raw, where=f"service {name}")
    except InvalidData as exc:
        raise OpError(str(exc)) from None
    specs, _ = read_specs(store)
    specs[name] = spec
    try:
        for dep in spec.depends_on:
            if dep not in specs:
                raise decisions.DependencyError(
                    f'service "{name}" depends on "{dep}", which is not defined '
                    f"(define it with: dcdeploy service set {dep} ...)")
        decisions.check_acyclic({k: v for k, v in specs.items()})
    except decisions.DependencyError as exc:
        raise OpError(str(exc)) from None
    old, _ = read_spec(store, name)
    spec = _sign(spec, signer_or_default(signer), expires, [old] if old else [])
    _ensure_service_nodes(store, name)
    try:
        store.set(layout.service(name), spec.to_json())
    except NoNode:
        store.create(layout.service(name), spec.to_json())
    return spec


def stage(store: Store, name: str, version: str, *, sha256: str, size: int,
          urls: list[str] | None = None, torrent: str | None = None,
          signer: trust.Signer | None = None, expires: float | None = None) -> StagedRelease:
    """Write the staged release of a defined service; hosts start fetching at once.
    ``size`` (the artifact's bytes) is required: it bounds every host's download.
    Signed as :func:`service_set` is."""
    spec, problem = read_spec(store, name)
    if spec is None:
        raise OpError(problem or f'service "{name}" is not defined '
                                 f"(define it with: dcdeploy service set {name} ...)")
    data: dict[str, Any] = {"version": version, "sha256": sha256, "size": size,
                            "urls": urls or [], "staged_at": time.time()}
    if torrent:
        data["torrent"] = torrent
    try:
        release = StagedRelease.parse(name, dumps(data), where=f"stage {name}")
    except InvalidData as exc:
        raise OpError(str(exc)) from None
    pending = [i for i in read_queue(store)[0] if i.service == name and i.state != "invalid"]
    for item in pending:
        if item.state in ("waiting", "rolling", "paused") and item.version != version:
            raise OpError(f'service "{name}" is being deployed ({item.node}: {item.version}, '
                          f"{item.state}): pause or abort it before staging {version}")
    old, _ = read_staged(store, name)
    release = _sign(release, signer_or_default(signer), expires, [old] if old else [])
    _ensure_service_nodes(store, name)
    store.set(layout.staged(name), release.to_json())
    # The superseded release's swarm (peers/<infohash>) goes now: the operator's write is
    # the one moment a release stops being staged (docs/distribution.md, "Security").
    from .p2p.tracker import prune_unstaged_peers
    prune_unstaged_peers(store)
    return release


def _ordered(store: Store, names: list[str]) -> tuple:
    """What ``deploy`` and ``plan`` both start from: the specs (and invalid ones), the
    staged release of each of ``names``, the queue (and invalid items), and the order
    ``names`` would be queued in. Raises :class:`OpError` for what a deploy refuses."""
    specs, invalid = read_specs(store)
    staged = {}
    for name in names:
        release, problem = read_staged(store, name)
        if problem:
            raise OpError(f"{problem} (stage it again with: dcdeploy stage {name} ...)")
        staged[name] = release
    queue, queue_invalid = read_queue(store)
    try:
        order = decisions.deploy_order(specs, staged, names, queue)
    except decisions.DependencyError as exc:
        raise OpError(str(exc)) from None
    return specs, invalid, staged, queue, queue_invalid, order


def deploy(store: Store, names: list[str], signer: trust.Signer | None = None,
           expires: float | None = None, host_parallel: int | None = None,
           in_series: bool = False, canary: int = 0, soak_secs: float = 0.0,
           predicted: dict[str, float | None] | None = None,
           max_down_per_rack: int | None = None,
           rack_order: bool | Sequence[str] | None = None) -> list[DeployItem]:
    """Queue the staged versions of ``names`` in dependency order (one transaction).

    Each item records ``after``, every service its own depends on (directly or not): it
    waits only for items of those (and of its own service) ahead of it, so independent
    items roll at the same time. ``host_parallel`` (default 1): how many of its services
    a host may switch at once. Each item is signed (service, version, after,
    host_parallel) as :func:`service_set` is. ``in_series``: items without ``after``,
    each waiting for every item ahead (the queue as it ran before issue 10). ``canary``
    hosts switch first, then each item holds for ``soak_secs`` or until approved
    (docs/policy.md); ``predicted``: service -> the plan's predicted seconds.
    ``max_down_per_rack``, ``rack_order`` (True: racks sorted; or rack names): this
    deploy's rack policy over each service spec's (:func:`rack_override`), signed."""
    check_canary(canary, soak_secs)
    check_host_parallel(host_parallel)
    racks = rack_override(max_down_per_rack, rack_order)
    specs, invalid, staged, queue, queue_invalid, order = _ordered(store, names)
    now = time.time()
    signer = signer_or_default(signer)
    for n in order:
        _check_staged(staged[n], signer)
    predicted = predicted or {}
    items = [_sign(DeployItem(node="item-", seq=-1, service=n, version=staged[n].version,
                              updated=now, host_parallel=host_parallel,
                              after=None if in_series else
                              tuple(sorted(decisions.dependencies(specs, n))),
                              **_canary_of(specs[n], canary, soak_secs), **racks,
                              predicted_s=predicted.get(n)), signer, expires,
                   [i for i in queue if i.service == n]) for n in order]
    ops = [Create(layout.ITEM_PREFIX, item.to_json(), sequential=True) for item in items]
    created = store.commit(ops)
    return [replace(item, node=path.rpartition("/")[2], seq=int(path[-10:]))
            for path, item in zip(created, items)]


def _head(store: Store) -> DeployItem:
    queue, invalid = read_queue(store)
    if not queue:
        raise OpError("the deploy queue is empty")
    return queue[0]


def _rewrite(store: Store, item: DeployItem, **changes: Any) -> None:
    changed = replace(item, **changes, updated=time.time())
    store.set(layout.item(item.node), changed.to_json(), item.data_version)


def pause(store: Store) -> DeployItem:
    """Stop new take-downs (hosts mid-switch finish theirs): every waiting or rolling item
    is paused, since independent items roll at the same time. Returns the first."""
    return pause_all(store)[0]


def pause_all(store: Store) -> list[DeployItem]:
    """:func:`pause`, returning every item it paused."""
    paused: list[DeployItem] = []
    for _ in range(5):
        head = _head(store)
        active = [i for i in read_queue(store)[0] if i.state in ("waiting", "rolling")]
        if not active and not paused:
            raise OpError(f"{head.node} ({head.service} {head.version}) is {head.state}: "
                          "nothing to pause")
        if not active:
            return paused
        for item in active:
            try:
                _rewrite(store, item, state="paused", reason="paused by operator")
                paused.append(item)
            except StoreError:
                pass  # changed meanwhile: read the queue again
    raise OpError("the deploy items kept changing; try again")


def resume(store: Store, signer: trust.Signer | None = None,
           expires: float | None = None) -> tuple[DeployItem, str | None]:
    """Continue every paused or failed item (items roll at the same time, so a pause
    pauses them all, and more than one may have failed). If the staged version changed
    since an item was queued (a fixed release), the item is retargeted to it; returns
    (the first item, its new version). Each item is signed again (a new counter and
    expiry; without a key it becomes unsigned)."""
    signer = signer_or_default(signer)
    head = _head(store)
    stopped = [i.node for i in read_queue(store)[0] if i.state in ("paused", "failed")]
    if not stopped:
        raise OpError(f"{head.node} ({head.service} {head.version}) is {head.state}: "
                      "only a paused or failed deploy can be resumed")
    first = _resume_one(store, signer, expires, stopped[0])
    for node in stopped[1:]:
        try:
            _resume_one(store, signer, expires, node)
        except OpError:
            pass  # changed meanwhile (resumed, aborted): nothing left to do for it
    return first


def _resume_one(store: Store, signer: trust.Signer | None, expires: float | None,
                node: str) -> tuple[DeployItem, str | None]:
    for _ in range(5):
        head = next((i for i in read_queue(store)[0] if i.node == node), None)
        if head is None:
            raise OpError(f"{node} is gone")
        if head.state not in ("paused", "failed"):
            raise OpError(f"{head.node} ({head.service} {head.version}) is {head.state}: "
                          "only a paused or failed deploy can be resumed")
        staged, problem = read_staged(store, head.service)
        if staged is None:
            raise OpError(problem or f'service "{head.service}" has no staged release')
        retarget = staged.version if staged.version != head.version else None
        _check_staged(staged, signer)
        resigned = _sign(replace(head, version=staged.version, signature=None), signer,
                         expires, [head])
        try:
            # A new canary round: the set is chosen again, the soak starts again.
            _rewrite(store, head, state="rolling", reason=None, host=None,
                     version=staged.version, signature=resigned.signature, canaries=(),
                     canaries_done_at=None, rollback=False, approved=False)
            return head, retarget
        except StoreError:
            continue
    raise OpError("the deploy item kept changing; try again")


PLAN_HISTORY = 200  # history records the plan reads switch timings from


def switch_timings(records: list[dict[str, Any]]) -> tuple[list, list[str]]:
    """The switch timings in history records (``timings`` of done items), for the plan;
    a bad record is reported and left out."""
    from .policy import parse_timings
    out, problems = [], []
    for record in records:
        raw = record.get("timings")
        if raw is None:
            continue
        service = record.get("service")
        where = f"history/{record.get('item')} timings"
        if not isinstance(raw, list) or not isinstance(service, str):
            problems.append(f"{where}: expected a list of switches of a named service")
            continue
        good, bad = parse_timings(where, [{"service": service, **t} if isinstance(t, dict)
                                          else t for t in raw])
        out += good
        problems += bad
    return out, problems


def plan(store: Store, names: list[str], canary: int = 0,
         soak_secs: float = 0.0, max_down_per_rack: int | None = None,
         rack_order: bool | Sequence[str] | None = None,
         host_parallel: int | None = None) -> dict[str, Any]:
    """``dcdeploy plan``: what deploying ``names`` now would do, after what is queued
    (waves, order, batches, predicted seconds; policy.plan, docs/policy.md). Refuses
    what ``deploy`` would refuse. The overrides (canaries, rack policy, host_parallel)
    are those of ``deploy`` for the new items; queued items keep their own (an item
    without ``host_parallel`` runs with 1, as the agent reads it)."""
    from .policy import GateView, Policy, plan as make_plan, service_state
    check_canary(canary, soak_secs)
    check_host_parallel(host_parallel)
    racks = rack_override(max_down_per_rack, rack_order)
    specs, _, staged, queue, _, order = _ordered(store, names)
    pending = [i if i.host_parallel is not None else replace(i, host_parallel=1)
               for i in queue if i.state not in ("done", "aborted")]
    new = [DeployItem(node=f"(new {n})", seq=10**10 + k, service=n,
                      version=staged[n].version, **_canary_of(specs[n], canary, soak_secs),
                      host_parallel=host_parallel or 1, **racks)
           for k, n in enumerate(order)]
    items = pending + new
    hosts, _ = read_hosts(store)
    states = {}
    for svc, spec in specs.items():
        mine = [i for i in items if i.service == svc]
        target = mine[0].version if mine else None
        policy = getattr(spec, "policy", None) or Policy()
        if mine and mine[0].canary:
            policy = replace(policy, canary=mine[0].canary, soak_secs=mine[0].soak_secs)
        policy = decisions.override_racks(policy, mine[0] if mine else None)
        view = read_view(store, svc, queue, [], hosts=hosts)
        states[svc] = service_state(view, policy, target)
    timings, problems = switch_timings(history(store, PLAN_HISTORY))
    out = make_plan(GateView(services=states, queue=items, host_parallel=host_parallel or 1),
                    timings,
                    {svc: spec.healthy_secs for svc, spec in specs.items()})
    out["timing_problems"] = problems
    return out


def _canary_of(spec: ServiceSpec, canary: int, soak_secs: float) -> dict[str, Any]:
    """The canaries of one deploy item: ``--canary``/``--soak`` when given, else the
    spec's own ``canary``/``soak_secs`` (docs/policy.md)."""
    if not canary:
        canary, soak_secs = spec.policy.canary, spec.policy.soak_secs
    return {"canary": canary, "soak_secs": float(soak_secs)}


def rack_override(max_down_per_rack: Any = None,
                  rack_order: bool | Sequence[str] | None = None) -> dict[str, Any]:
    """``deploy --max-down-per-rack K --rack-order [R1,R2,...]``: the deploy item's rack
    fields, checked as a spec's are (K 1..100000; rack names valid, none twice).
    ``rack_order`` True: racks sorted; None: the spec's. Raises :class:`OpError` naming
    the flag and the bad value."""
    from .model import rack_override as parse
    data: dict[str, Any] = {}
    if max_down_per_rack is not None:
        data["max_down_per_rack"] = max_down_per_rack
    if rack_order is not None and rack_order is not False:
        data["rack_order"] = True if rack_order is True else list(rack_order)
    try:
        return parse("deploy", data)
    except InvalidData as exc:
        flag = {"max_down_per_rack": "--max-down-per-rack"}.get(exc.field, "--rack-order")
        raise OpError(f"{flag}: {exc.problem}") from None


def item_overrides(item: DeployItem) -> dict[str, Any]:
    """What a deploy item sets over the service spec's policy, for ``status`` (only the
    fields it sets): ``host_parallel``, ``max_down_per_rack``, ``rack_order``."""
    out: dict[str, Any] = {}
    if item.host_parallel is not None:
        out["host_parallel"] = item.host_parallel
    if item.max_down_per_rack is not None:
        out["max_down_per_rack"] = item.max_down_per_rack
    if item.rack_order:
        out["rack_order"] = list(item.rack_names) if item.rack_names else True
    return out


def check_host_parallel(host_parallel: int | None) -> None:
    """``--host-parallel N``: 1..64 when given."""
    if host_parallel is not None:
        from .policy import check_host_parallel as check
        try:
            check("--host-parallel", host_parallel)
        except InvalidData as exc:
            raise OpError(str(exc)) from None


def check_canary(canary: Any, soak_secs: Any) -> None:
    """``--canary N --soak SECS``: N whole, 0..MAX_HOSTS; a soak needs canaries."""
    from .model import MAX_HOSTS, MAX_SOAK_SECS
    if isinstance(canary, bool) or not isinstance(canary, int) or not 0 <= canary <= MAX_HOSTS:
        raise OpError(f"--canary {canary!r}: give a number of hosts, 0..{MAX_HOSTS}")
    if isinstance(soak_secs, bool) or not isinstance(soak_secs, (int, float)) or \
            not 0 <= soak_secs <= MAX_SOAK_SECS:  # False for NaN
        raise OpError(f"--soak {soak_secs!r}: give seconds, 0..{MAX_SOAK_SECS:g}")
    if soak_secs and not canary:
        raise OpError("--soak needs --canary N (the soak is how long the canaries serve "
                      "before the rest)")


def approve(store: Store, service: str, signer: trust.Signer | None = None,
            expires: float | None = None) -> DeployItem:
    """End the canary hold of ``service``'s queued item: the rest of its hosts may
    switch. The approval is signed with the item (hosts refuse a forged one)."""
    try:
        check_name("approve", "service", service)
    except InvalidData as exc:
        raise OpError(str(exc)) from None
    signer = signer_or_default(signer)
    for _ in range(5):
        queue, _ = read_queue(store)
        mine = [i for i in queue if i.service == service and i.state != "invalid"]
        if not mine:
            raise OpError(f'no deploy of "{service}" is queued (dcdeploy status lists the '
                          "queue)")
        item = mine[0]
        if item.state not in ("waiting", "rolling"):
            raise OpError(f"{item.node} ({service} {item.version}) is {item.state}: only a "
                          "waiting or rolling item can be approved")
        if not item.canary:
            raise OpError(f"{item.node} ({service} {item.version}) has no canaries: nothing "
                          "to approve")
        if item.approved:
            raise OpError(f"{item.node} ({service} {item.version}) is already approved")
        resigned = _sign(replace(item, approved=True, signature=None), signer, expires, [item])
        try:
            _rewrite(store, item, approved=True, signature=resigned.signature)
            return replace(item, approved=True)
        except StoreError:
            continue
    raise OpError("the deploy item kept changing; try again")


def abort(store: Store) -> list[str]:
    """End the whole queue: every item moves to history as ``aborted`` (hosts mid-switch
    finish; nobody starts another). Returns the item names."""
    nodes = sorted(store.children(layout.DEPLOY))
    if not nodes:
        raise OpError("the deploy queue is empty: nothing to abort")
    groups: list[list] = []  # one item's delete + history record: always together
    for node in nodes:
        try:
            raw, version = store.get(layout.item(node))
        except NoNode:
            continue
        try:
            item = DeployItem.parse(node, raw, version)
        except InvalidData as exc:
            # Unreadable items are aborted too (they block the queue); keep what can be
            # read, and a bounded piece of the raw value for the post-mortem.
            record = _readable_part(raw)
            record["raw"] = (raw or b"")[:RAW_KEPT].decode("utf-8", "replace")
            record.update(state="aborted", updated=time.time(),
                          reason=f"aborted by operator (was invalid: {exc})")
            data = dumps(record)
        else:
            data = replace(item, state="aborted", updated=time.time(),
                           reason=f"aborted by operator (was {item.state})").to_json()
        # A history node of the same name (written by hand) must not make abort impossible.
        name = node if store.exists(layout.history(node)) is None else \
            f"{node}-aborted-{time.time_ns()}"
        groups.append([Delete(layout.item(node), version),
                       Create(layout.history(name), data)])
    try:
        _commit_groups(store, groups)
    except TransactionFailed as exc:
        raise OpError(f"the queue changed while aborting ({exc}); run abort again") from None
    trim_history(store)
    return nodes


def _commit_groups(store: Store, groups: list[list]) -> None:
    """Commit all ``groups`` in one transaction, or, when the store says that is more than
    one transaction takes (Consul: 64 ops before 1.14, 128 since; its error carries the
    ``limit``), in halves; each group stays atomic. A group too large alone is raised."""
    try:
        store.commit([op for group in groups for op in group])
    except StoreError as exc:
        if getattr(exc, "limit", None) is None or len(groups) == 1:
            raise
        half = len(groups) // 2
        _commit_groups(store, groups[:half])
        _commit_groups(store, groups[half:])


def _readable_part(raw: bytes | None) -> dict[str, Any]:
    """``service`` and ``version`` of an invalid deploy item, when those two are valid."""
    out: dict[str, Any] = {}
    try:
        data = load_json("deploy item", raw, strict_numbers=False)
    except InvalidData:
        return out
    if isinstance(data, dict):
        for name, check in (("service", check_name), ("version", check_version)):
            try:
                out[name] = check("deploy item", name, data.get(name))
            except InvalidData:
                pass
    return out


def trim_history(store: Store, cap: int = HISTORY_CAP) -> None:
    nodes = sorted(store.children(layout.HISTORY))
    for node in nodes[: max(0, len(nodes) - cap)]:
        try:
            store.delete(layout.history(node))
        except NoNode:
            pass


def history(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    out = []
    for node in sorted(store.children(layout.HISTORY))[-limit:]:
        try:
            raw, _ = store.get(layout.history(node))
        except NoNode:
            continue
        try:
            record = load_json(f"history/{node}", raw)
            if not isinstance(record, dict):
                raise InvalidData(f"history/{node}", "(json)",
                                  f"expected a JSON object, got {type(record).__name__}")
        except InvalidData as exc:
            out.append({"item": node, "state": "unreadable", "reason": str(exc)})
            continue
        out.append({**{k: v for k, v in record.items() if isinstance(k, str)}, "item": node})
    return out


def status(store: Store) -> dict[str, Any]:
    """The ``dcdeploy status --json`` object (see README)."""
    specs, spec_invalid = read_specs(store)
    hosts, host_invalid = read_hosts(store)
    queue, queue_invalid = read_queue(store)
    problems = spec_invalid + host_invalid + queue_invalid
    services: dict[str, Any] = {}
    views = {}
    host_services: dict[str, dict[str, Any]] = {}
    online_hosts: set[str] = set()
    names = sorted(set(store.children(layout.SERVICES)) | {s for h in hosts.values()
                                                      for s in h.services})
    for name in names:
        view = checked_view(store, read_view(store, name, queue, [], hosts=hosts))
        views[name] = view
        problems += [p for p in view.invalid if p not in problems]
        staged = view.staged
        versions: dict[str, int] = {}
        for entry in view.current.values():
            versions[entry.version] = versions.get(entry.version, 0) + 1
        services[name] = {
            "quorum": view.spec.quorum if view.spec else None,
            "depends_on": list(view.spec.depends_on) if view.spec else [],
            "max_parallel": view.spec.max_parallel if view.spec else None,
            "staged": None if staged is None else {
                "version": staged.version, "sha256": staged.sha256, "size": staged.size,
                "urls": list(staged.urls), "torrent": bool(staged.torrent),
                "staged_at": staged.staged_at},
            "current": {h: {"version": e.version, "state": e.state}
                        for h, e in sorted(view.current.items())},
            "staging": [e.host for e in view.staging],
            "versions": versions,
            "released": view.released,
        }
        for h, e in view.current.items():
            online_hosts.add(h)
            host_services.setdefault(h, {})[name] = {"version": e.version, "state": e.state}
        for e in view.staging:
            online_hosts.add(e.host)
            host_services.setdefault(e.host, {}).setdefault(
                name, {"version": None, "state": "switching" if e.host not in view.current
                       else "serving"})
    deploy = []
    for item in queue:
        view = views.get(item.service)
        if item.state == "invalid":
            state, reason = "blocked", item.reason
        elif view is None:
            state, reason = "blocked", f'service "{item.service}" is not defined'
        else:
            state, reason = decisions.deploy_status(view, item)
            if state == "rolling" and reason is None and item.canary:
                from .canary import hold
                held = hold(view, "", time.time())  # "": a host that is no canary
                if held.holding:
                    reason = held.reason  # e.g. "canary: soaking, 42 s of 60 s left ..."
        deploy.append({"item": item.node, "service": item.service, "version": item.version,
                       "state": state, "reason": reason, "host": item.host})
        if item.canary:
            deploy[-1].update(canaries=list(item.canaries), approved=item.approved)
        overrides = item_overrides(item)
        if overrides:
            deploy[-1]["overrides"] = overrides
    host_out = {}
    for name in sorted(set(hosts) | set(host_services)):
        info = hosts.get(name)
        svcs = dict(host_services.get(name, {}))
        for svc in (info.services if info else ()):
            svcs.setdefault(svc, {"version": None, "state": "offline"})
        for svc, fetch in (info.fetch if info else {}).items():
            if svc in svcs and isinstance(fetch, dict) and fetch.get("state"):
                svcs[svc] = {**svcs[svc], "fetch": fetch}
        host_out[name] = {"online": name in online_hosts, "rack": info.rack if info else "",
                          "services": dict(sorted(svcs.items()))}
    problems += refusals(hosts)
    return {"services": services, "deploy": deploy, "hosts": host_out,
            "problems": problems}


def refusals(hosts: dict[str, Any]) -> list[str]:
    """What hosts refused to act on (unsigned, wrongly signed, expired, replayed operator
    data: trust.py), one line per refusal with the hosts that reported it."""
    by_reason: dict[str, list[str]] = {}
    for name, info in sorted(hosts.items()):
        for reason in info.refused:
            by_reason.setdefault(reason, []).append(name)
    return [f"refused by {', '.join(names)}: {reason}"
            for reason, names in sorted(by_reason.items())]


def hosts_status(store: Store) -> dict[str, Any]:
    return status(store)["hosts"]


__all__ = ["OpError", "service_set", "stage", "deploy", "pause", "resume", "abort", "status",
           "approve", "plan", "check_canary", "switch_timings",
           "hosts_status", "history", "trim_history", "read_current", "read_staging",
           "check_version"]
