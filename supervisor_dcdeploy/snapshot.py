"""Read the store into immutable values (the I/O edge of the decisions in decisions.py).

Malformed nodes never raise out of here: they are left out of the snapshot and described in
``invalid``, so a hand-written garbage node is reported and never acted on. A malformed
deploy item blocks the queue at its place (items behind it must not overtake it)."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Callable

from .decisions import ServiceView
from .model import (SEQ_RE, CurrentEntry, DeployItem, HostInfo, InvalidData, ServiceSpec,
                    StagedRelease, StagingEntry, _load, check_version)
from .presence import counted
from .store import NoNode, Store
from .store import layout

Watcher = Callable[[], None]


def _data(store: Store, path: str, watch: Watcher | None = None) -> tuple[bytes | None, int]:
    try:
        return store.get(path, watch)
    except NoNode:
        if watch:
            store.exists(path, watch)
        return None, -1


def read_queue(store: Store, watch: Watcher | None = None) -> tuple[list[DeployItem], list[str]]:
    """The deploy queue in order, and problems. Stops at the first malformed item, which is
    returned as a placeholder in state ``invalid`` so nothing behind it proceeds."""
    items: list[DeployItem] = []
    invalid: list[str] = []
    for node in sorted(store.children(layout.DEPLOY, watch), key=lambda n: n.rpartition("-")[2]):
        raw, version = _data(store, layout.item(node))
        if raw is None:
            continue  # completed between the listing and the read
        try:
            items.append(DeployItem.parse(node, raw, version))
        except InvalidData as exc:
            invalid.append(str(exc))
            seq = node.rpartition("-")[2]
            items.append(DeployItem(node=node, seq=int(seq) if SEQ_RE.fullmatch(seq) else -1,
                                    service="?", version="?", state="invalid",
                                    reason=f"invalid data, not acted on: {exc}",
                                    data_version=version))
            break
    return items, invalid


def read_spec(store: Store, svc: str) -> tuple[ServiceSpec | None, str | None]:
    raw, _ = _data(store, layout.service(svc))
    if raw is None:
        return None, None
    try:
        return _spec_value(svc, bytes(raw)), None
    except InvalidData as exc:
        return None, str(exc)


def read_specs(store: Store) -> tuple[dict[str, ServiceSpec], list[str]]:
    specs, invalid = {}, []
    for svc in store.children(layout.SERVICES):
        spec, problem = read_spec(store, svc)
        if spec:
            specs[svc] = spec
        if problem:
            invalid.append(problem)
    return specs, invalid


def read_staged(store: Store, svc: str,
                watch: Watcher | None = None) -> tuple[StagedRelease | None, str | None]:
    raw, _ = _data(store, layout.staged(svc), watch)
    if not raw:
        return None, None
    try:
        return _staged_value(svc, bytes(raw)), None
    except InvalidData as exc:
        return None, str(exc)


# An agent builds its view every cycle, most of the time from the same presences and ready
# entries (the mirror, docs/design.md §4): each distinct value is parsed once. The entries
# are frozen; a value that does not parse is not remembered (it raises again, as it should).
@lru_cache(maxsize=1024)  # specs and staged releases: the same few, every cycle
def _spec_value(svc: str, raw: bytes) -> ServiceSpec:
    return ServiceSpec.parse(svc, raw)


@lru_cache(maxsize=1024)
def _staged_value(svc: str, raw: bytes) -> StagedRelease:
    return StagedRelease.parse(svc, raw)


@lru_cache(maxsize=16384)
def _current_entry(svc: str, host: str, raw: bytes) -> CurrentEntry:
    return CurrentEntry.parse(svc, host, raw)


@lru_cache(maxsize=16384)
def _staging_entry(svc: str, node: str, raw: bytes) -> StagingEntry:
    return StagingEntry.parse(svc, node, raw)


def read_current(store: Store, svc: str, invalid: list[str],
                 watch: Watcher | None = None) -> dict[str, CurrentEntry]:
    out = {}
    for host in store.children(layout.presence_dir(svc), watch):
        raw, _ = _data(store, layout.presence(svc, host))
        if raw is None:
            continue
        try:
            out[host] = _current_entry(svc, host, bytes(raw))
        except InvalidData as exc:
            invalid.append(str(exc))  # counted as not online: the safe side for quorum
    return out


def checked_view(store: Store, view: ServiceView) -> ServiceView:
    """The view with only the presences held by the session their host published in
    ``hosts/<host>/session`` (:func:`..presence.counted`); every other one is dropped
    from ``current`` and named in ``invalid``. One request on ZooKeeper (``multiRead`` of
    the presences and the session nodes), whatever the number of hosts; the view as it
    is on a backend that cannot tell a node's owner."""
    if not getattr(store, "knows_owners", False) or not view.current:
        return view
    hosts = sorted(view.current)
    reads = store.get_owned([layout.presence(view.service, h) for h in hosts] +
                            [layout.session(h) for h in hosts])
    owners = {h: r.owner for h, r in zip(hosts, reads[:len(hosts)]) if r is not None}
    sessions = {h: r.owner for h, r in zip(hosts, reads[len(hosts):]) if r is not None}
    valid, problems = counted(f"presence of {view.service} on", owners, sessions)
    if valid == set(hosts):
        return view
    return replace(view, current={h: e for h, e in view.current.items() if h in valid},
                   invalid=[*view.invalid, *(p for p in problems if p not in view.invalid)])


