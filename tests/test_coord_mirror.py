"""The mirror's gate view is one consistent instant (coord.MirrorCoordinator.fresh_view).

A store double stands in for ZooKeeper: the test decides which notifications arrive before
and after the reply that marks the cut, as kazoo's reader thread would see them."""

from __future__ import annotations

from supervisor_dcdeploy.coord import MirrorCoordinator
from supervisor_dcdeploy.model import dumps
from supervisor_dcdeploy.store import NoNode

HOSTS = ("h0", "h1", "h2", "h3", "h4")


class Double:
    def __init__(self) -> None:
        self.nodes: dict[str, tuple[bytes, int]] = {"gate/A": (b"{}", 5)}
        for host in HOSTS:
            self.nodes[f"current/A/{host}"] = (dumps({"version": "1"}), 0)
        self.after_reply: list = []  # notifications that arrive after the marked reply

    def watch_tree(self, path, watcher) -> bool:
        return True

    def get(self, path, watch=None):
        if path not in self.nodes:
            raise NoNode(path)
        return self.nodes[path]

    def children(self, path, watch=None):
        prefix = path + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self.nodes if p.startswith(prefix)})

    def sync_marked(self, path, mark) -> None:
        mark()
        for deliver in self.after_reply:
            deliver()

    def get_marked(self, path, mark):
        mark()
        for deliver in self.after_reply:
            deliver()
        return self.get(path)


def test_a_take_down_notified_after_the_cut_is_left_out_whole():
    store = Double()
    coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    assert coord.fresh_view("A").gate_version == 5
    # h4 passes the gate: one multi bumps the gate and deletes its presence. Its first
    # notification arrives after the reply that marks the cut, the second later still.
    store.nodes["gate/A"] = (b"{}", 6)
    del store.nodes["current/A/h4"]
    store.after_reply = [lambda: coord._notified("changed", "gate/A")]
    view = coord.fresh_view("A")
    # Neither half of h4's change is in this view: the old gate version with h4 online, so
    # the commit's CAS fails. Counting the gate bump alone would have let it succeed with
    # h4 counted as online.
    assert view.gate_version == 5 and "h4" in view.current
    store.after_reply = []
    coord._notified("deleted", "current/A/h4")
    view = coord.fresh_view("A")
    assert view.gate_version == 6 and "h4" not in view.current


def test_a_gate_read_afresh_matches_the_mirror():
    store = Double()
    coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    coord._contended("A")  # a lost race: the version is read again at the next gate
    store.nodes["gate/A"] = (b"{}", 6)
    del store.nodes["current/A/h4"]
    # Both notifications arrive before the reply of the gate read that carries version 6.
    coord._notified("changed", "gate/A")
    coord._notified("deleted", "current/A/h4")
    view = coord.fresh_view("A")
    assert view.gate_version == 6 and "h4" not in view.current
    # Not counted twice: the next gate (no change meanwhile) uses 6 again.
    assert coord.fresh_view("A").gate_version == 6


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_only_what_can_change_the_decision_wakes_a_host_further_back():
    store = Double()
    ahead = ("h0-0000000001", "h2-0000000002")
    for node in (*ahead, "h1-0000000003", "h3-0000000004"):
        store.nodes[f"staging/A/{node}"] = (dumps({"version": "2"}), 0)
    wakes = Wakes()
    coord = MirrorCoordinator(store, "h1", ["A"], wakes)  # type: ignore[arg-type]
    coord.follow()
    coord._notified("deleted", "current/A/h4")
    assert wakes.count == 1  # at first every host counts as at the front
    coord.follow()
    coord.set_front("A", False)
    coord.wait_ahead("A", list(ahead))
    wakes.count = 0
    for kind, path in [("deleted", "current/A/h3"), ("created", "current/A/h3"),
                       ("changed", "gate/A"), ("deleted", "staging/A/h3-0000000004")]:
        coord._notified(kind, path)
    assert wakes.count == 0  # other hosts' switches behind or beside it: not woken
    coord._notified("deleted", f"staging/A/{ahead[0]}")
    assert wakes.count == 1  # one of the k entries just ahead went
    coord._notified("deleted", "current/A/h1")
    assert wakes.count == 2  # its own presence
    for path in ("deploy/item-0000000001", "services/A", "staging/A", "released/A"):
        coord._notified("changed", path)
    assert wakes.count == 6  # the queue, spec, staged release and released: everyone
    # Nothing was lost: the next cycle applies every notification to the mirror.
    del store.nodes["current/A/h4"]
    coord.follow()
    assert "h4" not in coord.view("A", [], []).current


