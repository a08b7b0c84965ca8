"""The counters ``bench/scale.py`` reports, checked against known request sequences: the
server's own per-namespace counts (``zkserver.namespace_requests``) and the watch
notifications counted by the store client (``OpCounter.notifications``)."""

from __future__ import annotations

import threading

from supervisor_dcdeploy.store import Create, SetData
from supervisor_dcdeploy.waiting import wait_for
from supervisor_dcdeploy.lab.zkserver import namespace_requests


def test_server_counts_what_the_client_sent(zk_server, store):
    servers = [("127.0.0.1", zk_server.client_port)]
    namespace = store.root.strip("/")  # a root of its own per test: nobody else counts here
    store.ensure("a")
    before = namespace_requests(servers, namespace)
    for _ in range(10):
        store.get("a")
    store.children("a")
    store.sync()  # not a read for ZooKeeper
    after_reads = namespace_requests(servers, namespace)
    assert (after_reads - before).reads == 11
    assert (after_reads - before).writes == 0
    for i in range(3):
        store.set("a", str(i).encode())
    store.commit([SetData("a", b"x"), Create("a/b")])  # each op of a multi counts
    after = namespace_requests(servers, namespace)
    assert (after - after_reads).writes == 5
    assert (after - after_reads).reads == 0


def test_notifications_are_counted_by_client_and_server(zk_server, store):
    servers = [("127.0.0.1", zk_server.client_port)]
    namespace = store.root.strip("/")
    store.ensure("a")
    fired = threading.Event()
    client_before = store.ops.notifications
    server_before = namespace_requests(servers, namespace)
    store.get("a", watch=fired.set)
    store.set("a", b"changed")
    wait_for(fired.is_set, 10, "the data watch on a")
    assert store.ops.notifications - client_before == 1
    assert (namespace_requests(servers, namespace) - server_before).notifications >= 1

