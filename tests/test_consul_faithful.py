"""The Consul backend against the failure behaviour real Consul has (docs/consul.md).

Each test drives one behaviour of tests/fakeconsul.py that was written from Consul's own
source: session timers at 2 x TTL re-armed by every leader election (session_ttl.go),
sessions and the node's serfHealth check / the node's registration, the transaction op cap
(agent/txn_endpoint.go maxTxnOps), 500 "No cluster leader", an answer lost after the write
applied, and a blocking-query index that goes backwards once tombstones are reaped. TTL
behaviour runs on a clock the test moves, with Consul's real 10 s minimum TTL.
Not a real Consul: what the fake gets wrong, these tests cannot see.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import suppress

import pytest
import requests
from fakeconsul import FakeConsul, ManualClock

from supervisor_dcdeploy import ops
from supervisor_dcdeploy.cli import main
from supervisor_dcdeploy.store import (Create, Delete, SessionState, SetData, Store,
                                       StoreError, StoreUnavailable, open_store)
from supervisor_dcdeploy.store import consul as consul_store
from supervisor_dcdeploy.store.consul import TransactionTooLarge
from supervisor_dcdeploy.waiting import wait_for


class Lab:
    """One fake Consul and stores on a fresh root of it."""

    def __init__(self, fake: FakeConsul) -> None:
        self.fake = fake
        self.root = f"dc-{uuid.uuid4().hex[:12]}"
        self.url = f"consul://{fake.address}/{self.root}"
        self.stores: list[Store] = []

    def open(self, request_timeout: float | None = None) -> Store:
        store = open_store(self.url, session_timeout=10)
        if request_timeout is not None:
            store.request_timeout = request_timeout  # type: ignore[attr-defined]
        store.start(timeout=15)
        self.stores.append(store)
        return store

    def present(self, path: str) -> bool:
        """Whether the key is in Consul's KV (what every other host would read)."""
        with self.fake.cond:
            return f"{self.root}/{path}" in self.fake.kv

    def http(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, f"http://{self.fake.address}{path}", timeout=10, **kw)

    def close(self) -> None:
        for store in self.stores:
            with suppress(StoreError):
                store.stop()
        self.fake.close()


def crash(store: Store) -> None:
    """The host dies: nothing renews its session any more and nothing destroys it."""
    store._closed = True  # type: ignore[attr-defined]
    store._stopping.set()  # type: ignore[attr-defined]
    store._kick.set()  # type: ignore[attr-defined]


@pytest.fixture
def consul(request) -> Iterator[Lab]:
    """A fresh fake; ``indirect`` parameters are FakeConsul options (version, clock)."""
    options = dict(getattr(request, "param", {}))
    lab = Lab(FakeConsul(**options).start())
    lab.clock = options.get("clock")  # type: ignore[attr-defined]
    try:
        yield lab
    finally:
        lab.close()


def clocked(test):
    """Run ``test`` on a fake whose session timers follow a clock the test advances."""
    return pytest.mark.parametrize("consul", [{"clock": ManualClock()}], indirect=True,
                                   ids=["manual-clock"])(test)


def consul_version(*versions: str):
    return pytest.mark.parametrize("consul", [{"version": v} for v in versions],
                                   indirect=True, ids=[f"consul-{v}" for v in versions])


@clocked
def test_crashed_host_presence_lingers_up_to_twice_the_ttl(consul):
    lab, clock = consul, consul.clock
    host = lab.open()
    host.create("current/api/h1", b"on", ephemeral=True)
    crash(host)  # its last renew was at the clock's present time
    clock.advance(10.5)  # past the 10 s TTL: Consul's timer is 2 x TTL
    lab.fake.run_timers()
    assert lab.present("current/api/h1")
    clock.advance(9.6)  # 20.1 s after the last renew
    lab.fake.run_timers()
    assert not lab.present("current/api/h1")


@clocked
def test_leader_election_rearms_every_session_timer(consul):
    lab, clock = consul, consul.clock
    host = lab.open()
    host.create("current/api/h1", b"on", ephemeral=True)
    crash(host)
    clock.advance(15)
    lab.fake.lose_leader()
    clock.advance(10)  # 25 s after the crash: no leader, no timer runs
    lab.fake.run_timers()
    assert lab.present("current/api/h1")
    lab.fake.elect_leader()  # initializeSessionTimers: 2 x TTL from now
    clock.advance(19.9)  # 44.9 s after the crash
    lab.fake.run_timers()
    assert lab.present("current/api/h1")
    clock.advance(0.2)
    lab.fake.run_timers()
    assert not lab.present("current/api/h1")