def test_a_change_during_the_cycle_wakes_once_it_matters():
    store = Double()
    wakes = Wakes()
    coord = MirrorCoordinator(store, "h1", ["A"], wakes)  # type: ignore[arg-type]
    coord.follow()
    coord.set_front("A", False)
    coord.follow()
    wakes.count = 0
    # Arrives while the cycle still judges by "not at the front"; the same cycle then
    # finds the host at the front: the pending change must wake it.
    coord._notified("changed", "gate/A")
    assert wakes.count == 0
    coord.set_front("A", True)
    assert wakes.count == 1
    # Likewise an entry it now waits on that went before the wait was armed.
    coord.follow()
    coord.set_front("A", False)
    wakes.count = 0
    coord._notified("created", "staging/A/h0-0000000009")
    coord.wait_ahead("A", ["h0-0000000009"])
    assert wakes.count >= 1


class WritingDouble(Double):
    """Also takes writes: ``commit`` applies a multi whole or raises, like ZooKeeper's."""

    session_id = None  # no session marker (coord.claim_session does nothing)

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list] = []
        self.calls: list[str] = []

    def commit(self, ops) -> None:
        from supervisor_dcdeploy.store import Create, Delete, NodeExists, TransactionFailed
        self.commits.append(list(ops))
        for i, op in enumerate(ops):
            if isinstance(op, Create) and op.path in self.nodes:
                raise TransactionFailed(i, NodeExists(op.path))
            if isinstance(op, Delete) and op.path not in self.nodes:
                raise TransactionFailed(i, NoNode(op.path))
        for op in ops:
            if isinstance(op, Create):
                self.nodes[op.path] = (op.data, 0)
            else:
                del self.nodes[op.path]

    def create(self, path, data=b"", ephemeral=False, sequential=False):
        self.calls.append(f"create {path}")
        self.nodes[path] = (data, 0)
        return path

    def delete(self, path, version=-1):
        self.calls.append(f"delete {path}")
        if path not in self.nodes:
            raise NoNode(path)
        del self.nodes[path]


def test_back_from_a_switch_registers_and_leaves_the_queue_in_one_commit():
    from supervisor_dcdeploy.store import Create, Delete
    store = WritingDouble()
    del store.nodes["current/A/h1"]  # h1 passed the gate: its presence went
    store.nodes["staging/A/h1-0000000003"] = (dumps({"version": "2"}), 0)
    coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    coord.rejoin("A", "2", "r1")
    (ops,) = store.commits
    assert [type(op) for op in ops] == [Create, Delete]
    assert ops[0].path == "current/A/h1" and ops[0].ephemeral
    assert ops[1].path == "staging/A/h1-0000000003"
    assert store.calls == []
    view = coord.view("A", [], [])
    assert view.current["h1"].version == "2" and not view.staging


def test_rejoin_falls_back_to_two_steps_when_the_commit_fails():
    store = WritingDouble()
    del store.nodes["current/A/h1"]
    store.nodes["staging/A/h1-0000000003"] = (dumps({"version": "2"}), 0)
    coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    store.nodes["current/A/h1"] = (b"{}", 0)  # registered meanwhile (not in the mirror yet)
    coord.rejoin("A", "2", "r1")
    assert len(store.commits) == 1  # tried, refused whole
    assert store.calls == ["create current/A/h1", "delete staging/A/h1-0000000003"]
    assert "staging/A/h1-0000000003" not in store.nodes



def _queued_for_three() -> tuple[WritingDouble, MirrorCoordinator]:
    """h1 queued for A, B and C (A's gate just passed)."""
    store = WritingDouble()
    for svc, seq in (("A", 3), ("B", 7), ("C", 1)):
        store.nodes[f"staging/{svc}/h1-000000000{seq}"] = (dumps({"version": "2"}), 0)
    store.nodes["staging/B/h2-0000000008"] = (dumps({"version": "2"}), 0)
    coord = MirrorCoordinator(store, "h1", ["A", "B", "C"],
                              lambda: None)  # type: ignore[arg-type]
    coord.follow()
    return store, coord


