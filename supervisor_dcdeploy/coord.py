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
* :class:`RereadCoordinator` (any backend without ``watch_tree``, today Consul): the same
  operations, the view re-read on each cycle as before.

Paths come from :mod:`.store.layout` only.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from functools import lru_cache
from typing import Any, Callable, Sequence

from .decisions import ServiceView
from dataclasses import replace

from .model import CurrentEntry, DeployItem, InvalidData, dumps
from .snapshot import read_queue, read_view
from .store import (Check, Create, Delete, NodeExists, NoNode, SessionState, SetData, Store,
                    StoreError, StoreUnavailable, TransactionFailed)
from .store import layout

Waker = Callable[[], None]


class Coordinator:
    """The domain operations, shared by both ways of following the store."""

    def __init__(self, store: Store, host: str, services: Sequence[str], wake: Waker) -> None:
        self.store = store
        self.host = host
        self.services = tuple(services)
        self._wake = wake
        self._own: dict[str, dict[str, str]] = {svc: {} for svc in self.services}

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

    def set_front(self, svc: str, front: bool) -> None:
        """Whether this host may pass the gate now (no herd: only those follow the gate)."""

    # -- presence -----------------------------------------------------------------------
    def register(self, svc: str, version: str, rack: str) -> None:
        data = dumps({"version": version, "state": "serving", "since": time.time(),
                      "rack": rack})
        path = layout.presence(svc, self.host)
        try:
            self.store.create(path, data, ephemeral=True)
        except NodeExists:
            self.store.set(path, data)
        self._wrote(path, data)

    def unregister(self, svc: str) -> None:
        path = layout.presence(svc, self.host)
        try:
            self.store.delete(path)
        except NoNode:
            pass
        self._gone(path)

    # -- the ready queue ----------------------------------------------------------------
    def enter_queue(self, svc: str, version: str) -> str:
        data = dumps({"version": version})
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

    def _own_entries(self, svc: str) -> list[str]:
        return [node for node in self.store.children(layout.staged(svc))
                if node.rpartition("-")[0] == self.host]

    def rejoin(self, svc: str, version: str, rack: str) -> None:
        """Back from a switch: register as serving ``version`` and leave the ready queue."""
        self.register(svc, version, rack)
        self.leave_queue(svc)

    # -- the gate, failure, completion ---------------------------------------------------
    def try_gate(self, svc: str, fresh: ServiceView, gate: dict, head: DeployItem | None) -> bool:
        """One atomic commit: the gate's version checked and bumped, our presence deleted,
        the head item moved to ``rolling`` (CAS, so a concurrent pause or failure mark
        invalidates the take-down). False when another host or the operator won."""
        ops: list = [SetData(layout.gate(svc), dumps(gate), fresh.gate_version)]
        if self.host in fresh.current:
            ops.append(Delete(layout.presence(svc, self.host)))
        if head is not None and head.state == "waiting":
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

    def mark_failed(self, node: str, reason: str) -> bool:
        """Mark the deploy item failed (CAS); False when there is nothing to mark."""
        for _ in range(5):
            try:
                raw, version = self.store.get(layout.item(node))
            except NoNode:
                return False  # aborted meanwhile
            try:
                item = DeployItem.parse(node, raw, version)
            except InvalidData:
                return False
            if item.state not in ("waiting", "rolling", "paused"):
                return False
            data = replace(item, state="failed", reason=reason, host=self.host,
                           updated=time.time()).to_json()
            try:
                self.store.set(layout.item(node), data, version)
                return True
            except StoreUnavailable:
                raise
            except StoreError:
                continue
        return False

    def complete(self, svc: str, head: DeployItem, reason: str) -> bool:
        record = replace(head, state="done", reason=reason, updated=time.time()).to_json()
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
    return replace(head, state="rolling", updated=time.time()).to_json()


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
        return read_view(self.store, svc)

    def wait_ahead(self, svc: str, nodes: Sequence[str]) -> None:
        for node in nodes:
            if self.store.exists(layout.ready_entry(svc, node), self._wake) is None:
                self._wake()  # gone already: look again now


