"""Following the store on Consul by blocking reads (store/consul.py TreeFollower,
coord.FollowCoordinator), against tests/fakeconsul.py only (never a real Consul:
docs/consul.md): the blocking-read index semantics, an index that goes backwards, a
cluster without a leader, an ACL refusal."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from fakeconsul import FakeConsul
from test_store_traffic import InstantSupervisor

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.agent.config import AgentConfig
from supervisor_dcdeploy.agent.worker import Agent
from supervisor_dcdeploy.coord import FollowCoordinator, coordinator_for
from supervisor_dcdeploy.fetch import install_release
from supervisor_dcdeploy.localstate import ReleaseDir
from supervisor_dcdeploy.model import HealthCheck
from supervisor_dcdeploy.lab.sample import build_release
from supervisor_dcdeploy.store import StoreUnauthorized, StoreUnavailable, open_store
from supervisor_dcdeploy.store import consul as consul_store
from supervisor_dcdeploy.waiting import wait_for


@pytest.fixture
def fake():
    f = FakeConsul().start()
    try:
        yield f
    finally:
        f.close()


def opened(fake: FakeConsul, root: str, token: Path | None = None):
    query = f"?token_file={token}" if token else ""
    store = open_store(f"consul://{fake.address}/{root}{query}")
    store.start(timeout=15)
    return store


class Answers:
    """What a follower delivered, in order (its thread appends; the test waits)."""

    def __init__(self) -> None:
        self.got: list = []
        self.cond = threading.Condition()

    def __call__(self, answer) -> None:
        with self.cond:
            self.got.append(answer)
            self.cond.notify_all()

    def until(self, pred, what: str):
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(a) for a in self.got), 15), what
            return next(a for a in self.got if pred(a))


def test_blocking_read_answers_a_change_with_the_prefix_index(fake):
    """X-Consul-Index of a recursive read is the newest ModifyIndex under the prefix (or
    a tombstone's): the follower blocks on it and answers each change with the whole
    subtree."""
    root = f"dc-{uuid.uuid4().hex[:8]}"
    st = opened(fake, root)
    try:
        st.create("hosts/a", b"1")
        index, tree = st.read_tree("hosts")
        with fake.cond:
            assert index == fake.query_index(f"{root}/hosts", exact=False)
        assert tree["hosts/a"][0] == b"1"
        got = Answers()
        st.follow_tree("hosts", got, index=index)
        st.create("hosts/b", b"2")
        answer = got.until(lambda a: a.tree and "hosts/b" in a.tree, "the create answered")
        assert answer.index > index and set(answer.tree) == {"hosts", "hosts/a", "hosts/b"}
        st.delete("hosts/a")
        answer = got.until(lambda a: a.tree is not None and "hosts/a" not in a.tree,
                           "the delete answered")
        with fake.cond:  # the delete's tombstone carries the prefix's index
            assert answer.index == fake.tombstones[f"{root}/hosts/a"]
        # Every answered read blocked on the index of the answer before it.
        reads = [(w, a) for k, w, a in fake.answered if k == f"{root}/hosts"]
        assert reads[0][0] == index and all(a > w for w, a in reads)
    finally:
        st.stop()


def test_index_going_backwards_resets_and_reloads(fake):
    """Tombstones reaped after the newest change under the prefix was a delete: the
    prefix's index goes backwards. The follower resets to 0, reads again at once and
    hands over the whole subtree as a reset (Consul's "Blocking Queries" docs)."""
    root = f"dc-{uuid.uuid4().hex[:8]}"
    st = opened(fake, root)
    try:
        st.create("hosts/a", b"1")
        st.create("hosts/b", b"2")
        st.delete("hosts/b")
        high, _ = st.read_tree("hosts")
        got = Answers()
        st.follow_tree("hosts", got, index=high, wait=0.5)  # short wait: the reap is silent
        fake.reap_tombstones()
        with fake.cond:
            low = fake.query_index(f"{root}/hosts", exact=False)
        assert low < high
        answer = got.until(lambda a: a.reset, "a reset answer")
        assert answer.index == low and set(answer.tree) == {"hosts", "hosts/a"}
        st.set("hosts/a", b"changed")
        got.until(lambda a: a.tree and a.tree["hosts/a"][0] == b"changed",
                  "a change after the reset")
    finally:
        st.stop()


def test_a_held_follower_sends_nothing_until_resumed(fake):
    """``hold``: after an answer no read is outstanding, so changes meanwhile cost no
    request; resumed, one read answers them all at once."""
    root = f"dc-{uuid.uuid4().hex[:8]}"
    st = opened(fake, root)
    try:
        st.create("deploy", b"")
        index, _ = st.read_tree("deploy")
        got = Answers()
        follower = st.follow_tree("deploy", got, index=index, hold=True)
        st.create("deploy/item-1", b"1")
        got.until(lambda a: a.tree and "deploy/item-1" in a.tree, "the first change")
        wait_for(lambda: follower.held, 10, "the follower to hold")
        with fake.cond:
            sent = sum(1 for kind, _, path in fake.log
                       if kind == "block" and path.endswith(f"{root}/deploy"))
        st.set("deploy/item-1", b"2")
        st.create("deploy/item-2", b"3")
        with fake.cond:
            assert sum(1 for kind, _, path in fake.log
                       if kind == "block" and path.endswith(f"{root}/deploy")) == sent
        follower.resume()
        answer = got.until(lambda a: a.tree and "deploy/item-2" in a.tree, "both changes")
        assert answer.tree["deploy/item-1"][0] == b"2"
        with fake.cond:
            assert sum(1 for kind, _, path in fake.log
                       if kind == "block" and path.endswith(f"{root}/deploy")) == sent + 1
    finally:
        st.stop()


def test_entering_the_ready_queue_is_one_request_and_orders_by_consul(fake):
    """The agent's entry: one transaction that writes it and reads the snapshot (its
    place known at once); entries of one staged release share a number and queue in the
    order Consul made them, whatever their names."""
    root = f"dc-{uuid.uuid4().hex[:8]}"
    op = opened(fake, root)
    stores = [opened(fake, root) for _ in range(2)]
    try:
        op.create("staging/A", b'{"version": "2"}')
        op.ensure("current/A")
        op.ensure("gate/A")
        op.ensure("deploy")
        coords = [coordinator_for(st, host, ["A"], lambda: None)
                  for st, host in zip(stores, ("h9", "h1"))]
        for coord in coords:
            coord.follow()
            coord.claim_session()  # done at registration, before any queueing

        def sent() -> int:
            # Not counted: renewals and the followers' blocking reads, which answer on
            # their own threads whenever the tree changes (the writes above may still be
            # arriving): counting them made this test fail now and then.
            with fake.cond:
                return sum(1 for kind, _, _ in fake.log if kind not in ("renew", "block"))
        before = sent()
        first = coords[0].enter_queue("A", "2")  # h9 first, although it sorts last by name
        assert sent() == before + 1
        second = coords[1].enter_queue("A", "2")
        assert first.rpartition("-")[2] == second.rpartition("-")[2]
        queue = [e.host for e in coords[1].view("A", [], []).staging]
        assert queue == ["h9", "h1"]
        assert coords[1]._entries_ahead("A") == [first.rpartition("/")[2]]
    finally:
        for st in (op, *stores):
            st.stop()


@pytest.mark.parametrize("bad", ["0", "missing"])
def test_an_index_of_zero_or_none_is_never_blocked_on(fake, bad):
    """An answer with X-Consul-Index 0 or without the header (a Consul bug the docs
    warn of): taken as gone backwards, the follower reloads at once and blocks on the
    real index again; it never keeps 0, which would make every read return at once."""
    root = f"dc-{uuid.uuid4().hex[:8]}"
    st = opened(fake, root)
    try:
        st.create("hosts/a", b"1")
        index, _ = st.read_tree("hosts")
        got = Answers()
        fake.bad_index(bad)
        follower = st.follow_tree("hosts", got, index=index, wait=0.5)
        st.create("hosts/b", b"2")  # the answer to this change carries the bad index
        answer = got.until(lambda a: a.tree and "hosts/b" in a.tree, "the change")
        with fake.cond:
            real = fake.query_index(f"{root}/hosts", exact=False)
        assert answer.reset and answer.index == real
        assert all(a.index >= 1 for a in got.got) and follower.index >= 1
        wait_for(lambda: any(k == f"{root}/hosts" and w == real
                             for k, w, _ in fake.answered), 15, "a read blocking on it")
        st.create("hosts/c", b"3")
        got.until(lambda a: a.tree and "hosts/c" in a.tree and not a.reset, "a later change")
    finally:
        st.stop()


def test_the_coordinator_follows_consul_and_keeps_its_mirror_without_a_leader(
        fake, monkeypatch):
    monkeypatch.setattr(consul_store, "FOLLOW_WAIT", 0.5)
    root = f"dc-{uuid.uuid4().hex[:8]}"
    st, op = opened(fake, root), opened(fake, root)
    try:
        op.create("current/A/h9", b'{"version": "1", "state": "serving"}')
        coord = coordinator_for(st, "h0", ["A"], lambda: None)
        assert isinstance(coord, FollowCoordinator)
        coord.follow()
        assert "h9" in coord.view("A", [], []).current
        before = dict(coord._mirror.nodes)
        reads = fake.by_kind["read"] + fake.by_kind["txn"]
        for _ in range(5):  # a cycle with nothing new reads nothing
            coord.follow()
        assert fake.by_kind["read"] + fake.by_kind["txn"] == reads

        fake.lose_leader()  # the followers' next reads (0.5 s waits here) get a 500
        def unavailable() -> bool:
            try:
                coord.follow()
            except StoreUnavailable:
                return True
            return False
        wait_for(unavailable, 15, "follow() to report the store unavailable")
        assert coord._mirror.nodes == before  # kept, not emptied

        fake.elect_leader()
        # A followed key (presences are followed only at the front of the ready queue).
        op.create("staging/A", b'{"version": "8"}')

        def caught_up() -> bool:
            try:
                coord.follow()
            except StoreUnavailable:
                return False
            return coord._mirror.nodes.get("staging/A", (None,))[0] == b'{"version": "8"}'
        wait_for(caught_up, 15, "the followers to answer again")
    finally:
        st.stop()
        op.stop()


def test_an_acl_refusal_is_unauthorized(fake, tmp_path):
    root = f"dc-{uuid.uuid4().hex[:8]}"
    full = fake.add_token({"": "write"})
    host = fake.add_token({f"{root}": "write"})
    files = {}
    for name, secret in (("op", full), ("host", host)):
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(secret + "\n")
        files[name].chmod(0o600)
    st, op = opened(fake, root, files["host"]), opened(fake, root, files["op"])
    try:
        op.ensure("services/A")
        coord = coordinator_for(st, "h0", ["A"], lambda: None)
        coord.follow()
        fake.tokens[host].keys = {f"{root}/current": "write"}  # revoked, but for presences
        op.set("services/A", b"{}")  # wakes the follower of the spec: its read is refused

        def refused() -> bool:
            try:
                coord.follow()
            except StoreUnauthorized:
                return True
            return False
        wait_for(refused, 15, "follow() to report the refusal")
    finally:
        st.stop()
        op.stop()


def test_services_keep_running_while_consul_has_no_leader(fake, workdir):
    """Three agents on the Consul fake lose the leader for a while: no program is
    stopped, each agent says the store is not connected, and once a leader is back a
    deploy still rolls through."""
    root = f"dc-{uuid.uuid4().hex[:8]}"
    url = f"consul://{fake.address}/{root}"
    op = opened(fake, root)
    ops.service_set(op, "A", program="A", quorum=2, max_parallel=1,
                    health=HealthCheck("none"), healthy_secs=0.0)
    releases = {}
    for version in ("1", "2"):
        path, sha = build_release(workdir / "artifacts", "A", version)
        releases[version] = (f"file://{path}", sha, path.stat().st_size)
    stops: list[str] = []

    class Recording(InstantSupervisor):
        def stop(self, program: str) -> None:
            stops.append(program)
            super().stop(program)

    agents = {}
    for i in range(3):
        host = f"h{i}"
        rd = ReleaseDir(workdir / host, "A")
        for version, (rurl, sha, size) in releases.items():
            install_release([rurl], sha, rd.releases, version, rd.cache,
                            size=size, file_root=str(workdir))
        rd.point_current("1")
        cfg = AgentConfig(host=host, rack="r0", store=url, root=workdir / host,
                          services={"A": {}}, session_timeout=10.0, start_timeout=5.0,
                          poll_interval=1.0)
        agents[host] = Agent(cfg, supervisor=Recording())
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents.values()]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(op.children("current/A")) == 3, 60, "every host to register")
        fake.lose_leader()
        wait_for(lambda: all(a.status["A"].get("store") not in (None, "connected")
                             for a in agents.values()), 30,
                 "every agent to see the store unavailable")
        assert stops == []
        assert all(a.sup.running for a in agents.values())  # type: ignore[attr-defined]
        fake.elect_leader()
        wait_for(lambda: all(a.status["A"].get("store") == "connected"
                             for a in agents.values()), 30, "every agent back")
        ops.stage(op, "A", "2", sha256=releases["2"][1], urls=[releases["2"][0]],
                  size=releases["2"][2])
        ops.deploy(op, ["A"])
        wait_for(lambda: all(a.local.get("A").active == "2" for a in agents.values()), 120,
                 "every host on 2")
    finally:
        for agent in agents.values():
            agent.stopping.set()
            agent.wake.set()
        for thread in threads:
            thread.join(timeout=20)
        op.stop()