def test_making_way_leaves_the_other_queues_in_one_commit():
    from supervisor_dcdeploy.store import Delete
    store, coord = _queued_for_three()
    assert sorted(coord.make_way("A", in_progress=())) == ["B", "C"]
    (ops,) = store.commits
    assert all(isinstance(op, Delete) for op in ops)
    assert sorted(op.path for op in ops) == ["staging/B/h1-0000000007",
                                             "staging/C/h1-0000000001"]
    assert store.calls == []
    assert "staging/A/h1-0000000003" in store.nodes  # the one it switches stays
    assert "staging/B/h2-0000000008" in store.nodes  # another host's
    # The mirror knows at once (the cycle goes on with it, no notification needed).
    assert coord._mirror.children("staging/B") == ["h2-0000000008"]
    assert coord._mirror.children("staging/C") == []


def test_making_way_falls_back_to_one_delete_each_when_an_entry_went():
    store, coord = _queued_for_three()
    del store.nodes["staging/C/h1-0000000001"]  # gone meanwhile, not in the mirror yet
    assert sorted(coord.make_way("A", in_progress=())) == ["B", "C"]
    assert len(store.commits) == 1  # tried, refused whole
    assert sorted(store.calls) == ["delete staging/B/h1-0000000007",
                                   "delete staging/C/h1-0000000001"]
    assert "staging/B/h1-0000000007" not in store.nodes
    assert "staging/A/h1-0000000003" in store.nodes


def test_making_way_keeps_the_entries_of_switches_in_progress():
    """--host-parallel 2: h1 switches C, then passes A's gate, which leaves it no room.
    C's entry is what shows h1 as switching C (no presence): leaving it made h1 look
    offline, and another host completed C's item while h1 was still down."""
    store, coord = _queued_for_three()
    assert coord.make_way("A", in_progress={"C": 2}) == ["B"]
    assert "staging/C/h1-0000000001" in store.nodes
    assert "staging/B/h1-0000000007" not in store.nodes
    assert coord._mirror.children("staging/C") == ["h1-0000000001"]


def test_a_cycle_with_nothing_new_reuses_the_view_and_any_change_renews_it():
    store = Double()
    coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    queue, invalid = coord.queue()
    first = coord.view("A", queue, invalid)
    coord.follow()  # a periodic wake-up: nothing arrived
    assert coord.queue()[0] is queue
    assert coord.view("A", *coord.queue()) is first
    del store.nodes["current/A/h4"]
    coord._notified("deleted", "current/A/h4")
    coord.follow()
    again = coord.view("A", *coord.queue())
    assert again is not first and "h4" not in again.current
    coord._gone("current/A/h1")  # what unregister records after deleting our presence
    assert "h1" not in coord.view("A", *coord.queue()).current
    store.nodes["gate/A"] = (b"{}", 7)
    coord._contended("A")  # the gate's version is read afresh at the next gate
    assert coord.fresh_view("A").gate_version == 7
    assert coord.view("A", *coord.queue()).gate_version == 7


def test_a_read_failing_half_way_through_the_notifications_rebuilds_the_mirror():
    import pytest
    from supervisor_dcdeploy.store import StoreUnavailable
    store = Double()
    store.nodes["deploy/item-0000000001"] = (b"{}", 0)
    store.nodes["staging/A/h0-0000000001"] = (dumps({"version": "2"}), 0)
    coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    assert coord._mirror.children("staging/A") == ["h0-0000000001"]
    real_get = store.get
    failing = {"deploy/item-0000000001"}

    def get(path, watch=None):
        if path in failing:
            raise StoreUnavailable("read timed out")
        return real_get(path)

    store.get = get  # type: ignore[method-assign]
    store.nodes["deploy/item-0000000001"] = (b'{"x": 1}', 1)
    del store.nodes["staging/A/h0-0000000001"]
    coord._notified("changed", "deploy/item-0000000001")  # its read times out ...
    coord._notified("deleted", "staging/A/h0-0000000001")  # ... before this one is applied
    with pytest.raises(StoreUnavailable):
        coord.follow()
    failing.clear()
    coord.follow()  # rebuilt from the store, not left without the deletion for good
    assert coord._mirror.children("staging/A") == []


def _scanned(nodes, path: str) -> list[str]:
    """The names below ``path`` as the store lists them: every node under it counts."""
    prefix = path + "/"
    return sorted({p[len(prefix):].split("/", 1)[0] for p in nodes if p.startswith(prefix)})


_PATHS = ["staging/A", "staging/A/h0-0000000001", "staging/A/h1-0000000002", "current/A/h0",
          "current/A/h1", "hosts/h0/session", "hosts/h1/session", "hosts/h1", "deploy/item-1",
          "staging/B/h0-0000000003"]