def test_no_leader_is_500_and_the_store_rides_an_election(consul):
    st = consul.open(request_timeout=1.0)
    states: list[SessionState] = []
    st.add_listener(states.append)
    st.create("hosts/h1", b"1")
    sid = st.session_id  # type: ignore[attr-defined]
    assert consul.http("GET", f"/v1/kv/{consul.root}/hosts/h1").status_code == 200
    consul.fake.lose_leader()
    answer = consul.http("PUT", f"/v1/kv/{consul.root}/x", data=b"")
    assert (answer.status_code, answer.text) == (500, "No cluster leader")
    assert consul.http("GET", f"/v1/kv/{consul.root}/hosts/h1?stale").status_code == 200
    with pytest.raises(StoreUnavailable):
        st.set("hosts/h1", b"2")
    with pytest.raises(StoreUnavailable):
        st.get("hosts/h1")
    wait_for(lambda: SessionState.SUSPENDED in states, 10, "the store to notice")
    consul.fake.elect_leader()
    wait_for(lambda: st.connected, 10, "the store to come back")
    assert st.session_id == sid  # type: ignore[attr-defined]  # the election kept it
    assert st.get("hosts/h1")[0] == b"1"
    # A short election in the middle of a write: "No cluster leader" applied nothing, so
    # the write is sent again and lands once.
    consul.fake.election(requests=2)
    version = st.set("hosts/h1", b"3")
    assert st.get("hosts/h1") == (b"3", version)
    consul.fake.election(requests=2)
    assert st.create("hosts/h2", b"new") == "hosts/h2"


def test_serf_health_spares_checkless_sessions_and_deregistration_ends_all(consul):
    st = consul.open()
    states: list[SessionState] = []
    st.add_listener(states.append)
    st.create("current/api/h1", b"on", ephemeral=True)
    sid = st.session_id  # type: ignore[attr-defined]
    assert consul.fake.sessions[sid]["Checks"] == []
    tied = consul.http("PUT", "/v1/session/create", json={"TTL": "10s"}).json()["ID"]
    assert consul.fake.sessions[tied]["Checks"] == ["serfHealth"]

    consul.fake.set_serf_health("critical")
    assert tied not in consul.fake.sessions
    refused = consul.http("PUT", "/v1/session/create", json={})
    assert refused.status_code == 500 and "serfHealth" in refused.text
    st.create("hosts/h1", b"still here")  # our session, not tied to serfHealth, lives on
    assert st.session_id == sid and consul.present("current/api/h1")  # type: ignore
    consul.fake.set_serf_health("passing")

    consul.fake.deregister_node()
    assert not consul.present("current/api/h1")
    wait_for(lambda: SessionState.LOST in states, 15, "the store to see its session gone")
    refused = consul.http("PUT", "/v1/session/create", json={"Checks": []})
    assert (refused.status_code, refused.text) == (500, "Missing node registration")
    assert not st.connected
    consul.fake.register_node()
    wait_for(lambda: st.connected, 15, "a new session once the node is back")
    assert st.session_id not in (None, sid)  # type: ignore[attr-defined]
    st.create("current/api/h1", b"again", ephemeral=True)


@consul_version("1.13.9", "1.14.0")
def test_txn_op_cap_follows_the_consul_version(consul):
    lab = consul
    limit = 64 if lab.fake.version < (1, 14) else 128

    def txn(n: int) -> requests.Response:
        body = [{"KV": {"Verb": "set", "Key": f"{lab.root}/k{i}", "Value": ""}}
                for i in range(n)]
        return lab.http("PUT", "/v1/txn", data=json.dumps(body))
    assert txn(limit).status_code == 200
    refused = txn(limit + 1)
    assert refused.status_code == 413
    assert refused.text == f"Transaction contains too many operations ({limit + 1} > {limit})"

    st = lab.open()
    st.ensure("big")
    # Creates under one parent cost one Consul op each plus one parent check.
    st.commit([Create(f"big/n{i}", b"") for i in range(limit - 1)])
    names = st.children("big")
    assert len(names) == limit - 1
    # Each delete with a version is two Consul ops: too many for one transaction.
    too_many = [Delete(f"big/{n}", st.exists(f"big/{n}")) for n in names]
    with pytest.raises(TransactionTooLarge) as refused_once:
        st.commit(too_many)
    assert refused_once.value.limit == limit
    assert "nothing was written" in str(refused_once.value)
    assert len(st.children("big")) == limit - 1
    sent = lab.fake.requests
    with pytest.raises(TransactionTooLarge):  # the limit is known now: refused unsent
        st.commit(too_many)
    assert lab.fake.requests == sent


