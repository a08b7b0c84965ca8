"""Coordination in the agent's own words (docs/design.md §4, §10), over a :class:`Store`.

The agent and the CLI say what they mean — follow a service's view, register presence,
enter or leave the ready queue, try the gate, mark an item failed, complete an item — and
each backend does it in its own idiom (in the manner of Patroni's ``dcs/`` modules):

* :class:`MirrorCoordinator` (ZooKeeper 3.6+): a local mirror of the nodes a host needs,
  kept current by persistent recursive watches (:meth:`Store.watch_tree`). A notification
  updates the mirror and reads at most the one node that changed; a cycle reads nothing it
  already holds. The gate is ``sync()`` (after which every notification up to that point
  has been received, in order, on the same connection) plus the gate's version, then one
  atomic commit. The mirror is rebuilt after every reconnect: the server forgets
  persistent watches with the connection, and a gate or queue position never survives a
  lost session.
* :class:`FollowCoordinator` (Consul): blocking reads of what can change the host's next
  decision, and one consistent snapshot (a read-only ``/v1/txn``) where it decides.
* :class:`RereadCoordinator` (a backend that can do neither): the same operations, the
  view re-read on each cycle as before.

Paths come from :mod:`.store.layout` only.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from functools import lru_cache
from typing import Any, Callable, Collection, Sequence

from .decisions import ServiceView, needs_racks
from dataclasses import replace

from .model import CurrentEntry, DeployItem, InvalidData, StagingEntry, dumps
from .snapshot import (_current_entry, _staging_entry, checked_view, read_queue,
                       read_view)
from .store import (Check, Create, Delete, NodeExists, NoNode, SessionState, SetData, Store,
                    StoreError, StoreUnauthorized, StoreUnavailable, TransactionFailed)
from .store import layout

Waker = Callable[[], None]
MAX_TIMINGS = 50  # switch timings kept in one history record
# How often the mirror catches up while reading the values a decision needs, when one of
# them went meanwhile (MirrorCoordinator._read_unread).
RESOLVE_ROUNDS = 3


class Coordinator:
    """The domain operations, shared by both ways of following the store."""

    def __init__(self, store: Store, host: str, services: Sequence[str], wake: Waker) -> None:
        self.store = store
        self.host = host
        self.services = tuple(services)
        self._wake = wake
        self._own: dict[str, dict[str, str]] = {svc: {} for svc in self.services}
        self._claimed: int | None = None  # the session hosts/<host>/session was made in

    # -- following the store ------------------------------------------------------------
    def on_session(self, state: SessionState) -> None:
        """Any session change: what was followed may be stale or gone."""

    def follow(self) -> None:
        """Bring the local picture up to date (cheap when nothing changed)."""

    def check_access(self) -> None:
        """One read that the store checks against this identity's rights. An agent that
        follows a mirror reads nothing when idle, and ZooKeeper sends no event when an ACL
        changes, so without it a revoked host would not notice. Raises what the read
        raises (:class:`StoreUnauthorized` when refused)."""
        try:
            self.store.get(layout.host(self.host))
        except NoNode:
            pass

    def reload(self) -> None:
        """Forget what was followed; the next :meth:`follow` reads it afresh."""

    def queue(self) -> tuple[list[DeployItem], list[str]]:
        raise NotImplementedError

    def view(self, svc: str, queue: list[DeployItem], queue_invalid: list[str]) -> ServiceView:
        raise NotImplementedError

    def fresh_view(self, svc: str) -> ServiceView:
        """The view as fresh as the store after ``sync()``: what the gate decides on."""
        raise NotImplementedError

    def wait_ahead(self, svc: str, nodes: Sequence[str]) -> None:
        """Be woken when any of these ready-queue entries ahead of us goes."""

    def resolve(self, svc: str, view: ServiceView) -> ServiceView:
        """The view with every presence's value known (what completion and recovery need);
        only the mirror ever leaves some unread."""
        return view

    def resolve_racks(self, svc: str, view: ServiceView) -> ServiceView:
        """The view with every ready-queue entry's and presence's value (their racks)
        known: what a rack budget or rack order decides on. Only the mirror leaves some
        unread."""
        return view

    def set_front(self, svc: str, front: bool) -> None:
        """Whether this host may pass the gate now (no herd: only those follow the gate)."""

    # -- presence -----------------------------------------------------------------------
    def claim_session(self) -> None:
        """``hosts/<host>/session``, ephemeral, once per session (where the backend shows
        owners): readers count a presence of ours only when it has this node's owner
        (:func:`.snapshot.checked_view`). One of an earlier session of ours that has not
        expired yet (an agent restarted) is replaced. A store that refuses it leaves our
        presences uncounted, which readers report: never an error out of the cycle."""
        sid = self.store.session_id
        if sid is None or sid == self._claimed:
            return
        path = layout.session(self.host)
        try:
            try:
                self.store.create(path, b"", ephemeral=True)
            except NodeExists:
                (found,) = self.store.get_owned([path])
                if found is not None and found.owner != sid:
                    self.store.delete(path)
                    self.store.create(path, b"", ephemeral=True)
        except StoreUnavailable:
            raise
        except StoreError:
            return  # not registered by `dcdeploy init` under ACLs: readers report it
        self._claimed = sid

    def register(self, svc: str, version: str, rack: str, switch: dict | None = None,
                 probe: str | None = None) -> None:
        """Presence; ``switch``: the timing of the switch that brought this host to
        ``version``, ``probe``: where other hosts can check it (docs/policy.md)."""
        self.claim_session()
        data = CurrentEntry(host=self.host, version=version, since=time.time(), rack=rack,
                            switch=switch, probe=probe).to_json()
        path = layout.presence(svc, self.host)
        try:
            self.store.create(path, data, ephemeral=True)
        except NodeExists:
            self._replace_foreign(path, data)
        self._wrote(path, data)

    def _replace_foreign(self, path: str, data: bytes) -> None:
        """Our presence exists already: update it, unless another session holds it (one
        forged under our name, or our own from before a restart), which is deleted and
        made again as ours."""
        sid = self.store.session_id
        if sid is not None:
            (found,) = self.store.get_owned([path])
            if found is not None and found.owner != sid:
                try:
                    self.store.delete(path)
                except NoNode:
                    pass
                self.store.create(path, data, ephemeral=True)
                return
        self.store.set(path, data)

    def unregister(self, svc: str) -> None:
        path = layout.presence(svc, self.host)
        try:
            self.store.delete(path)
        except NoNode:
            pass
        self._gone(path)

    # -- the ready queue ----------------------------------------------------------------
    def enter_queue(self, svc: str, version: str, rack: str = "") -> str:
        """Join the ready queue; the entry names the host's rack (rack budgets)."""
        self.claim_session()  # a host may queue before it ever registered (nothing runs)
        data = dumps({"version": version, "rack": rack} if rack else {"version": version})
        created = self.store.create(layout.ready_prefix(svc, self.host), data,
                                    ephemeral=True, sequential=True)
        self._own[svc][created] = version
        self._wrote(created, data)
        return created

    def drop_entry(self, svc: str, node: str) -> None:
        path = layout.ready_entry(svc, node)
        try:
            self.store.delete(path)
        except NoNode:
            pass
        self._own[svc].pop(path, None)
        self._gone(path)

    def leave_queue(self, svc: str) -> None:
        for node in self._own_entries(svc):
            self.drop_entry(svc, node)

    def make_way(self, switching: str, in_progress: Collection[str]) -> list[str]:
        """After passing ``switching``'s gate: leave the ready queues of this host's other
        services, so that it does not hold a place at their front while it has no room for
        another switch (``host_parallel``; the agent calls it only then); their next host in
        line goes instead, and this one joins again, at the back, once a switch is over.
        The services whose queue it left.

        ``in_progress``: the services this host is switching already (their switch not
        taken back yet). Their entries stay: such an entry is no place in line but what
        shows the host as switching that service (entry, no presence) until it is back.
        Without it the host looked offline to the others, who completed the item while it
        was still down (its switch timing left out of the history record) and counted
        its slot of ``max_parallel`` and its rack's budget as free.

        One transaction for all of them: this runs between the gate and the stop, so
        each round trip (and the server's fsync) here delays the switch (bench/waves.py
        measured one delete per service, 7 in a row, at up to 0.7 s on a loaded machine).
        When it fails (an entry went meanwhile), one at a time, as before."""
        entries = {svc: self._own_entries(svc) for svc in self.services
                   if svc != switching and svc not in in_progress}
        entries = {svc: nodes for svc, nodes in entries.items() if nodes}
        paths = [(svc, layout.ready_entry(svc, node))
                 for svc, nodes in entries.items() for node in nodes]
        if len(paths) > 1:
            try:
                self.store.commit([Delete(path) for _, path in paths])
            except TransactionFailed:
                pass  # an entry went meanwhile: one at a time below
            else:
                for svc, path in paths:  # what drop_entry does after its delete
                    self._own[svc].pop(path, None)
                    self._gone(path)
                return list(entries)
        for svc in entries:
            self.leave_queue(svc)
        return list(entries)

    def _own_entries(self, svc: str) -> list[str]:
        return [node for node in self.store.children(layout.staged(svc))
                if node.rpartition("-")[0] == self.host]

    def rejoin(self, svc: str, version: str, rack: str, switch: dict | None = None,
               probe: str | None = None) -> None:
        """Back from a switch: register as serving ``version`` and leave the ready queue."""
        self.register(svc, version, rack, switch=switch, probe=probe)
        self.leave_queue(svc)

    # -- the gate, failure, completion ---------------------------------------------------
    def try_gate(self, svc: str, fresh: ServiceView, gate: dict, head: DeployItem | None,
                 record: Sequence[str] = ()) -> bool:
        """One atomic commit: the gate's version checked and bumped, our presence deleted,
        the head item moved to ``rolling`` (CAS, so a concurrent pause or failure mark
        invalidates the take-down), and ``record`` written as the item's canaries when
        given (the first canary's take-down records the set). False when another host or
        the operator won."""
        ops: list = [SetData(layout.gate(svc), dumps(gate), fresh.gate_version)]
        if fresh.spec_version >= 0:
            # The quorum, max_parallel and rack budget decided on are the spec's as read:
            # an operator's change meanwhile voids the take-down.
            ops.append(Check(layout.service(svc), fresh.spec_version))
        if self.host in fresh.current:
            ops.append(Delete(layout.presence(svc, self.host)))
        if head is not None and (head.state == "waiting" or record):
            if record:
                head = replace(head, canaries=tuple(record))
            ops.append(SetData(layout.item(head.node), item_data(head), head.data_version))
        elif head is not None:
            # Checking the item's version makes a concurrent pause or failure mark
            # invalidate this take-down (the gate and the item move together) without
            # rewriting it, which would make every host read it again.
            ops.append(Check(layout.item(head.node), head.data_version))
        try:
            self.store.commit(ops)
        except TransactionFailed:
            self._contended(svc)
            raise
        self._gone(layout.presence(svc, self.host))
        return True

    def _contended(self, svc: str) -> None:
        pass

    def mark_failed(self, node: str, reason: str, rollback: bool = False) -> bool:
        """Mark the deploy item failed (CAS); False when there is nothing to mark.
        ``rollback``: a canary failed during the hold, the canaries go back."""
        return self._update_item(node, lambda item: replace(
            item, state="failed", reason=reason, host=self.host, updated=time.time(),
            rollback=rollback) if item.state in ("waiting", "rolling", "paused") else None)

    def stamp_canaries_done(self, node: str, version: str) -> bool:
        """Set the item's ``canaries_done_at`` (CAS, once): the soak starts now."""
        return self._update_item(node, lambda item: replace(
            item, canaries_done_at=time.time())
            if item.canaries_done_at is None and item.version == version
            and item.state in ("waiting", "rolling") else None)

    def _update_item(self, node: str,
                     change: Callable[[DeployItem], DeployItem | None]) -> bool:
        """Write ``change(item)`` over the deploy item by check-and-set, re-reading on a
        conflict (5 tries). False when the item is gone or garbage, when ``change`` says
        there is nothing to do (None), or when every try lost the race."""
        for _ in range(5):
            try:
                raw, data_version = self.store.get(layout.item(node))
                item = DeployItem.parse(node, raw, data_version)
            except (NoNode, InvalidData):
                return False
            changed = change(item)
            if changed is None:
                return False
            try:
                self.store.set(layout.item(node), changed.to_json(), data_version)
                return True
            except StoreUnavailable:
                raise
            except StoreError:
                continue
        return False

    def complete(self, svc: str, head: DeployItem, reason: str,
                 timings: Sequence[dict] = ()) -> bool:
        """Move the item to history as done (with the switch ``timings`` the presences
        carried), and record the released version: one transaction."""
        # Bounded: the plan reads a service's latest 20 switches; a record must stay far
        # below the store's value limit whatever the fleet's size.
        record = replace(head, state="done", reason=reason, updated=time.time(),
                         timings=tuple(timings)[:MAX_TIMINGS]).to_json()
        name = head.node
        for _ in range(2):
            try:
                self.store.commit([
                    Delete(layout.item(head.node), head.data_version),
                    Create(layout.history(name), record),
                    SetData(layout.released(svc), dumps({"version": head.version,
                                                         "item": head.node})),
                ])
                break
            except TransactionFailed as exc:
                # A history node of that name written by hand must not keep the item open
                # forever: once, under another name (no read in the usual case).
                if exc.index != 1 or not isinstance(exc.cause, NodeExists) or name != head.node:
                    return False
                name = f"{head.node}-done-{time.time_ns()}"
        self._gone(layout.item(head.node))
        return True

    # -- the operator's verbs (the CLI) --------------------------------------------------
    def stage(self, svc: str, version: str, **release) -> None:
        from . import ops
        ops.stage(self.store, svc, version, **release)

    def enqueue_deploy(self, services: Sequence[str]) -> list[str]:
        from . import ops
        return ops.deploy(self.store, list(services))

    # -- the mirror's bookkeeping (no-ops without one) ------------------------------------
    def _wrote(self, path: str, data: bytes) -> None:
        pass

    def _gone(self, path: str) -> None:
        pass