def test_the_mirror_lists_a_directory_as_a_scan_of_its_nodes_would():
    """The mirror keeps each directory's names as nodes come and go (a listing no longer
    scans every node): after any sequence of writes, each listing equals the scan."""
    from hypothesis import given, settings, strategies as st

    from supervisor_dcdeploy.coord import _Mirror

    op = st.tuples(st.sampled_from(["set", "pop", "del", "update", "clear", "replace"]),
                   st.lists(st.sampled_from(_PATHS), min_size=1, max_size=3))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(op, max_size=30))
    def check(ops) -> None:
        mirror = _Mirror()
        for name, paths in ops:
            nodes = mirror.nodes
            if name == "set":
                nodes[paths[0]] = (None, -1)
            elif name == "pop":
                nodes.pop(paths[0], None)
            elif name == "del" and paths[0] in nodes:
                del nodes[paths[0]]
            elif name == "update":
                nodes.update((p, (b"x", 0)) for p in paths)
            elif name == "clear":
                nodes.clear()
            elif name == "replace":  # as a load does: a new dict for the mirror
                mirror.nodes = {p: (b"", 0) for p in paths}
            for directory in ("staging", "staging/A", "staging/B", "current/A", "hosts",
                              "hosts/h1", "deploy", "gate"):
                assert mirror.children(directory) == _scanned(mirror.nodes, directory)

    check()


def _view_as_before(coord: MirrorCoordinator, svc: str, queue, queue_invalid):
    """The mirror's view as it was built before it was kept in parts: every node read
    through the mirror's reader, the unread presences added, then only live hosts."""
    from dataclasses import replace

    from supervisor_dcdeploy.model import CurrentEntry
    from supervisor_dcdeploy.snapshot import read_view
    view = read_view(coord._reader, svc, queue, queue_invalid)
    unread = {h: CurrentEntry(host=h, version="")
              for h in coord._mirror.children(f"current/{svc}")
              if coord._mirror.nodes.get(f"current/{svc}/{h}", (b"",))[0] is None}
    if unread:
        view = replace(view, current={**view.current, **unread})
    return coord._live_only(svc, view)


_VIEW_HOSTS = ("h0", "h1", "h2", "h3")
_VALUES = [None, dumps({"version": "1"}), dumps({"version": "2", "rack": "r1"}), b"garbage",
           b""]


def test_the_view_kept_in_parts_equals_the_view_read_whole():
    """The presences and the ready queue are kept apart and rebuilt only when a node of
    their own area (or a session) changed: after any sequence of changes the view is
    the one read whole from the mirror, in the same order, with the same problems."""
    from hypothesis import given, settings, strategies as st

    paths = ([f"current/A/{h}" for h in _VIEW_HOSTS] +
             [f"staging/A/{h}-000000000{i}" for i, h in enumerate(_VIEW_HOSTS)] +
             [f"hosts/{h}/session" for h in _VIEW_HOSTS] +
             ["staging/A", "gate/A", "current/A/h0/x", "staging/B/h1-0000000009"])
    change = st.tuples(st.sampled_from(["set", "delete", "gone", "contended"]),
                       st.sampled_from(paths), st.sampled_from(_VALUES))

    @settings(max_examples=200, deadline=None)
    @given(st.booleans(), st.lists(change, max_size=25))
    def check(owners, changes) -> None:
        store = Double()
        store.knows_owners = owners  # sessions followed: only live hosts count
        store.nodes["staging/A"] = (dumps({"version": "2", "sha256": "a" * 64,
                                           "urls": ["file:///x"], "size": 1}), 0)
        coord = MirrorCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
        coord.follow()
        for kind, path, value in changes:
            if kind == "set":
                coord._mirror.nodes[path] = (value, 0)
            elif kind == "delete":
                coord._mirror.nodes.pop(path, None)
            elif kind == "gone":
                coord._gone(path)
            else:
                coord._contended("A")
            coord._changes += 1
            queue, invalid = coord.queue()
            got = coord.view("A", queue, invalid)
            want = _view_as_before(coord, "A", queue, invalid)
            assert got == want
            assert list(got.current) == list(want.current)
            assert coord.view("A", queue, invalid) is got  # nothing new: kept

    check()


# -- reading the presences a decision needs ------------------------------------------------

STAGED_2 = dumps({"version": "2", "sha256": "a" * 64, "urls": ["file:///x"], "size": 1})