@consul_version("1.13.9")
def test_abort_of_a_queue_longer_than_one_transaction(consul, capsys):
    """64 ops per transaction (Consul before 1.14) hold about 20 deploy items' abort
    (delete + history record each): a longer queue is aborted in chunks, each item
    atomically, never with a bare error."""
    st = consul.open()
    st.ensure("deploy")
    st.ensure("history")
    items = [st.create("deploy/item-", b"{}", sequential=True).split("/")[1]
             for _ in range(45)]
    assert main(["--store", consul.url, "abort"]) == 0
    assert "aborted 45 queued item(s)" in capsys.readouterr().out
    assert st.children("deploy") == []
    assert sorted(st.children("history")) == items
    assert json.loads(st.get(f"history/{items[0]}")[0])["state"] == "aborted"


@consul_version("1.13.9")
def test_abort_too_large_for_one_item_is_a_clear_error(consul, capsys):
    """An item that cannot fit even alone is refused with the reason, not an exception."""
    st = consul.open()
    st.create("deploy/item-", b"{}", sequential=True)
    consul.fake.max_txn_ops = 2  # smaller than one item's delete + history record
    assert main(["--store", consul.url, "abort"]) == 1
    assert "Consul takes at most 2" in capsys.readouterr().err
    with pytest.raises(TransactionTooLarge, match="at most 2"):
        ops.abort(st)
    assert len(st.children("deploy")) == 1


def test_an_applied_write_whose_answer_was_lost_is_read_back(consul):
    st = consul.open()
    fake = consul.fake
    fake.lose_response("PUT", "/v1/txn")  # applied, the answer never comes
    assert st.create("hosts/h1", b"one") == "hosts/h1"  # not NodeExists for our own node
    assert st.get("hosts/h1")[0] == b"one"

    st.ensure("queue")
    fake.lose_response("PUT", "/v1/txn")
    name = st.create("queue/item-", b"x", sequential=True)
    assert st.children("queue") == [name.split("/")[1]]  # found ours, made no second

    version = st.exists("hosts/h1")
    fake.lose_response("PUT", "/v1/txn")
    new = st.set("hosts/h1", b"two", version)
    assert st.get("hosts/h1") == (b"two", new)

    fake.lose_response("PUT", "/v1/txn")
    results = st.commit([SetData("hosts/h1", b"three", new), Create("hosts/h2", b"")])
    assert results == [st.exists("hosts/h1"), "hosts/h2"]

    fake.lose_response("PUT", "/v1/txn", applied=False)  # lost before it was applied
    assert st.create("hosts/h3", b"") == "hosts/h3"
    assert st.exists("hosts/h3") is not None

    fake.lose_response("PUT", "/v1/txn")
    st.delete("hosts/h3")
    assert st.exists("hosts/h3") is None


def test_blocking_index_going_backwards_is_reset(consul, monkeypatch):
    monkeypatch.setattr(consul_store, "WATCH_WAIT", 0.3)  # the watch's wait, for speed
    st = consul.open()
    st.create("hosts/a", b"")
    st.create("hosts/b", b"")
    st.delete("hosts/b")  # the newest change under the root is now a tombstone
    fake = consul.fake
    with fake.cond:
        high = fake.query_index(consul.root, exact=False)
    st.exists("hosts/prime", watch=lambda: None)  # the root watch starts with a first watch
    wait_for(lambda: st._watch_index == high, 10, "the watch to catch up")  # type: ignore
    fired = threading.Event()
    st.exists("hosts/never", watch=fired.set)

    fake.reap_tombstones()
    with fake.cond:
        low = fake.query_index(consul.root, exact=False)
    assert low < high  # Consul's index for the prefix went backwards
    wait_for(lambda: st._watch_index == low, 10,  # type: ignore[attr-defined]
             "the watch to reset its index")
    assert fired.wait(10)  # pending watches fire: they may have missed a change

    after = threading.Event()
    st.get("hosts/a", watch=after.set)
    st.set("hosts/a", b"changed")
    assert after.wait(10)
