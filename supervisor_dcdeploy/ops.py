"""Operator actions on the store: the Python API behind the ``dcdeploy`` CLI.

Every function validates its input first and raises :class:`OpError` with a sentence an
operator can act on; writes that must go together go in one transaction."""

from __future__ import annotations

import json
import time
from typing import Any

from . import decisions
from .model import (DeployItem, HealthCheck, InvalidData, ServiceSpec, StagedRelease,
                    check_name, check_version, dumps, load_json)
from .snapshot import (read_current, read_hosts, read_queue, read_spec, read_specs,
                       read_staged, read_staging, read_view)
from .store import Create, Delete, NoNode, Store, StoreError, TransactionFailed

HISTORY_CAP = 1000
RAW_KEPT = 512  # bytes of an unreadable item kept in its history record


class OpError(Exception):
    pass


def _ensure_service_nodes(store: Store, svc: str) -> None:
    for base in ("current", "staging", "gate", "released"):
        store.ensure(f"{base}/{svc}")
    for path in ("deploy", "history", "hosts"):
        store.ensure(path)


def service_set(store: Store, name: str, *, program: str | None, quorum: int,
                depends_on: list[str] | tuple[str, ...] = (), max_parallel: int = 1,
                health: HealthCheck | None = None, healthy_secs: float = 0.0,
                preload: bool = False) -> ServiceSpec:
    """Define or replace a service. Refuses an undefined dependency or a cycle."""
    try:
        check_name("service", "name", name)
        raw = dumps({"program": program or name, "quorum": quorum,
                     "depends_on": list(depends_on), "max_parallel": max_parallel,
                     "health": (health or HealthCheck()).to_dict(),
                     "healthy_secs": healthy_secs, "preload": preload})
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
    _ensure_service_nodes(store, name)
    try:
        store.set(f"services/{name}", spec.to_json())
    except NoNode:
        store.create(f"services/{name}", spec.to_json())
    return spec


def stage(store: Store, name: str, version: str, *, sha256: str, urls: list[str] | None = None,
          size: int | None = None, torrent: str | None = None) -> StagedRelease:
    """Write the staged release of a defined service; hosts start fetching at once."""
    spec, problem = read_spec(store, name)
    if spec is None:
        raise OpError(problem or f'service "{name}" is not defined '
                                 f"(define it with: dcdeploy service set {name} ...)")
    data: dict[str, Any] = {"version": version, "sha256": sha256, "urls": urls or [],
                            "staged_at": time.time()}
    if size is not None:
        data["size"] = size
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
    _ensure_service_nodes(store, name)
    store.set(f"staging/{name}", release.to_json())
    return release


def deploy(store: Store, names: list[str]) -> list[DeployItem]:
    """Queue the staged versions of ``names`` in dependency order (one transaction)."""
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
    now = time.time()
    ops = [Create("deploy/item-", dumps({"service": n, "version": staged[n].version,
                                         "state": "waiting", "reason": None, "host": None,
                                         "updated": now}), sequential=True)
           for n in order]
    created = store.commit(ops)
    return [DeployItem(node=path.rpartition("/")[2], seq=int(path[-10:]), service=n,
                       version=staged[n].version) for path, n in zip(created, order)]


def _head(store: Store) -> DeployItem:
    queue, invalid = read_queue(store)
    if not queue:
        raise OpError("the deploy queue is empty")
    return queue[0]


def _rewrite(store: Store, item: DeployItem, **changes: Any) -> None:
    data = {**json.loads(item.to_json()), **changes, "updated": time.time()}
    store.set(f"deploy/{item.node}", dumps(data), item.data_version)


def pause(store: Store) -> DeployItem:
    """Stop new take-downs (hosts mid-switch finish theirs)."""
    for _ in range(5):
        head = _head(store)
        if head.state not in ("waiting", "rolling"):
            raise OpError(f"{head.node} ({head.service} {head.version}) is {head.state}: "
                          "nothing to pause")
        try:
            _rewrite(store, head, state="paused", reason="paused by operator")
            return head
        except StoreError:
            continue
    raise OpError("the deploy item kept changing; try again")


def resume(store: Store) -> tuple[DeployItem, str | None]:
    """Continue a paused or failed head item. If the staged version changed since the item
    was queued (a fixed release), the item is retargeted to it; returns (item, new version)."""
    for _ in range(5):
        head = _head(store)
        if head.state not in ("paused", "failed"):
            raise OpError(f"{head.node} ({head.service} {head.version}) is {head.state}: "
                          "only a paused or failed deploy can be resumed")
        staged, problem = read_staged(store, head.service)
        if staged is None:
            raise OpError(problem or f'service "{head.service}" has no staged release')
        retarget = staged.version if staged.version != head.version else None
        try:
            _rewrite(store, head, state="rolling", reason=None, host=None,
                     version=staged.version)
            return head, retarget
        except StoreError:
            continue
    raise OpError("the deploy item kept changing; try again")


def abort(store: Store) -> list[str]:
    """End the whole queue: every item moves to history as ``aborted`` (hosts mid-switch
    finish; nobody starts another). Returns the item names."""
    nodes = sorted(store.children("deploy"))
    if not nodes:
        raise OpError("the deploy queue is empty: nothing to abort")
    ops: list = []
    for node in nodes:
        try:
            raw, version = store.get(f"deploy/{node}")
        except NoNode:
            continue
        try:
            item = DeployItem.parse(node, raw, version)
            record = json.loads(item.to_json())
            was = item.state
        except InvalidData as exc:
            # Unreadable items are aborted too (they block the queue); keep what can be
            # read, and a bounded piece of the raw value for the post-mortem.
            record = _readable_part(raw)
            record["raw"] = (raw or b"")[:RAW_KEPT].decode("utf-8", "replace")
            was = f"invalid: {exc}"
        record.update(state="aborted", updated=time.time(),
                      reason=f"aborted by operator (was {was})")
        # A history node of the same name (written by hand) must not make abort impossible.
        name = node if store.exists(f"history/{node}") is None else \
            f"{node}-aborted-{time.time_ns()}"
        ops += [Delete(f"deploy/{node}", version), Create(f"history/{name}", dumps(record))]
    try:
        store.commit(ops)
    except TransactionFailed as exc:
        raise OpError(f"the queue changed while aborting ({exc}); run abort again") from None
    trim_history(store)
    return nodes


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
    nodes = sorted(store.children("history"))
    for node in nodes[: max(0, len(nodes) - cap)]:
        try:
            store.delete(f"history/{node}")
        except NoNode:
            pass


def history(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    out = []
    for node in sorted(store.children("history"))[-limit:]:
        try:
            raw, _ = store.get(f"history/{node}")
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
    names = sorted(set(store.children("services")) | {s for h in hosts.values()
                                                      for s in h.services})
    for name in names:
        view = read_view(store, name, queue, [], hosts=hosts)
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
        deploy.append({"item": item.node, "service": item.service, "version": item.version,
                       "state": state, "reason": reason})
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
    return {"services": services, "deploy": deploy, "hosts": host_out,
            "problems": problems}


def hosts_status(store: Store) -> dict[str, Any]:
    return status(store)["hosts"]


__all__ = ["OpError", "service_set", "stage", "deploy", "pause", "resume", "abort", "status",
           "hosts_status", "history", "trim_history", "read_current", "read_staging",
           "check_version"]
