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