class _Mirror:
    """What the host knows of the store: path -> (data, version). ``None`` data: a node
    known to exist whose value was not read (another host's ready-queue entry)."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes | None, int]] = {}

    def children(self, path: str) -> list[str]:
        prefix = path + "/"
        return sorted({p[len(prefix):].split("/", 1)[0] for p in self.nodes
                       if p.startswith(prefix)})


@lru_cache(maxsize=64)
def _assumed_entry(staged: bytes | None) -> bytes:
    """The value taken for another host's unread ready entry: the staged version (parsed
    once per staged value, not once per entry and cycle)."""
    try:
        assumed = json.loads(staged or b"{}").get("version")
    except (ValueError, AttributeError):
        assumed = None
    return dumps({"version": assumed if isinstance(assumed, str) else "?"})


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
        parts = layout.split(path)
        if parts[0] == layout.GATE and len(parts) == 2:
            return b"", self.gate_versions.get(parts[1], -1)
        found = self.mirror.nodes.get(path)
        if found is None:
            raise NoNode(path)
        data, version = found
        if data is None and parts[0] == layout.STAGING and len(parts) == 3:
            staged = self.mirror.nodes.get(layout.staged(parts[1]))
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

    def _followed(self) -> list[str]:
        out = [layout.DEPLOY]
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
            self._read_into(mirror, path)
            for child in self.store.children(path):
                sub = f"{path}/{child}"
                if self._lazy(sub):
                    mirror.nodes[sub] = (None, -1)  # another host's entry: not read
                else:
                    self._read_into(mirror, sub)
        self._mirror.nodes = mirror.nodes
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
        view = read_view(self._reader, svc, queue, queue_invalid)  # type: ignore[arg-type]
        unread = {host: CurrentEntry(host=host, version="")
                  for host in self._mirror.children(layout.presence_dir(svc))
                  if self._mirror.nodes.get(layout.presence(svc, host), (b"",))[0] is None}
        if unread:
            view = replace(view, current={**view.current, **unread})
        self._last_views[svc] = (self._changes, queue, tuple(queue_invalid), view)
        return view

    def resolve(self, svc: str, view: ServiceView) -> ServiceView:
        unread = [h for h, e in view.current.items() if e.version == ""]
        if not unread:
            return view
        for host in unread:
            self._read_into(self._mirror, layout.presence(svc, host))
        self._changes += 1
        return replace(view, current=self.view(svc, list(view.queue), []).current)

    def _own_entries(self, svc: str) -> list[str]:
        return [node for node in self._mirror.children(layout.staged(svc))
                if node.rpartition("-")[0] == self.host]

    def rejoin(self, svc: str, version: str, rack: str) -> None:
        """Both in one commit: the next host in the queue waits for our entry to go, so
        this is one round trip (and one fsync on the server) less between two switches.
        When the commit fails (our presence is there already, an entry went meanwhile),
        the two steps apart, each of which copes with that."""
        entries = self._own_entries(svc)
        if self.host in self._mirror.children(layout.presence_dir(svc)) or not entries:
            super().rejoin(svc, version, rack)
            return
        data = dumps({"version": version, "state": "serving", "since": time.time(),
                      "rack": rack})
        path = layout.presence(svc, self.host)
        try:
            self.store.commit([Create(path, data, ephemeral=True)] +
                              [Delete(layout.ready_entry(svc, node)) for node in entries])
        except TransactionFailed:
            super().rejoin(svc, version, rack)
            return
        self._wrote(path, data)
        for node in entries:
            self._own[svc].pop(layout.ready_entry(svc, node), None)
            self._gone(layout.ready_entry(svc, node))


def coordinator_for(store: Store, host: str, services: Sequence[str],
                    wake: Waker) -> Coordinator:
    """The mirror where the backend can follow a subtree, else re-reading."""
    if getattr(store, "supports_tree_watch", False):
        return MirrorCoordinator(store, host, services, wake)
    return RereadCoordinator(store, host, services, wake)