def read_staging(store: Store, svc: str, invalid: list[str],
                 watch: Watcher | None = None) -> list[StagingEntry]:
    out = []
    for node in store.children(layout.staged(svc), watch):
        raw, _ = _data(store, layout.ready_entry(svc, node))
        if raw is None:
            continue
        try:
            out.append(_staging_entry(svc, node, bytes(raw)))
        except InvalidData as exc:
            invalid.append(str(exc))
    return sorted(out, key=lambda e: e.seq)


def read_released(store: Store, svc: str) -> str | None:
    raw, _ = _data(store, layout.released(svc))
    if not raw:
        return None
    try:
        return check_version(layout.released(svc), "version",
                             _load(layout.released(svc), raw).get("version"))
    except InvalidData:
        return None


def read_hosts(store: Store) -> tuple[dict[str, HostInfo], list[str]]:
    hosts, invalid = {}, []
    for name in store.children(layout.HOSTS):
        raw, _ = _data(store, layout.host(name))
        try:
            hosts[name] = HostInfo.parse(name, raw)
        except InvalidData as exc:
            invalid.append(str(exc))
    return hosts, invalid


def read_view(store: Store, svc: str, queue: list[DeployItem] | None = None,
              queue_invalid: list[str] | None = None, *, hosts: dict[str, HostInfo] | None = None,
              watch_staged: Watcher | None = None, watch_current: Watcher | None = None,
              watch_gate: Watcher | None = None) -> ServiceView:
    """One service's snapshot. Pass ``queue`` when several services are read in one cycle."""
    invalid: list[str] = []
    if queue is None:
        queue, queue_invalid = read_queue(store)
    invalid.extend(queue_invalid or [])
    raw, spec_version = _data(store, layout.service(svc))
    spec, problem = None, None
    if raw is not None:
        try:
            spec = _spec_value(svc, bytes(raw))
        except InvalidData as exc:
            problem = str(exc)
    if problem:
        invalid.append(problem)
    staged, problem = read_staged(store, svc, watch_staged)
    if problem:
        invalid.append(problem)
    _, gate_version = _data(store, layout.gate(svc), watch_gate)
    current = read_current(store, svc, invalid, watch_current)
    staging = read_staging(store, svc, invalid)
    return ServiceView(service=svc, spec=spec, staged=staged, current=current,
                       staging=staging, queue=queue, hosts=hosts or {},
                       gate_version=gate_version, released=read_released(store, svc),
                       invalid=invalid, spec_version=spec_version)