class FollowDouble:
    """A store double for FollowCoordinator alone: trees it is told to hold, followers
    the test answers for, writes recorded."""

    supports_tree_follow = True
    session_id = None  # no session marker (coord.claim_session does nothing)

    def __init__(self) -> None:
        self.trees: dict[str, dict] = {}
        self.followers: dict[str, object] = {}

    def read_tree(self, path, recurse=True, consistent=False):
        return 5, dict(self.trees.get(path, {}))

    def read_trees(self, wanted):
        return [dict(self.trees.get(path, {})) for path, _ in wanted]

    def follow_tree(self, path, deliver, recurse=True, index=0, interval=0.0, wait=None,
                    hold=False):
        class Follower:
            alive = True
            held = False
            def resume(self, index=None): pass
            def cancel(self): self.alive = False
        follower = Follower()
        follower.deliver = deliver  # type: ignore[attr-defined]
        self.followers[path if not recurse else path + "/"] = follower
        return follower

    def create(self, path, data=b"", ephemeral=False, sequential=False):
        return path + "0000000007" if sequential else path


def test_an_answer_to_a_read_sent_before_our_write_does_not_undo_it():
    """Our presence is in the mirror from the moment we made it: an answer to a read
    sent before the create (it cannot show the presence) leaves it there; an answer to
    a read sent after decides. Otherwise the host would see itself unregistered and
    register again."""
    import time as _time
    from supervisor_dcdeploy.store.consul import TreeAnswer
    store = FollowDouble()
    coord = FollowCoordinator(store, "h1", ["A"], lambda: None)  # type: ignore[arg-type]
    coord.follow()
    coord._start_presences("A")  # as at the front of the ready queue
    before = _time.monotonic()
    coord.register("A", "2", "r0")
    assert "h1" in coord._mirror.children("current/A")
    presences = store.followers["current/A/"]
    presences.deliver(TreeAnswer(presences, 6, {"current/A": (b"", 3)}, started=before))
    coord.follow()
    assert "h1" in coord._mirror.children("current/A")
    presences.deliver(TreeAnswer(presences, 7, {"current/A": (b"", 3)},
                                 started=_time.monotonic()))
    coord.follow()
    assert "h1" not in coord._mirror.children("current/A")  # read after: it is gone