def item_data(head: DeployItem) -> bytes:
    """The head item as the gate writes it: ``waiting`` becomes ``rolling``."""
    if head.state != "waiting":
        return head.to_json()
    now = time.time()
    return replace(head, state="rolling", updated=now, started_at=now).to_json()


class RereadCoordinator(Coordinator):
    """Backends without tree watches: the view is read on each cycle, one-shot watches
    wake the agent (as before the mirror)."""

    def __init__(self, store: Store, host: str, services: Sequence[str], wake: Waker) -> None:
        super().__init__(store, host, services, wake)
        self._front: dict[str, bool] = {}

    def queue(self) -> tuple[list[DeployItem], list[str]]:
        return read_queue(self.store, self._wake)

    def view(self, svc: str, queue: list[DeployItem], queue_invalid: list[str]) -> ServiceView:
        front = self._front.get(svc, True)
        return read_view(self.store, svc, queue, queue_invalid, watch_staged=self._wake,
                         watch_current=self._wake if front else None,
                         watch_gate=self._wake if front else None)

    def set_front(self, svc: str, front: bool) -> None:  # noqa: D102
        self._front[svc] = front

    def fresh_view(self, svc: str) -> ServiceView:
        self.store.sync()
        return checked_view(self.store, read_view(self.store, svc))

    def wait_ahead(self, svc: str, nodes: Sequence[str]) -> None:
        for node in nodes:
            if self.store.exists(layout.ready_entry(svc, node), self._wake) is None:
                self._wake()  # gone already: look again now


_STAMPS = itertools.count(1)