def _rolling_to_2() -> tuple[Double, MirrorCoordinator]:
    """h0, h2, h3 and h4 on 2; h1 on 1, not queued yet (it left A's queue for another
    service's switch); h0 follows, the others' presences unread."""
    store = Double()
    store.nodes["staging/A"] = (STAGED_2, 0)
    for host in ("h0", "h2", "h3", "h4"):
        store.nodes[f"current/A/{host}"] = (dumps({"version": "2"}), 0)
    coord = MirrorCoordinator(store, "h0", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    return store, coord


def _complete(view) -> bool:
    from dataclasses import replace
    from supervisor_dcdeploy.decisions import item_complete
    from supervisor_dcdeploy.model import DeployItem, ServiceSpec
    item = DeployItem(node="item-0000000001", seq=1, service="A", version="2", after=(),
                      state="rolling")
    return item_complete(replace(view, spec=ServiceSpec(name="A", program="A", quorum=1),
                                 queue=[item])).ok


def test_a_presence_gone_by_its_read_does_not_leave_its_host_offline():
    """Seen in tests/test_host_parallel.py: h1 joined A's ready queue and passed the gate
    after the mirror's last cut; the completing host then read h1's presence (gone) but
    kept the older ready queue (no h1 entry), took h1 for offline and called the item
    done while h1 was mid-switch, h1's switch timing left out of the history record."""
    store, coord = _rolling_to_2()
    view = coord.view("A", [], [])
    assert {h: e.version for h, e in view.current.items()} == {
        "h0": "2", "h1": "", "h2": "", "h3": "", "h4": ""}
    # h1 enters the queue and passes the gate: both notifications arrive (before the
    # reply of any later read), the cycle has not applied them.
    store.nodes["staging/A/h1-0000000007"] = (dumps({"version": "2"}), 0)
    del store.nodes["current/A/h1"]
    coord._notified("created", "staging/A/h1-0000000007")
    coord._notified("deleted", "current/A/h1")
    resolved = coord.resolve("A", view)
    assert "h1" not in resolved.current
    assert [e.host for e in resolved.staging] == ["h1"]  # switching, not offline
    assert not _complete(resolved)
    # h1 back: one commit makes its presence and deletes its entry; now it is done.
    store.nodes["current/A/h1"] = (dumps({"version": "2", "switch": {
        "version": "2", "stop_s": 0.1, "start_s": 1.0, "healthy_s": 1.0, "at": 1.0}}), 0)
    del store.nodes["staging/A/h1-0000000007"]
    coord._notified("created", "current/A/h1")
    coord._notified("deleted", "staging/A/h1-0000000007")
    coord.follow()
    resolved = coord.resolve("A", coord.view("A", [], []))
    assert _complete(resolved) and resolved.current["h1"].switch["version"] == "2"


def test_a_presence_still_flapping_after_the_rounds_stays_unknown():
    """Each read finds h1's presence gone while its next one is already notified: after
    RESOLVE_ROUNDS reads h1 is left with an unknown version, which never completes an
    item (and is never taken for offline)."""
    from supervisor_dcdeploy.coord import RESOLVE_ROUNDS
    store, coord = _rolling_to_2()
    store.nodes["current/A/h1"] = (dumps({"version": "2"}), 0)
    coord._notified("created", "current/A/h1")
    coord.follow()
    view = coord.view("A", [], [])
    reads = []
    get = store.get

    def flapping(path, watch=None):
        if path == "current/A/h1":
            reads.append(path)
            coord._notified("deleted", path)
            coord._notified("created", path)  # made again: notified before the reply
            raise NoNode(path)
        return get(path, watch)
    store.get = flapping  # type: ignore[method-assign]
    resolved = coord.resolve("A", view)
    assert len(reads) == RESOLVE_ROUNDS
    assert resolved.current["h1"].version == ""
    assert resolved.current["h2"].version == "2"
    assert not _complete(resolved)


def test_resolving_keeps_the_callers_ready_queue_while_nothing_went():
    """A canary hold narrows the ready queue to the canaries before resolving (peers):
    with every unread presence still there, resolve only fills in the presences."""
    from dataclasses import replace
    store, coord = _rolling_to_2()
    for node in ("h1-0000000001", "h2-0000000002"):
        store.nodes[f"staging/A/{node}"] = (dumps({"version": "2"}), 0)
        coord._notified("created", f"staging/A/{node}")
    coord.follow()
    view = coord.view("A", [], [])
    narrowed = replace(view, staging=[e for e in view.staging if e.host == "h2"])
    resolved = coord.resolve("A", narrowed)
    assert [e.host for e in resolved.staging] == ["h2"]
    assert resolved.current["h2"].version == "2"
