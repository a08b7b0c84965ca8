"""One contract suite for every store backend (:mod:`supervisor_dcdeploy.store.base`).

Parametrized over ``zookeeper`` (a real ZooKeeper server, the session fixture of
conftest.py) and ``consul-fake`` (the Consul backend against tests/fakeconsul.py, an
in-process fake of Consul's HTTP API: *not* a real Consul; see docs/consul.md). A test that
passes on both says the backends agree on it; it says nothing about real Consul.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
from kazoo.client import KazooClient

from fakeconsul import FakeConsul
from supervisor_dcdeploy.waiting import wait_for as _wait_for
from supervisor_dcdeploy.lab.zkserver import free_port
from supervisor_dcdeploy.store import (BadVersion, Check, Create, Delete, NodeExists, NoNode,
                                       NotEmpty, SessionState, SetData, Store,
                                       StoreError, StoreUnavailable, TransactionFailed, open_store)

# A real Consul joins when DCDEPLOY_TEST_CONSUL names one (e.g. 127.0.0.1:8500): the Consul
# backend has only ever run against the fake (docs/consul.md).
REAL_CONSUL = os.environ.get("DCDEPLOY_TEST_CONSUL", "")
BACKENDS = ["zookeeper", "consul-fake", "zookeeper-tls-auth"] + \
    (["consul-real"] if REAL_CONSUL else [])


def wait_for(cond, timeout: float, what: str):
    return _wait_for(cond, timeout, what, interval=0.02)


class Backend:
    """Opens started stores on one fresh root and knows how to break their sessions."""

    name: str
    url: str

    def __init__(self) -> None:
        self.stores: list[Store] = []

    def open(self, session_timeout: float = 10.0) -> Store:
        store = open_store(self.url, session_timeout)
        store.start(timeout=15)
        self.stores.append(store)
        return store

    def close(self) -> None:
        for store in self.stores:
            with suppress(StoreError):
                store.stop()

    def expire(self, store: Store) -> None:
        raise NotImplementedError

    @contextmanager
    def outage(self) -> Iterator[None]:
        raise NotImplementedError
        yield


class ZooKeeperBackend(Backend):
    name = "zookeeper"

    def __init__(self, url: str, server) -> None:
        super().__init__()
        self.url, self.server = url, server

    def expire(self, store: Store) -> None:
        # kazoo.testing's way: a second client attaches to the session and closes it.
        client = store.client  # type: ignore[attr-defined]
        other = KazooClient(hosts=f"127.0.0.1:{self.server.client_port}",
                            client_id=client.client_id)
        other.start(timeout=10)
        other.stop()
        other.close()

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.server.kill()
        try:
            yield
        finally:
            self.server.start()
            self.server.wait_serving(timeout=60)


class SecureZooKeeperBackend(ZooKeeperBackend):
    """The TLS server (client certificates required) with the operator's identity on a
    root set up by `dcdeploy init` (tests/zksecure.py): the contract holds under ACLs."""

    name = "zookeeper"  # the same server semantics (a restart may lose the session)

    def __init__(self, secure_root) -> None:
        super().__init__(secure_root.url("operator"), secure_root.server)
        self.open().secure({}, {})  # init's ACLs on the bare root (no top-level nodes)
        self.secure_root = secure_root

    def expire(self, store: Store) -> None:
        client = store.client  # type: ignore[attr-defined]
        pki = self.secure_root.pki
        other = KazooClient(hosts=f"127.0.0.1:{self.server.secure_port}", use_ssl=True,
                            ca=str(pki.ca), certfile=str(pki.client_cert),
                            keyfile=str(pki.client_key), client_id=client.client_id)
        other.start(timeout=10)
        other.stop()
        other.close()


class ConsulFakeBackend(Backend):
    name = "consul-fake"

    def __init__(self, fake: FakeConsul) -> None:
        super().__init__()
        self.fake = fake
        self.url = f"consul://{fake.address}/dc-{uuid.uuid4().hex[:12]}"

    def expire(self, store: Store) -> None:
        self.fake.expire_session(store.session_id)  # type: ignore[attr-defined]

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.fake.down()
        try:
            yield
        finally:
            self.fake.up()


class RealConsulBackend(Backend):
    name = "consul-real"

    def __init__(self, address: str) -> None:
        super().__init__()
        self.url = f"consul://{address}/dc-{uuid.uuid4().hex[:12]}"

    def expire(self, store: Store) -> None:
        # Destroying a session invalidates it as a TTL expiry does (behavior=delete).
        import consul as pyconsul
        host, _, port = self.url.split("/")[2].partition(":")
        pyconsul.Consul(host=host, port=int(port or 8500)).session.destroy(
            store.session_id)  # type: ignore[attr-defined]

    @contextmanager
    def outage(self) -> Iterator[None]:
        pytest.skip("cannot take a real Consul away from here")
        yield

    def close(self) -> None:
        with suppress(StoreError):
            if self.stores and self.stores[0].connected:
                self.stores[0].delete("", recursive=True)
        super().close()


@pytest.fixture(params=BACKENDS)
def backend(request) -> Iterator[Backend]:
    if request.param == "consul-real":
        b: Backend = RealConsulBackend(REAL_CONSUL)
        try:
            yield b
        finally:
            b.close()
        return
    if request.param in ("zookeeper", "zookeeper-tls-auth"):
        b = ZooKeeperBackend(request.getfixturevalue("store_url"),
                             request.getfixturevalue("zk_server")) \
            if request.param == "zookeeper" else \
            SecureZooKeeperBackend(request.getfixturevalue("secure_root"))
        try:
            yield b
        finally:
            b.close()
    else:
        fake = FakeConsul().start()
        b = ConsulFakeBackend(fake)
        try:
            yield b
        finally:
            b.close()
            fake.close()


@pytest.fixture
def st(backend: Backend) -> Store:
    return backend.open()


class States:
    """Session listener that records every state, for assertions."""

    def __init__(self, store: Store) -> None:
        self.seen: list[SessionState] = []
        self.lock = threading.Lock()
        store.add_listener(self)

    def __call__(self, state: SessionState) -> None:
        with self.lock:
            self.seen.append(state)

    def after(self, n: int) -> list[SessionState]:
        with self.lock:
            return self.seen[n:]


# -- connecting ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["zk", "consul"], ids=["zookeeper", "consul"])
def test_start_fails_in_time_when_nothing_listens(scheme: str) -> None:
    store = open_store(f"{scheme}://127.0.0.1:{free_port()}/dc-nobody")
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.start(timeout=1)
    assert time.monotonic() - began < 4
    assert not store.connected


# -- reads and plain writes -------------------------------------------------------------
def test_create_get_exists_children(st: Store) -> None:
    assert st.create("services/api", b'{"q": 1}') == "services/api"  # parents made too
    data, version = st.get("services/api")
    assert data == b'{"q": 1}'
    assert st.exists("services/api") == version
    assert st.exists("services/nope") is None
    assert st.get("services")[0] == b""  # a made parent is an empty node
    st.create("services/db")
    st.create("services/db/x")
    assert st.children("services") == ["api", "db"]  # direct children only
    assert st.children("services/api") == []
    assert st.children("missing/path") == []
    assert st.children("") == ["services"]
    with pytest.raises(NoNode):
        st.get("services/nope")
    with pytest.raises(NodeExists):
        st.create("services/api", b"again")
    assert st.get("services/api")[0] == b'{"q": 1}'
    st.ensure("services/api")  # idempotent, leaves data alone
    st.ensure("gate/api")
    assert st.get("services/api")[0] == b'{"q": 1}' and st.exists("gate/api") is not None


def test_sequential_names_increase_in_creation_order(backend: Backend, st: Store) -> None:
    other = backend.open()
    made = []
    for i in range(4):
        made.append((st if i % 2 else other).create("deploy/item-", b"%d" % i,
                                                     sequential=True))
    made.append(st.create("deploy/other-", sequential=True))  # one counter per parent
    suffixes = [name[-10:] for name in made]
    assert all(name.startswith("deploy/") and s.isdigit() and len(s) == 10
               for name, s in zip(made, suffixes))
    assert suffixes == sorted(suffixes) and len(set(suffixes)) == len(suffixes)
    assert sorted(st.children("deploy")) == sorted(n.split("/")[1] for n in made)
    # Two stores creating at once never get the same number.
    out: list[str] = []
    threads = [threading.Thread(target=lambda s=s: out.extend(
        s.create("staging/A/h-", sequential=True, ephemeral=True) for _ in range(5)))
        for s in (st, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == 10 and len(set(out)) == 10
    assert st.children("staging/A") == sorted(n.split("/")[-1] for n in out) or \
        len(st.children("staging/A")) == 10


def test_set_and_delete_with_versions(st: Store) -> None:
    st.create("gate/api", b"0")
    _, v0 = st.get("gate/api")
    v1 = st.set("gate/api", b"1", v0)
    assert v1 != v0 and st.get("gate/api") == (b"1", v1)
    with pytest.raises(BadVersion):
        st.set("gate/api", b"2", v0)
    assert st.get("gate/api") == (b"1", v1)
    v2 = st.set("gate/api", b"2")  # -1: any version
    assert st.get("gate/api") == (b"2", v2)
    # Rewriting the same bytes is a new version too: the gate commit rewrites the deploy
    # item unchanged so that a concurrent CAS on it (pause, fail) is refused.
    v2b = st.set("gate/api", b"2", v2)
    assert v2b != v2
    with pytest.raises(BadVersion):
        st.set("gate/api", b"3", v2)
    v2 = v2b
    with pytest.raises(NoNode):
        st.set("gate/nope", b"x")
    with pytest.raises(NoNode):
        st.set("gate/nope", b"x", v2)
    with pytest.raises(BadVersion):
        st.delete("gate/api", v1)
    st.delete("gate/api", v2)
    assert st.exists("gate/api") is None
    with pytest.raises(NoNode):
        st.delete("gate/api")
    st.create("tree/a/b", b"x")
    with pytest.raises(NotEmpty):
        st.delete("tree/a")
    st.delete("tree", recursive=True)
    assert st.exists("tree") is None and st.exists("tree/a/b") is None
    assert st.children("tree") == []
    st.delete("tree", recursive=True)  # recursive: a missing node is no error (kazoo's)


# -- transactions ------------------------------------------------------------------------
def test_commit_applies_all_and_returns_results(st: Store) -> None:
    st.create("gate/api", b"0")
    st.create("current/api/h1", b"on")
    st.create("deploy/item-0000000000", b"w")
    st.ensure("history")
    _, gv = st.get("gate/api")
    _, iv = st.get("deploy/item-0000000000")
    out = st.commit([Check("deploy/item-0000000000", iv), SetData("gate/api", b"1", gv),
                     Delete("current/api/h1"), Create("history/item-", b"h", sequential=True)])
    assert out[0] is None and out[2] is None
    assert isinstance(out[1], int) and st.get("gate/api") == (b"1", out[1])
    assert isinstance(out[3], str) and out[3].startswith("history/item-")
    assert st.get(out[3])[0] == b"h"
    assert st.exists("current/api/h1") is None
    # The returned version is the CAS token for the next transaction.
    st.commit([SetData("gate/api", b"2", out[1])])


@pytest.mark.parametrize("bad, index, cause", [
    (SetData("gate/api", b"x", 123456789), 1, BadVersion),
    (Check("gate/api", 123456789), 1, BadVersion),
    (Check("gate/nope", -1), 1, NoNode),
    (Delete("gate/nope"), 1, NoNode),
    (SetData("gate/nope", b"x"), 1, NoNode),
    (Create("gate/api"), 1, NodeExists),
    (Create("nowhere/parent/x"), 1, NoNode),  # a Create in commit makes no parents
])
def test_commit_failure_rolls_back_and_names_the_op(st: Store, bad, index, cause) -> None:
    st.create("gate/api", b"0")
    st.create("current/api/h1", b"on")
    before = st.get("gate/api")
    ops = [Delete("current/api/h1"), bad, Create("history/done", b"h")]
    with pytest.raises(TransactionFailed) as info:
        st.commit(ops)
    assert info.value.index == index and isinstance(info.value.cause, cause)
    assert st.exists("current/api/h1") is not None, "op 0 was not rolled back"
    assert st.exists("history/done") is None
    assert st.get("gate/api") == before


def test_commit_ephemeral_sequential_create(backend: Backend, st: Store) -> None:
    st.ensure("staging/api")
    (made,) = st.commit([Create("staging/api/h1-", b"v", ephemeral=True, sequential=True)])
    assert isinstance(made, str) and made.startswith("staging/api/h1-") and \
        made[-10:].isdigit()
    watcher = backend.open()
    assert watcher.children("staging/api") == [made.split("/")[-1]]
    st.stop()
    wait_for(lambda: watcher.children("staging/api") == [], 10, "the ephemeral to go")


def test_sync_then_read_sees_other_writes(backend: Backend, st: Store) -> None:
    writer = backend.open()
    writer.create("gate/api", b"0")
    for i in range(5):
        _, v = writer.get("gate/api")
        writer.set("gate/api", b"%d" % (i + 1), v)
        st.sync()
        assert st.get("gate/api")[0] == b"%d" % (i + 1)
    _, v = st.get("gate/api")
    st.commit([SetData("gate/api", b"mine", v)])  # ends the consistent reads (Consul)
    assert writer.get("gate/api")[0] == b"mine"


# -- watches ------------------------------------------------------------------------------
def test_watches_fire_once_on_change(backend: Backend, st: Store) -> None:
    writer = backend.open()
    writer.create("staging/api", b"1")
    on_get, on_exists, on_children = threading.Event(), threading.Event(), threading.Event()
    calls = []

    def counted() -> None:
        calls.append(time.monotonic())
        on_get.set()

    _, v = st.get("staging/api", counted)
    assert st.exists("current/api/h1", on_exists.set) is None
    assert st.children("current/api", on_children.set) == []
    time.sleep(0.3)
    assert not on_get.is_set() and not on_exists.is_set() and not on_children.is_set(), \
        "a watch fired with nothing changed"
    writer.set("staging/api", b"2", v)
    assert on_get.wait(10), "get watch did not fire on set"
    writer.create("current/api/h1", b"on", ephemeral=True)
    assert on_exists.wait(10), "exists watch did not fire on create"
    assert on_children.wait(10), "children watch did not fire on a new child"
    n = len(calls)
    writer.set("staging/api", b"3")
    time.sleep(0.5)
    assert len(calls) == n == 1, "a one-shot watch fired again"


def test_watch_on_delete(backend: Backend, st: Store) -> None:
    writer = backend.open()
    writer.create("staging/api/h1-0000000001", b"", ephemeral=True)
    gone = threading.Event()
    assert st.exists("staging/api/h1-0000000001", gone.set) is not None
    writer.delete("staging/api/h1-0000000001")
    assert gone.wait(10)


# -- sessions -----------------------------------------------------------------------------
def test_ephemerals_vanish_when_the_session_stops(backend: Backend, st: Store) -> None:
    owner = backend.open()
    owner.create("current/api/h1", b"on", ephemeral=True)
    owner.create("hosts/h1", b"{}")
    assert st.exists("current/api/h1") is not None
    owner.set("current/api/h1", b"on2")  # a set keeps the node ephemeral
    owner.stop()
    wait_for(lambda: st.exists("current/api/h1") is None, 10, "the ephemeral to go")
    assert st.get("hosts/h1")[0] == b"{}", "a persistent node went with the session"


def test_expired_session_loses_ephemerals_then_reconnects(backend: Backend, st: Store) -> None:
    owner = backend.open()
    states = States(owner)
    owner.create("current/api/h1", b"on", ephemeral=True)
    backend.expire(owner)
    wait_for(lambda: SessionState.LOST in states.after(0), 20, "LOST")
    wait_for(lambda: states.after(0)[-1] is SessionState.CONNECTED, 20, "CONNECTED again")
    assert states.after(states.after(0).index(SessionState.LOST))[-1] is SessionState.CONNECTED
    assert owner.connected
    assert st.exists("current/api/h1") is None, "the ephemeral outlived its session"
    # The new session works: the agent re-registers its presence (docs/design.md §4.8).
    owner.create("current/api/h1", b"back", ephemeral=True)
    assert st.get("current/api/h1")[0] == b"back"
    owner.stop()
    wait_for(lambda: st.exists("current/api/h1") is None, 10, "the new ephemeral to go")


def test_outage_suspends_then_reconnects_with_the_session(backend: Backend) -> None:
    # 10 s: ZooKeeper counts the session timeout from its restart, which can be slow here.
    st = backend.open(session_timeout=10.0)
    st.request_timeout = 2.0  # type: ignore[attr-defined]  # both backends: the call deadline
    states = States(st)
    st.create("current/api/h1", b"on", ephemeral=True)
    with backend.outage():
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            st.get("current/api/h1")
        assert time.monotonic() - began < 5, "a call hung past its deadline"
        wait_for(lambda: SessionState.SUSPENDED in states.after(0), 10, "SUSPENDED")
        assert not st.connected
    # Listeners run on the backend's thread: wait for the notification, not the property.
    wait_for(lambda: states.after(0)[-1] is SessionState.CONNECTED, 30,
             "CONNECTED after the outage")
    assert st.connected
    if SessionState.LOST in states.after(0):
        # Allowed for ZooKeeper: the outage is a server restart here, and a loaded machine
        # can take longer than the session timeout to bring it back. LOST must be truthful.
        assert backend.name == "zookeeper", "a short outage lost the session"
        assert st.exists("current/api/h1") is None, "LOST reported, the ephemeral still there"
    else:
        assert st.get("current/api/h1")[0] == b"on", "session kept, its ephemeral gone"


# -- Consul backend specifics (checked against the fake only) -----------------------------
@pytest.fixture(params=["consul-fake"])
def consul() -> Iterator[ConsulFakeBackend]:
    fake = FakeConsul().start()
    b = ConsulFakeBackend(fake)
    try:
        yield b
    finally:
        b.close()
        fake.close()


def test_consul_session_settings_and_key_layout(consul: ConsulFakeBackend) -> None:
    st = consul.open(session_timeout=4.0)
    fake = consul.fake
    session = fake.sessions[st.session_id]  # type: ignore[attr-defined]
    assert session["ttl"] == 10 and session["behavior"] == "delete"
    assert session["lock_delay"] == 0 and session["Checks"] == []
    root = consul.url.rsplit("/", 1)[1]
    st.create("current/api/h1", b"on", ephemeral=True)
    assert fake.kv[f"{root}/current/api/h1"]["Session"] == st.session_id  # type: ignore
    assert not any(k.startswith("/") for k in fake.kv)
    # Keys written by hand (consul kv put) with a higher suffix: the order still holds.
    fake.apply([{"Verb": "set", "Key": f"{root}/deploy/item-0000000041", "Value": ""}])
    assert st.create("deploy/item-", sequential=True) == "deploy/item-0000000042"
    assert ".seq" not in st.children("")


def test_consul_reregister_right_after_expiry(consul: ConsulFakeBackend) -> None:
    """Lock-delay is 0: our own ephemeral can be re-created as soon as the new session is
    up (Consul's default 15 s would refuse it)."""
    st = consul.open()
    st.create("current/api/h1", b"on", ephemeral=True)
    old = st.session_id  # type: ignore[attr-defined]
    consul.expire(st)
    with pytest.raises(StoreUnavailable):  # no live session for the ephemeral yet
        st.create("current/api/h1", b"again", ephemeral=True)
    wait_for(lambda: st.connected and st.session_id not in (None, old), 10,  # type: ignore
             "a new session")
    st.create("current/api/h1", b"again", ephemeral=True)


def test_consul_tries_the_next_address(consul: ConsulFakeBackend) -> None:
    root = consul.url.rsplit("/", 1)[1]
    url = f"consul://127.0.0.1:{free_port()},{consul.fake.address}/{root}"
    st = open_store(url)
    st.start(timeout=10)
    consul.stores.append(st)
    st.create("hosts/h1", b"{}")
    assert st.get("hosts/h1")[0] == b"{}"