class _Nodes(dict):
    """path -> (data, version), which also keeps, for every directory, the names below it
    and how many nodes each name leads to: a cycle lists a few directories (the ready
    queue, the presences, the deploy queue), and scanning every node for each listing made
    a cycle cost O(all nodes) several times over at hundreds of hosts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.below: dict[str, dict[str, int]] = {}
        # When each area last changed ("current", "current/A", "hosts", ...: a node's first
        # and first two path components), from one clock for all instances, so that a
        # view's parts can be kept until their area changes (MirrorCoordinator._parts).
        self.stamps: dict[str, int] = {}
        self.epoch = next(_STAMPS)
        self.update(*args, **kwargs)

    def _touch(self, path: str) -> None:
        stamp = next(_STAMPS)
        cut = path.find("/")
        if cut < 0:
            self.stamps[path] = stamp
            return
        self.stamps[path[:cut]] = stamp
        second = path.find("/", cut + 1)
        self.stamps[path if second < 0 else path[:second]] = stamp

    def _count(self, path: str, step: int) -> None:
        start = 0
        while True:
            cut = path.find("/", start)
            parent = path[:start - 1] if start else ""
            name = path[start:cut] if cut >= 0 else path[start:]
            names = self.below.setdefault(parent, {})
            left = names.get(name, 0) + step
            if left:
                names[name] = left
            else:
                del names[name]
                if not names:
                    del self.below[parent]
            if cut < 0:
                return
            start = cut + 1

    def __setitem__(self, path: str, value: tuple[bytes | None, int]) -> None:
        if path not in self:
            self._count(path, 1)
        super().__setitem__(path, value)
        self._touch(path)

    def __delitem__(self, path: str) -> None:
        super().__delitem__(path)
        self._count(path, -1)
        self._touch(path)

    _MISSING = object()

    def pop(self, path: str, default: Any = _MISSING) -> Any:  # type: ignore[override]
        if path in self:
            value = super().pop(path)
            self._count(path, -1)
            self._touch(path)
            return value
        if default is _Nodes._MISSING:
            raise KeyError(path)
        return default

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for path, value in dict(*args, **kwargs).items():
            self[path] = value

    def setdefault(self, path: str, value: Any = None) -> Any:  # type: ignore[override]
        if path not in self:
            self[path] = value
        return self[path]

    def clear(self) -> None:
        super().clear()
        self.below.clear()
        self.stamps.clear()
        self.epoch = next(_STAMPS)

    def popitem(self) -> tuple[str, Any]:
        path, value = super().popitem()
        self._count(path, -1)
        self._touch(path)
        return path, value

    def names(self, path: str) -> list[str]:
        return sorted(self.below.get(path, ()))


class _Mirror:
    """What the host knows of the store: path -> (data, version). ``None`` data: a node
    known to exist whose value was not read (another host's ready-queue entry)."""

    def __init__(self) -> None:
        self._nodes = _Nodes()

    @property
    def nodes(self) -> _Nodes:
        return self._nodes

    @nodes.setter
    def nodes(self, value: dict[str, tuple[bytes | None, int]]) -> None:
        self._nodes = value if isinstance(value, _Nodes) else _Nodes(value)

    def children(self, path: str) -> list[str]:
        """The names directly below ``path``, as the store would list them (a name counts
        while any node at or below it is known)."""
        return self._nodes.names(path)


@lru_cache(maxsize=64)
def _assumed_entry(staged: bytes | None) -> bytes:
    """The value taken for another host's unread ready entry: the staged version (parsed
    once per staged value, not once per entry and cycle)."""
    try:
        assumed = json.loads(staged or b"{}").get("version")
    except (ValueError, AttributeError, RecursionError):  # a nested staged value
        assumed = None
    return dumps({"version": assumed if isinstance(assumed, str) else "?"})


_GATE_PREFIX = layout.GATE + "/"
_STAGING_PREFIX = layout.STAGING + "/"


class _MirrorReader:
    """A read-only :class:`Store` face of the mirror, so :mod:`.snapshot` builds the same
    :class:`ServiceView` from it as from the store. Another host's ready-queue entry is
    not read: it is taken to be for the staged version (hosts enter the queue only for
    the staged version and leave entries for any other on their next cycle). That can
    only place this host further back or keep an item open longer, never let it past
    the gate sooner; the gate's commit decides on the gate's version anyway."""

    def __init__(self, mirror: _Mirror, gate_versions: dict[str, int]) -> None:
        self.mirror = mirror
        self.gate_versions = gate_versions

    def get(self, path: str, watch=None) -> tuple[bytes, int]:
        # Called once per presence and entry on every view: string tests, no split.
        if path.startswith(_GATE_PREFIX) and "/" not in path[len(_GATE_PREFIX):]:
            return b"", self.gate_versions.get(path[len(_GATE_PREFIX):], -1)
        found = self.mirror.nodes.get(path)
        if found is None:
            raise NoNode(path)
        data, version = found
        if data is None and path.startswith(_STAGING_PREFIX) and path.count("/") == 2:
            staged = self.mirror.nodes.get(path.rpartition("/")[0])
            data = _assumed_entry(staged[0] if staged else None)
        return data or b"", version

    def exists(self, path: str, watch=None) -> int | None:
        try:
            return self.get(path)[1]
        except NoNode:
            return None

    def children(self, path: str, watch=None) -> list[str]:
        names = self.mirror.children(path)
        if layout.split(path)[0] == layout.CURRENT:  # unread presences: see view()
            names = [n for n in names if self.mirror.nodes.get(f"{path}/{n}", (b"",))[0]
                     is not None]
        return names


class _BareReader(_MirrorReader):
    """The mirror with no presences and no ready-queue entries listed: read_view through it
    reads the service's other nodes only (MirrorCoordinator.view adds the two parts)."""

    def children(self, path: str, watch=None) -> list[str]:
        if layout.split(path)[0] in (layout.CURRENT, layout.STAGING):
            return []
        return super().children(path, watch)


class MirrorCoordinator(Coordinator):
    """ZooKeeper 3.6+: follow by persistent recursive watches into a local mirror."""

    def __init__(self, store: Store, host: str, services: Sequence[str], wake: Waker) -> None:
        super().__init__(store, host, services, wake)
        self._lock = threading.Lock()
        self._events: deque[tuple[int, str, str]] = deque()
        self._mirror = _Mirror()
        self._gates: dict[str, int] = {}
        self._stale_gates: set[str] = set(self.services)
        self._loaded = False
        self._cut_at = -1
        self._generation = 0  # moves on every session change: a load in flight is void
        self.notifications = 0
        self._reader = _MirrorReader(self._mirror, self._gates)
        self._sessions_followed = False  # set by a ZooKeeper load (_followed has hosts/)
        # No herd (docs/design.md §4.6), as the re-reading coordinator's one-shot watches
        # do it: every notification updates the mirror, but only one that can change this
        # host's next decision wakes it. Until a cycle says otherwise a host is at the front.
        self._front: dict[str, bool] = {}
        self._ahead: dict[str, frozenset[str]] = {}  # svc -> ready entries it waits on
        self.wakeups = 0  # notifications that woke the agent (the rest wait for its next cycle)
        # A cycle woken by poll_interval with nothing new builds no view: the last one is
        # kept until the mirror changes (building it walks every presence and entry).
        self._changes = 0
        self._last_queue: tuple[int, tuple[list[DeployItem], list[str]]] | None = None
        self._last_views: dict[str, tuple[int, object, tuple[str, ...], ServiceView]] = {}
        self._bare = _BareReader(self._mirror, self._gates)  # the view without its two parts
        self._parts: dict[str, tuple[tuple, Any]] = {}  # area -> (_part_key, part)
        self._unread_entries: dict[str, CurrentEntry] = {}

    def _followed(self) -> list[str]:
        # hosts/: only which hosts have a live session (hosts/<host>/session exists), from
        # the notifications; never read (see view()).
        out = [layout.DEPLOY, layout.HOSTS]
        for svc in self.services:
            out += [layout.service(svc), layout.staged(svc), layout.presence_dir(svc),
                    layout.released(svc), layout.gate(svc)]
        return out

    # -- notifications (kazoo's connection thread: never block) --------------------------
    def _notified(self, kind: str, path: str) -> None:
        with self._lock:
            self.notifications += 1
            self._events.append((self.notifications, kind, path))
            wake = self._wakes(path)
            if wake:
                self.wakeups += 1
        if wake:
            self._wake()

    def _wakes(self, path: str) -> bool:
        """Whether a change of ``path`` can change this host's next decision. Deploy items,
        the spec, the staged release and the released version concern every host. Presences,
        ready entries and the gate concern a host at the front (it may pass the gate now, or
        must complete the item); a host further back only the k entries just ahead of it
        (one must go before it can be eligible, see ``Agent._arm_queue_watches``) and its
        own nodes. The others learn of those changes at their next cycle, woken by one of
        the above or by ``poll_interval``."""
        parts = layout.split(path)
        if parts[0] not in (layout.CURRENT, layout.STAGING, layout.GATE) or len(parts) < 2:
            return True
        svc = parts[1]
        if (parts[0] == layout.STAGING and len(parts) == 2) or self._front.get(svc, True):
            return True
        if len(parts) != 3:
            return False
        if parts[0] == layout.CURRENT:
            return parts[2] == self.host
        if parts[0] == layout.STAGING:
            return parts[2].rpartition("-")[0] == self.host or path in self._ahead.get(svc, ())
        return False

    def _rearm(self) -> None:
        """After the front or the entries waited on changed: a notification that arrived
        during the cycle, judged by the old ones, may matter now (it is not applied yet)."""
        with self._lock:
            wake = any(self._wakes(path) for _, _, path in self._events)
        if wake:
            self._wake()

    def set_front(self, svc: str, front: bool) -> None:  # noqa: D102
        if self._front.get(svc) == front and not self._ahead.get(svc):
            return
        with self._lock:
            self._front[svc] = front
            self._ahead[svc] = frozenset()
        self._rearm()

    def wait_ahead(self, svc: str, nodes: Sequence[str]) -> None:  # noqa: D102
        paths = frozenset(layout.ready_entry(svc, node) for node in nodes)
        if self._ahead.get(svc) == paths:
            return
        with self._lock:
            self._ahead[svc] = paths
        if any(path not in self._mirror.nodes for path in paths):
            self._wake()  # gone already: look again now
        self._rearm()

    def _cut(self) -> Callable[[], None]:
        """A mark for :meth:`Store.sync_marked`: remembers how many notifications had
        arrived when the reply did (kazoo's reader thread)."""
        def mark() -> None:
            with self._lock:
                self._cut_at = self.notifications
        self._cut_at = -1
        return mark

    def on_session(self, state: SessionState) -> None:
        if state is not SessionState.CONNECTED:
            self._generation += 1
            self._loaded = False  # watches go with the connection; rebuild when back
            self._wake()

    def reload(self) -> None:
        self._generation += 1
        self._loaded = False

    def _contended(self, svc: str) -> None:
        self._stale_gates.add(svc)  # read the gate's version afresh next time
        self._changes += 1

    # -- loading and applying --------------------------------------------------------------
    def follow(self) -> None:
        if not self._loaded:
            self._load()
        self._apply()

    def _load(self) -> None:
        generation = self._generation
        with self._lock:
            self._events.clear()
        for path in self._followed():  # watches first: nothing between them and the read
            self.store.watch_tree(path, self._notified)
        mirror = _Mirror()
        for path in self._followed():
            parts = layout.split(path)
            if parts[0] == layout.GATE:
                try:
                    self._gates[parts[1]] = self.store.get(path)[1]
                except NoNode:
                    self._gates[parts[1]] = -1
                continue
            if path == layout.HOSTS:
                for name in self.store.children(path):
                    if "session" in self.store.children(layout.host(name)):
                        mirror.nodes[layout.session(name)] = (None, -1)
                continue
            self._read_into(mirror, path)
            for child in self.store.children(path):
                sub = f"{path}/{child}"
                if self._lazy(sub):
                    mirror.nodes[sub] = (None, -1)  # another host's entry: not read
                else:
                    self._read_into(mirror, sub)
        self._mirror.nodes = mirror.nodes
        self._sessions_followed = getattr(self.store, "knows_owners", False)
        self._changes += 1
        self._stale_gates = set()
        for svc in self.services:
            self._own[svc] = {}
        # A connection lost meanwhile took the watches with it: load again next time.
        self._loaded = generation == self._generation

    def _read_into(self, mirror: _Mirror, path: str) -> None:
        try:
            mirror.nodes[path] = self.store.get(path)
        except NoNode:
            mirror.nodes.pop(path, None)

    def _lazy(self, path: str) -> bool:
        """Another host's ready-queue entry or presence: its existence is what the cycle
        needs; the value is read only when a decision needs it (:meth:`resolve`)."""
        parts = layout.split(path)
        if len(parts) != 3 or parts[0] not in (layout.STAGING, layout.CURRENT):
            return False
        owner = parts[2].rpartition("-")[0] if parts[0] == layout.STAGING else parts[2]
        return owner != self.host

    def _apply(self, upto: int | None = None, uncounted: str | None = None) -> None:
        """Each notified node once, in its last state: deleted ones dropped, others read
        (the one node), except those this host need not read. The gate's version is
        counted from its notifications (each data change is one notification, in order,
        and adds one to the version), so the gate is not read either."""
        with self._lock:
            events = []
            while self._events and (upto is None or self._events[0][0] <= upto):
                events.append(self._events.popleft()[1:])
        if events:
            self._changes += 1
        for kind, path in events:  # the gate: every event counts
            parts = layout.split(path)
            if parts[0] == layout.GATE and len(parts) == 2 and parts[1] != uncounted:
                svc = parts[1]
                if kind == "changed" and self._gates.get(svc, -1) >= 0:
                    self._gates[svc] += 1
                elif kind == "created":
                    self._gates[svc] = 0
                else:
                    self._stale_gates.add(svc)
        last: dict[str, str] = {}
        for kind, path in events:
            last.pop(path, None)
            last[path] = kind
        try:
            self._apply_nodes(last)
        except StoreError:
            # The notifications are taken off the queue: a read that failed half-way (a
            # timeout on a starved machine) would leave the mirror without the rest for
            # good, e.g. ready entries long gone. Rebuild it at the next follow instead.
            self._loaded = False
            raise

    def _apply_nodes(self, last: dict[str, str]) -> None:
        for path, kind in last.items():
            parts = layout.split(path)
            if parts[0] == layout.GATE:
                continue
            if parts[0] == layout.HOSTS:  # only a live session's coming and going
                if len(parts) == 3 and path == layout.session(parts[1]):
                    if kind == "deleted":
                        self._mirror.nodes.pop(path, None)
                    else:
                        self._mirror.nodes[path] = (None, -1)
                continue
            if kind == "deleted":
                self._mirror.nodes.pop(path, None)
                continue
            if self._lazy(path):
                self._mirror.nodes[path] = (None, -1)
                continue
            if parts[0] in (layout.STAGING, layout.CURRENT) and len(parts) == 3 \
                    and kind == "created" and self._mirror.nodes.get(path, (None,))[0]:
                continue  # our own entry or presence, recorded when we made it
            self._read_into(self._mirror, path)

    def _wrote(self, path: str, data: bytes) -> None:
        self._mirror.nodes[path] = (data, 0)
        self._changes += 1

    def _gone(self, path: str) -> None:
        self._mirror.nodes.pop(path, None)
        self._changes += 1

    # -- views ------------------------------------------------------------------------------
    def queue(self) -> tuple[list[DeployItem], list[str]]:
        if self._last_queue is not None and self._last_queue[0] == self._changes:
            return self._last_queue[1]
        result = read_queue(self._reader)  # type: ignore[arg-type]
        self._last_queue = (self._changes, result)
        return result

    def fresh_view(self, svc: str) -> ServiceView:
        """``sync()``: every notification up to now has then arrived on this connection
        (ZooKeeper delivers watch events before later replies, in order); apply them (the
        changed nodes only) and read the gate's version: one read beyond the sync."""
        # The mirror and the gate's version must describe the same instant: apply exactly
        # the notifications that arrived before the reply of one marked request (ZooKeeper
        # sends every notification of an earlier change, a multi's all together, before
        # that reply, and none of a later one). A later change only makes the commit fail.
        store: Any = self.store
        if svc in self._stale_gates or svc not in self._gates:
            # The gate read is the cut: notifications before it are in the version read.
            self._apply()
            try:
                _, self._gates[svc] = store.get_marked(layout.gate(svc), self._cut())
            except NoNode:
                self._gates[svc] = -1
            self._changes += 1
            self._stale_gates.discard(svc)
            uncounted: str | None = svc
        else:
            store.sync_marked("", self._cut())
            uncounted = None
        if not self._loaded:
            raise StoreUnavailable("the connection changed during the gate: mirror rebuilt "
                                   "on the next cycle")
        if self._cut_at < 0:  # no reply mark: the gate node is missing
            self._stale_gates.add(svc)
            raise StoreError(f"{layout.gate(svc)} is missing: the gate cannot be passed "
                             "(the agent makes it, or `dcdeploy init` under ACLs)")
        self._apply(upto=self._cut_at, uncounted=uncounted)
        queue, invalid = self.queue()
        return self.view(svc, queue, invalid)

    def view(self, svc: str, queue: list[DeployItem], queue_invalid: list[str]) -> ServiceView:
        """The mirror's view. Another host's presence not read yet counts as serving an
        unknown version (``""``): hosts register only when serving, so it counts toward
        quorum as it would once read; it never lets an item complete (its version is not
        the item's) and never picks a recovery version, both of which :meth:`resolve`
        first. A hand-written presence with another state is counted as serving until
        read: no more than a host can already do (it may create siblings, see
        docs/security-zk.md)."""
        last = self._last_views.get(svc)
        if last is not None and last[0] == self._changes and last[1] is queue \
                and last[2] == tuple(queue_invalid):
            return last[3]
        # Everything but the presences and the ready queue (a few nodes), then those two
        # parts, each kept until a node of its own area (or a session) changes: a
        # notification changes one of them, and a host at the front builds its view twice
        # per hand-off (its cycle, then the gate's), each walking N presences and entries.
        base = read_view(self._bare, svc, queue, queue_invalid)  # type: ignore[arg-type]
        if needs_racks(base):
            view = read_view(self._reader, svc, queue, queue_invalid)  # type: ignore[arg-type]
            return self._live_only(svc, self.resolve_racks(svc, view))
        current, current_problems, dead = self._current_part(svc)
        staging, staging_problems, dead_entries = self._staging_part(svc)
        problems = [*base.invalid, *current_problems, *staging_problems]
        problems += [f"presence of {svc} on {h} is not counted: {h} has no live session "
                     f"(hosts/{h}/session is missing)" for h in dead]
        problems += [f"ready-queue entry staging/{svc}/{e.node} is not counted: {e.host} "
                     "has no live session" for e in dead_entries]
        view = replace(base, current=current, staging=staging, invalid=problems)
        self._last_views[svc] = (self._changes, queue, tuple(queue_invalid), view)
        return view

    def _part_key(self, area: str) -> tuple:
        nodes = self._mirror.nodes
        return (nodes.epoch, nodes.stamps.get(area, 0), nodes.stamps.get(layout.HOSTS, 0),
                self._sessions_followed)

    def _live(self) -> Callable[[str], bool]:
        """Whether a host's presence or entry counts (see _live_only)."""
        if not self._sessions_followed:
            return lambda h: True
        nodes, me = self._mirror.nodes, self.host
        return lambda h: h == me or f"{layout.HOSTS}/{h}/session" in nodes

    def _kept(self, area: str, build: Callable[[], Any]) -> Any:
        """The part of the view made of the nodes below ``area``: the one built last
        while no node of the area (nor a session) changed since, else ``build()``."""
        key = self._part_key(area)  # before building: a change meanwhile renews it
        known = self._parts.get(area)
        if known is not None and known[0] == key:
            return known[1]
        part = build()
        self._parts[area] = (key, part)
        return part

    def _current_part(self, svc: str) -> tuple[dict[str, CurrentEntry], list[str], list[str]]:
        """The presences as read_view, view() and _live_only make them: those read (each
        value parsed once), then those not read (version ""), less those without a live
        session; the problems; the hosts left out for that (sorted)."""
        area = layout.presence_dir(svc)
        return self._kept(area, lambda: self._build_current(svc, area))

    def _build_current(self, svc: str, area: str) -> tuple[dict[str, CurrentEntry], list[str],
                                                           list[str]]:
        nodes = self._mirror.nodes
        prefix = area + "/"
        current: dict[str, CurrentEntry] = {}
        unread: dict[str, CurrentEntry] = {}
        problems: list[str] = []
        for host in nodes.names(area):
            found = nodes.get(prefix + host)
            if found is None:
                continue  # only nodes below it
            if found[0] is None:
                entry = self._unread_entries.get(host)
                if entry is None:
                    entry = self._unread_entries[host] = CurrentEntry(host=host, version="")
                unread[host] = entry
                continue
            try:
                current[host] = _current_entry(svc, host, bytes(found[0]))
            except InvalidData as exc:
                problems.append(str(exc))  # counted as not online: the safe side for quorum
        if unread:
            current.update(unread)
        live = self._live()
        dead = sorted(h for h in current if not live(h))
        if dead:
            current = {h: e for h, e in current.items() if live(h)}
        return current, problems, dead

    def _staging_part(self, svc: str) -> tuple[list[StagingEntry], list[str],
                                               list[StagingEntry]]:
        """The ready queue as read_staging reads it from the mirror, in sequence order,
        less the entries of hosts without a live session; the problems; the entries left
        out for that."""
        area = layout.staged(svc)
        return self._kept(area, lambda: self._build_staging(svc, area))

    def _build_staging(self, svc: str, area: str) -> tuple[list[StagingEntry], list[str],
                                                           list[StagingEntry]]:
        nodes = self._mirror.nodes
        prefix = area + "/"
        staged = nodes.get(area)
        assumed: bytes | None = None
        problems: list[str] = []
        entries: list[StagingEntry] = []
        for node in self._reader.children(area):  # the backend's order within a number
            found = nodes.get(prefix + node)
            if found is None:
                continue  # only nodes below it
            data = found[0]
            if data is None:  # another host's entry, not read (see _MirrorReader)
                if assumed is None:
                    assumed = _assumed_entry(staged[0] if staged else None)
                data = assumed
            try:
                entries.append(_staging_entry(svc, node, bytes(data)))
            except InvalidData as exc:
                problems.append(str(exc))
        entries.sort(key=lambda e: e.seq)
        live = self._live()
        dead = [e for e in entries if not live(e.host)]
        if dead:
            entries = [e for e in entries if live(e.host)]
        return entries, problems, dead

    def _live_only(self, svc: str, view: ServiceView) -> ServiceView:
        if not self._sessions_followed:
            return view
        # A presence counts only while its host has a live session (docs/security.md):
        # one forged under the name of a host that is down is named, never counted.
        # Likewise a ready-queue entry (a forged one would only place others further back).
        def live(h: str) -> bool:
            return h == self.host or layout.session(h) in self._mirror.nodes
        dead = sorted(h for h in view.current if not live(h))
        queued = [e for e in view.staging if live(e.host)]
        if not dead and len(queued) == len(view.staging):
            return view
        problems = [f"presence of {svc} on {h} is not counted: {h} has no live session "
                    f"(hosts/{h}/session is missing)" for h in dead]
        problems += [f"ready-queue entry staging/{svc}/{e.node} is not counted: {e.host} "
                     "has no live session" for e in view.staging if not live(e.host)]
        return replace(view, current={h: e for h, e in view.current.items() if live(h)},
                       staging=queued, invalid=[*view.invalid, *problems])

    def resolve(self, svc: str, view: ServiceView) -> ServiceView:
        """The presences not read yet, read. When one had gone the mirror caught up
        (:meth:`_read_unread`) and the ready queue is the mirror's too, so that both
        describe one instant; else the caller's (a canary hold passes one narrowed to
        the canaries)."""
        if not any(e.version == "" for e in view.current.values()):
            return view
        queue = list(view.queue)

        def unread() -> list[str]:
            return [layout.presence(svc, h)
                    for h, e in self.view(svc, queue, []).current.items() if e.version == ""]
        caught_up = self._read_unread(unread)
        fresh = self.view(svc, queue, [])
        return replace(view, current=fresh.current,
                       staging=fresh.staging if caught_up else view.staging)

    def resolve_racks(self, svc: str, view: ServiceView) -> ServiceView:
        """Reads the ready-queue entries and presences of ``svc`` not read yet (each once:
        an entry never changes, a presence is read again only after it changed). Called
        after the gate's sync too: a value read later than the cut can only show a host
        back (fewer down) or gone; a take-down after the cut fails the commit. One that
        went is not taken for offline (:meth:`_read_unread`)."""
        def unread() -> list[str]:
            paths = [layout.ready_entry(svc, n)
                     for n in self._mirror.children(layout.staged(svc))]
            paths += [layout.presence(svc, h)
                      for h in self._mirror.children(layout.presence_dir(svc))]
            return [p for p in paths if self._mirror.nodes.get(p, (b"",))[0] is None]
        self._read_unread(unread)
        fresh = read_view(self._reader, svc, list(view.queue), [])  # type: ignore[arg-type]
        return replace(view, staging=fresh.staging, current=fresh.current)

    def _read_unread(self, unread: Callable[[], list[str]]) -> bool:
        """Read the values of the nodes ``unread()`` names (known to exist, not read);
        True when the mirror caught up meanwhile (applied notifications).

        Those values are later than the mirror's last cut, while the rest of the view is
        that cut's. A node found gone breaks the view: a host whose presence went after
        the cut passed its gate after it, so its ready entry, made before that, may not
        be in the mirror yet; with its presence gone and no entry it looked offline, and
        a completion check on that view called the item done while it was mid-switch
        (its switch timing left out of the history record, tests/test_host_parallel.py).
        Every notification of a change before a read's reply has arrived by the reply
        (ZooKeeper sends them in order, kazoo hands them over on its reader thread):
        after one went, they are applied, so that the view is one instant again, and the
        presences that changed meanwhile (unread again) are read, up to RESOLVE_ROUNDS
        times; what is still unread after that counts as an unknown version, which
        never completes an item."""
        caught_up = False
        for _ in range(RESOLVE_ROUNDS):
            paths = unread()
            if not paths:
                break
            for path in paths:
                self._read_into(self._mirror, path)
            self._changes += 1  # the mirror holds more now: no cached view stands
            if all(path in self._mirror.nodes for path in paths):
                break
            self._apply()
            caught_up = True
        return caught_up

    def _own_entries(self, svc: str) -> list[str]:
        return [node for node in self._mirror.children(layout.staged(svc))
                if node.rpartition("-")[0] == self.host]

    def rejoin(self, svc: str, version: str, rack: str, switch: dict | None = None,
               probe: str | None = None) -> None:
        """Both in one commit: the next host in the queue waits for our entry to go, so
        this is one round trip (and one fsync on the server) less between two switches.
        When the commit fails (our presence is there already, an entry went meanwhile),
        the two steps apart, each of which copes with that."""
        entries = self._own_entries(svc)
        if self.host in self._mirror.children(layout.presence_dir(svc)) or not entries:
            super().rejoin(svc, version, rack, switch, probe)
            return
        self.claim_session()  # as register() does: readers count the presence by it
        data = CurrentEntry(host=self.host, version=version, since=time.time(), rack=rack,
                            switch=switch, probe=probe).to_json()
        path = layout.presence(svc, self.host)
        try:
            self.store.commit([Create(path, data, ephemeral=True)] +
                              [Delete(layout.ready_entry(svc, node)) for node in entries])
        except TransactionFailed:
            super().rejoin(svc, version, rack, switch, probe)
            return
        self._wrote(path, data)
        for node in entries:
            self._own[svc].pop(layout.ready_entry(svc, node), None)
            self._gone(layout.ready_entry(svc, node))


class _FollowReader(_MirrorReader):
    """The mirror as :mod:`.snapshot` reads it, with the ready queue in Consul's order:
    by sequence number, then by the entry's ``ModifyIndex`` (the raft index that made
    it: entries are never modified), so entries of one staged release, which share a
    number (:meth:`FollowCoordinator.enter_queue`), queue in the order Consul made them."""

    def children(self, path: str, watch=None) -> list[str]:
        names = super().children(path, watch)
        parts = layout.split(path)
        if parts[0] == layout.STAGING and len(parts) == 2:
            names.sort(key=lambda n: _entry_order(n, self.mirror.nodes.get(f"{path}/{n}")))
        return names


def _entry_order(name: str, known: tuple[bytes | None, int] | None) -> tuple[int, int]:
    seq = name.rpartition("-")[2]
    index = known[1] if known is not None and known[1] > 0 else 10 ** 19  # not read yet
    return (int(seq) if seq.isdigit() else -1, index)


PROMPT_SECS = 0.1  # a followed subtree is read at most this often while it matters now
# A consistent snapshot of a service (gate, presences, ready queue, deploy queue) is reused
# by the gate, completion and recovery only in the agent's cycle that read it, when no
# answer touched it since, and when it is at most this old.
FRESH_SECS = 1.0
# After the last entry of a deploy went, the host just ahead of it waits this long for
# that host to complete the item before it looks itself (the reconciler's fallback, L2).
COMPLETE_WATCH_SECS = 10.0
SNAPSHOT_LIMIT = 10 ** 10  # ready-queue suffixes have 10 digits


class FollowCoordinator(MirrorCoordinator):
    """Consul: the mirror kept by blocking reads (:meth:`ConsulStore.follow_tree`, in
    the manner of Patroni's consul.py), each answer the subtree's whole content, applied
    without a read of its own; decisions that need the ready queue and the presences
    fresh take one consistent snapshot of them (one request), which the gate's atomic
    commit (``/v1/txn``) then checks by the gate's version.

    Every answer of a blocking read is a request, so a host follows only what can change
    its next decision (docs/consul.md, "How an agent follows"):

    * always: the spec, the staged release and the released version (single keys);
    * the deploy queue, except while every service of the host waits in its ready queue
      behind the front: its follower then holds after an answer (no read outstanding)
      until the host is at the front or out of the queue, and is resumed from the state
      the host read last (the changes meanwhile cost one answer, or none when a
      snapshot already showed them);
    * behind the front of a ready queue, only the ``max_parallel`` entries just ahead
      (one key each, :meth:`wait_ahead`); when one goes, one snapshot;
    * at the front, the presences (one blocking read, started the cycle after the host
      found itself at the front without passing the gate, from the snapshot's index) and
      the entries still switching ahead of it;
    * out of the queue, nothing of the queue or the presences: completion and recovery
      read a snapshot first (:meth:`resolve`). Until then another host's presence counts
      with an unknown version (as the ZooKeeper mirror's unread presences do).

    A host enters the ready queue with one transaction that also reads the snapshot
    (:meth:`enter_queue`): its entry's sequence number is not taken from a shared counter
    (Consul has no sequential keys; a counter is contended when every host enters at
    once) but is one more than the highest Consul index the host has seen and than every
    entry it knows: an entry made after another was visible to its maker sorts after it.

    A follower that fails (500 "No cluster leader", unreachable, 403) makes
    :meth:`follow` raise that error (store unavailable / unauthorized, as any read
    would) until it answers again; the mirror is kept meanwhile."""

    def __init__(self, store: Store, host: str, services: Sequence[str], wake: Waker) -> None:
        super().__init__(store, host, services, wake)
        self._answers: deque[Any] = deque()
        self._followers: dict[str, Any] = {}  # follow key -> TreeFollower
        self._indexes: dict[str, int] = {}  # follow key -> index of what the mirror holds
        self._trouble: dict[str, StoreError] = {}
        self._pending: dict[str, tuple[bytes | None, float]] = {}  # own writes in flight
        self._ahead: dict[str, dict[str, Any]] = {svc: {} for svc in self.services}
        self._front: dict[str, bool] = {svc: False for svc in self.services}
        self._fresh: dict[str, tuple[int, float]] = {}  # svc -> (cycle, time) of its snapshot
        self._turn: set[str] = set()  # services whose snapshot is due (an entry ahead went)
        self._behind: dict[str, int] = {}  # svc -> cycle in which it waited behind the front
        self._cycle = 0
        self._deploy_held_at = 0  # the cycle that applied the deploy follower's last answer
        self._vanished: list[str] = []  # entries followed after our switch, now gone
        self._last_behind: dict[str, str] = {}  # svc -> the one entry behind ours, followed
        self._recheck: dict[str, float] = {}  # svc -> when to look whether its item is done
        self.snapshots = 0
        self._reader = _FollowReader(self._mirror, self._gates)

    # (key, path, recursive): the followers every host keeps
    def _follows(self) -> list[tuple[str, str, bool]]:
        out = [(layout.DEPLOY + "/", layout.DEPLOY, True)]
        for svc in self.services:
            out += [(layout.service(svc), layout.service(svc), False),
                    (layout.staged(svc), layout.staged(svc), False),
                    (layout.released(svc), layout.released(svc), False)]
            # Not the gate: only the gate's commit uses its version, read in a snapshot.
        return out

    def _specs(self) -> dict[str, tuple[str, bool]]:
        specs = {key: (path, recurse) for key, path, recurse in self._follows()}
        for svc in self.services:
            specs[layout.presence_dir(svc) + "/"] = (layout.presence_dir(svc), True)
        return specs

    def on_session(self, state: SessionState) -> None:
        # The followers do not depend on the session (they report an unreachable Consul
        # themselves); a lost session took our ephemerals: start over from a fresh read.
        if state is SessionState.LOST:
            self._generation += 1
            self._loaded = False
            self._wake()

    def _contended(self, svc: str) -> None:
        self._fresh.pop(svc, None)  # the gate moved on: read it again

    def _load(self) -> None:
        store: Any = self.store
        generation = self._generation
        with self._lock:
            self._answers.clear()
        self._pending.clear()
        self._fresh.clear()
        for svc in self.services:
            self._own[svc] = {}
            self._cancel_ahead(svc, ())
            self._stop_presences(svc)
        for key, path, recurse in self._follows():
            started = time.monotonic()
            index, tree = store.read_tree(path, recurse=recurse)
            self._indexes.pop(key, None)
            self._put(key, path, recurse, tree, started)
            self._indexes[key] = index
            self._trouble.pop(key, None)
            follower = self._followers.get(key)
            if follower is None or not follower.alive:
                self._followers[key] = store.follow_tree(
                    path, self._answered, recurse=recurse, index=index,
                    interval=PROMPT_SECS, hold=key == layout.DEPLOY + "/")
            elif key == layout.DEPLOY + "/":
                follower.resume(index)
        for svc in self.services:
            self._snapshot(svc)
        self._loaded = generation == self._generation

    def _answered(self, answer: Any) -> None:
        """A follower's thread: queue the answer for the agent's thread, wake it."""
        with self._lock:
            self.notifications += 1
            self._answers.append(answer)
        self._wake()

    def _apply(self, upto: int | None = None, uncounted: str | None = None) -> None:
        with self._lock:
            answers = list(self._answers)
            self._answers.clear()
        keys = {id(f): k for k, f in self._followers.items()}
        specs = self._specs()
        for answer in answers:
            key = keys.get(id(answer.follower))
            if key is None:
                continue  # a follower replaced meanwhile
            if answer.error is not None:
                self._trouble[key] = answer.error
                continue
            self._trouble.pop(key, None)
            path, recurse = specs[key]
            self._accept(key, path, recurse, answer.index, answer.tree, answer.started,
                         answer.reset)

    def _accept(self, key: str, path: str, recurse: bool, index: int, tree: dict,
                started: float, reset: bool = False) -> None:
        """Put one answer into the mirror unless the mirror already holds a later one
        (answers of one key are comparable by their X-Consul-Index)."""
        if not reset and index < self._indexes.get(key, 0):
            return
        self._indexes[key] = index
        self._put(key, path, recurse, tree, started)
        if key == layout.DEPLOY + "/":
            self._deploy_held_at = self._cycle
        parts = layout.split(path)
        if parts[0] == layout.CURRENT:
            self._fresh.pop(parts[1], None)  # presences moved: the snapshot is old

    def _put(self, key: str, path: str, recurse: bool, tree: dict, started: float) -> None:
        self._changes += 1  # every answer may change a view: no cached one stands
        parts = layout.split(path)
        if parts[0] == layout.GATE and not recurse:
            found = tree.get(path)
            self._gates[parts[1]] = found[1] if found else -1
            return
        nodes = self._mirror.nodes
        if recurse:
            for p in [p for p in nodes if p.startswith(path + "/")]:
                del nodes[p]
        else:
            nodes.pop(path, None)
        # A recursive answer holds the node ``path`` too: another follower owns it
        # (the staged release), and an older copy must not replace its newer one.
        nodes.update((p, v) for p, v in tree.items() if not recurse or p != path)
        # Our own writes: an answer to a read sent before a write cannot show it yet.
        for p, (data, at) in list(self._pending.items()):
            if not (p == path if not recurse else p.startswith(path + "/")):
                continue
            if started >= at:
                del self._pending[p]
            elif data is None:
                nodes.pop(p, None)
            else:
                nodes[p] = (data, nodes.get(p, (None, 0))[1])

    def _wrote(self, path: str, data: bytes) -> None:
        super()._wrote(path, data)
        self._pending[path] = (data, time.monotonic())

    def _gone(self, path: str) -> None:
        super()._gone(path)
        self._pending[path] = (None, time.monotonic())

    def follow(self) -> None:
        self._cycle += 1
        if not self._loaded:
            self._load()
        self._apply()
        with self._lock:
            due = set(self._turn)
            vanished, self._vanished = self._vanished, []
        now = time.monotonic()
        for path in vanished:
            svc, node = layout.split(path)[1:3]
            self._ahead[svc].pop(node, None)
            self._gone(path)
            self._pending.pop(path, None)
            if not self._front.get(svc) and not self._own_entries(svc) \
                    and not any(f.alive for f in self._ahead[svc].values()):
                # Every entry it knew of went: is the item done? The last host of the
                # queue completes it itself right away; the one just ahead of it looks
                # only if it has not, after COMPLETE_WATCH_SECS (that host died).
                if self._last_behind.get(svc) == node:
                    self._recheck[svc] = now + COMPLETE_WATCH_SECS
                elif not self._queued_for_item(svc):
                    due.add(svc)
        for svc, at in list(self._recheck.items()):
            if now >= at:
                del self._recheck[svc]
                if not self._own_entries(svc) and not self._queued_for_item(svc):
                    due.add(svc)
        for svc in sorted(due):
            self._snapshot(svc)
        for svc in self.services:
            if self._front[svc] and self._presences(svc) is None:
                self._start_presences(svc)
        # Held through a whole cycle since its last answer, and that cycle did not find
        # every service waiting behind the front: follow it again.
        if self._deploy_held_at < self._cycle and not all(
                self._behind.get(svc, -9) >= self._cycle - 1 for svc in self.services):
            self._resume_deploy()
        for error in sorted(self._trouble.values(),
                            key=lambda e: not isinstance(e, StoreUnauthorized)):
            raise error

    def reload(self) -> None:
        self._generation += 1
        self._loaded = False

    # -- snapshots -------------------------------------------------------------------------
    def _snapshot_paths(self, svc: str) -> list[tuple[str, str, bool]]:
        return [(layout.gate(svc), layout.gate(svc), False),
                (layout.presence_dir(svc) + "/", layout.presence_dir(svc), True),
                (layout.staged(svc) + "/", layout.staged(svc), True),
                (layout.DEPLOY + "/", layout.DEPLOY, True)]

    def _snapshot(self, svc: str, trees: Sequence[dict] | None = None,
                  started: float | None = None) -> None:
        """One consistent read (one request) of the gate, the presences, the ready queue
        and the deploy queue, put into the mirror (or ``trees`` read so already). A
        follower's answer to an older read is not accepted over it (index check)."""
        wanted = self._snapshot_paths(svc)
        if trees is None:
            store: Any = self.store
            started = time.monotonic()
            trees = store.read_trees([(path, recurse) for _, path, recurse in wanted])
            self.snapshots += 1
        assert started is not None
        for (key, path, recurse), tree in zip(wanted, trees):
            # What a follower started (or resumed) from here need not answer again: no
            # change at or below the newest index read is missing from the snapshot.
            newest = max((v[1] for v in tree.values()), default=0)
            self._indexes[key] = max(self._indexes.get(key, 0), newest)
            self._put(key, path, recurse, tree, started)
        if svc not in self._gates:
            self._gates[svc] = -1
        self._fresh[svc] = (self._cycle, time.monotonic())
        with self._lock:
            self._turn.discard(svc)

    def _queued_for_item(self, svc: str) -> bool:
        """Whether the mirror holds ready-queue entries for the head item of ``svc``
        (none: the item may be done; only a snapshot says)."""
        queue, _ = self.queue()
        if not any(item.service == svc for item in queue):
            return True  # no item of this service open: nothing to complete
        return any(n.rpartition("-")[0] != self.host
                   for n in self._mirror.children(layout.staged(svc)))

    def _is_fresh(self, svc: str) -> bool:
        """A snapshot read in this cycle, untouched by answers since, at most FRESH_SECS
        old: as fresh as a read made right before the commit (ZooKeeper's sync + read)."""
        at = self._fresh.get(svc)
        return at is not None and at[0] == self._cycle and \
            time.monotonic() - at[1] <= FRESH_SECS

    def fresh_view(self, svc: str) -> ServiceView:
        """The view on a consistent snapshot of the gate, the presences, the ready queue
        and the deploy queue: the one this cycle read (no answer touched it since, at most
        FRESH_SECS old), else one read now. The commit checks the gate's version as read
        there (a take-down since fails it) and the item's."""
        self._apply()
        if not self._is_fresh(svc):
            self._snapshot(svc)
        queue, invalid = self.queue()
        return self._view(svc, queue, invalid, marked=False)

    def resolve(self, svc: str, view: ServiceView) -> ServiceView:
        """The presences and the ready queue from a consistent snapshot: completion and
        recovery never decide on what is not followed."""
        if not self._is_fresh(svc):
            self._snapshot(svc)
        fresh = self._view(svc, list(view.queue), [], marked=False)
        return replace(view, current=fresh.current, staging=fresh.staging)

    def view(self, svc: str, queue: list[DeployItem], queue_invalid: list[str]) -> ServiceView:
        return self._view(svc, queue, queue_invalid, marked=True)

    def _view(self, svc: str, queue: list[DeployItem], queue_invalid: list[str],
              marked: bool) -> ServiceView:
        """The mirror's view. ``marked``: another host's presence counts with an unknown
        version (``""``) unless the presences are followed (at the front) or were read in
        a snapshot just now: it counts toward quorum, but never completes an item nor
        picks a recovery version (those :meth:`resolve` first, as on ZooKeeper)."""
        view = MirrorCoordinator.view(self, svc, queue, queue_invalid)
        if not marked or self._is_fresh(svc) or self._presences(svc) is not None:
            return view
        return replace(view, current={h: e if h == self.host else replace(e, version="")
                                      for h, e in view.current.items()})

    # -- the ready queue ----------------------------------------------------------------
    def enter_queue(self, svc: str, version: str, rack: str = "") -> str:
        """One transaction: the entry (ephemeral), and the snapshot after it, in which
        every entry made before ours is. The entry's number is the staged release's
        ``ModifyIndex`` + 1, the same for every host entering for this release: no
        shared counter to contend on (Consul has no sequential keys), and entries of
        one number queue by the raft index that made them (:class:`_FollowReader`), so
        in the order Consul made them; an entry for an older release sorts ahead and is
        left by its host on its next cycle."""
        self.claim_session()
        data = dumps({"version": version, "rack": rack} if rack else {"version": version})
        staged = self._mirror.nodes.get(layout.staged(svc))
        if staged is None or staged[1] <= 0:
            return super().enter_queue(svc, version, rack)
        seq = staged[1] + 1
        store: Any = self.store
        wanted = self._snapshot_paths(svc)
        for _ in range(3):
            if seq >= SNAPSHOT_LIMIT or not hasattr(store, "commit_reading"):
                return super().enter_queue(svc, version, rack)
            path = f"{layout.ready_prefix(svc, self.host)}{seq:010d}"
            started = time.monotonic()
            try:
                _, trees = store.commit_reading(
                    [Create(path, data, ephemeral=True)],
                    [(p, recurse) for _, p, recurse in wanted])
            except TransactionFailed as exc:
                if isinstance(exc.cause, NodeExists):
                    seq += 1  # ours from before (leaving it failed), or written by hand
                    continue
                return super().enter_queue(svc, version, rack)  # a parent is missing
            self.snapshots += 1
            self._own[svc][path] = version
            self._wrote(path, data)
            self._snapshot(svc, trees, started)
            return path
        return super().enter_queue(svc, version, rack)

    def set_front(self, svc: str, front: bool) -> None:
        # Not in the ready queue (fetching, installing, done): nothing to pass.
        queued = bool(self._own_entries(svc))
        front = front and queued
        if self._front.get(svc) != front:
            self._front[svc] = front
            if front:
                # The entries ahead that are switching now: their going frees a slot.
                self.wait_ahead(svc, self._entries_ahead(svc))
                self._wake()  # the next cycle follows the presences, unless we pass now
            else:
                self._stop_presences(svc)
                self._cancel_ahead(svc, ())
        if front or not queued:
            self._behind.pop(svc, None)
            self._resume_deploy()
        elif self._behind.get(svc, -9) < self._cycle - 1:
            # Queued behind the front: whether to follow the deploy queue is decided
            # by the next follow(), after this cycle's wait_ahead (one cycle more, now).
            follower = self._followers.get(layout.DEPLOY + "/")
            if follower is not None and follower.held:
                self._wake()

    def try_gate(self, svc: str, fresh: ServiceView, gate: dict, head: DeployItem | None,
                 record: Sequence[str] = ()) -> bool:
        passed = super().try_gate(svc, fresh, gate, head, record)
        # Switching now: the presences cannot change that. The entries still switching
        # ahead stay followed: whoever of this group is back last completes the item.
        self._front[svc] = False
        self._stop_presences(svc)
        self._fresh.pop(svc, None)
        return passed

    def rejoin(self, svc: str, version: str, rack: str, switch: dict | None = None,
               probe: str | None = None) -> None:
        """Back (one transaction, as on ZooKeeper). Then, for completion, without
        following the queue: the entries still switching ahead stay followed, and when
        exactly one entry was behind ours, it is followed too (if that host dies
        switching, nobody behind it would notice). When every entry this host knows of
        has gone, one snapshot: if the item is done, this host completes it."""
        entries = self._reader.children(layout.staged(svc))
        own = [i for i, n in enumerate(entries) if n.rpartition("-")[0] == self.host]
        behind = entries[own[0] + 1:] if own else []
        super().rejoin(svc, version, rack, switch, probe)
        if len(behind) == 1 and behind[0].rpartition("-")[0] != self.host:
            self._follow_entry(svc, behind[0], snapshot=False)
            self._last_behind[svc] = behind[0]

    def _entries_ahead(self, svc: str) -> list[str]:
        """The mirror's ready-queue entries ahead of our own (in the queue's order)."""
        entries = self._reader.children(layout.staged(svc))
        own = [i for i, n in enumerate(entries) if n.rpartition("-")[0] == self.host]
        return entries[:own[0]] if own else []

    def drop_entry(self, svc: str, node: str) -> None:
        """As for every backend, without the check for children that a plain delete
        makes on Consul (an entry has none): one request."""
        path = layout.ready_entry(svc, node)
        try:
            self.store.commit([Delete(path)])
        except TransactionFailed as exc:
            if not isinstance(exc.cause, NoNode):
                raise
        self._own[svc].pop(path, None)
        self._gone(path)

    def wait_ahead(self, svc: str, nodes: Sequence[str]) -> None:
        """Follow each of these entries (one key each, from the version the mirror holds);
        when one goes, a snapshot at the next cycle."""
        store: Any = self.store
        if not self._front.get(svc):
            self._behind[svc] = self._cycle  # (set_front came first in this cycle)
        self._cancel_ahead(svc, nodes)
        for node in nodes:
            if node in self._ahead[svc] and self._ahead[svc][node].alive:
                continue
            self._follow_entry(svc, node, snapshot=True)

    def _follow_entry(self, svc: str, node: str, snapshot: bool) -> None:
        """One ready-queue entry, followed (one key) until it goes; then a snapshot at
        the next cycle (``snapshot``: in the queue), or it just leaves the mirror."""
        store: Any = self.store
        path = layout.ready_entry(svc, node)
        known = self._mirror.nodes.get(path)
        if known is None:
            if snapshot:
                self._turn.add(svc)  # gone already: read the snapshot now
                self._wake()
            return

        def answered(answer: Any) -> None:
            if answer.tree is None:
                return
            # In the queue: gone, or made again (left for another service's switch and
            # back: a new place), both change our place. After our switch only a going.
            if snapshot or path not in answer.tree:
                answer.follower.cancel()
                with self._lock:
                    self.notifications += 1
                    (self._turn.add(svc) if snapshot else self._vanished.append(path))
                self._wake()
        self._ahead[svc][node] = store.follow_tree(path, answered, recurse=False,
                                                   index=max(1, known[1]),
                                                   interval=PROMPT_SECS)

    def _cancel_ahead(self, svc: str, keep: Sequence[str]) -> None:
        for node in [n for n in self._ahead[svc] if n not in keep]:
            self._ahead[svc].pop(node).cancel()

    # -- the presences (at the front) and the deploy queue (unless waiting behind) ------
    def _presences(self, svc: str) -> Any:
        follower = self._followers.get(layout.presence_dir(svc) + "/")
        return follower if follower is not None and follower.alive else None

    def _start_presences(self, svc: str) -> None:
        store: Any = self.store
        key = layout.presence_dir(svc) + "/"
        index = self._indexes.get(key, 0) if self._is_fresh(svc) else 0
        self._followers[key] = store.follow_tree(
            layout.presence_dir(svc), self._answered, recurse=True, index=index,
            interval=PROMPT_SECS)

    def _stop_presences(self, svc: str) -> None:
        follower = self._followers.pop(layout.presence_dir(svc) + "/", None)
        if follower is not None:
            follower.cancel()

    def _resume_deploy(self) -> None:
        """The deploy queue's follower, held since its last answer, reads again: from
        the newest state this host has of it (a snapshot may have shown more)."""
        follower = self._followers.get(layout.DEPLOY + "/")
        if follower is not None and follower.held:
            follower.resume(self._indexes.get(layout.DEPLOY + "/"))


def coordinator_for(store: Store, host: str, services: Sequence[str],
                    wake: Waker) -> Coordinator:
    """The mirror where the backend can follow a subtree (ZooKeeper: watches; Consul:
    blocking reads), else re-reading."""
    if getattr(store, "supports_tree_follow", False):
        return FollowCoordinator(store, host, services, wake)
    if getattr(store, "supports_tree_watch", False):
        return MirrorCoordinator(store, host, services, wake)
    return RereadCoordinator(store, host, services, wake)
