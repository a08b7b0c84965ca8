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



def test_a_tree_watch_and_a_one_shot_watch_on_one_node_both_fire(zk_server, store):
    """The store hands a notification to its tree watchers and skips kazoo's own handling
    when no one-shot watch waits on the path (most of a mirror's notifications); a path
    with one still gets it, once."""
    store.ensure("t")
    store.ensure("t/a")
    tree: list[tuple[str, str]] = []
    store.watch_tree("t", lambda kind, path: tree.append((kind, path)))
    fired: list[int] = []
    store.get("t/a", watch=lambda: fired.append(1))
    store.set("t/a", b"1")
    store.ensure("t/b")  # a notification with no one-shot watch on its path
    wait_for(lambda: ("created", "t/b") in tree and fired, 10, "both notifications")
    store.sync()
    assert tree == [("changed", "t/a"), ("created", "t/b")]
    assert fired == [1]
    store.get("t/a", watch=lambda: fired.append(2))  # re-armed: fires again, once
    store.set("t/a", b"2")
    wait_for(lambda: len(fired) == 2, 10, "the re-armed one-shot watch")
    assert fired == [1, 2] and tree[-1] == ("changed", "t/a")


def test_the_store_s_select_reports_ready_descriptors_as_kazoo_s_does():
    """``PollingHandler.select`` (poll(2) instead of a new epoll per call) keeps kazoo's
    contract: ready readers, then writers, an empty third list, a timeout with nothing
    ready gives three empty lists, and a bad descriptor or timeout raises."""
    import socket

    import pytest

    from supervisor_dcdeploy.store.zookeeper import PollingHandler

    handler = PollingHandler()
    a, b = socket.socketpair()
    try:
        assert handler.select([a], [], [], 0.01) == ([], [], [])
        assert handler.select([a], [], [], 0.0001) == ([], [], [])  # rounds up: no spin
        b.send(b"x")
        assert handler.select([a, b], [], [], 1.0) == ([a], [], [])
        assert handler.select([], [b], [], 1.0) == ([], [b], [])
        assert handler.select([a], [a], [], 1.0) == ([a], [], [])  # both ways: a reader
        b.close()  # a hang-up wakes the reader
        a.recv(1)
        assert handler.select([a], [], [], 1.0) == ([a], [], [])
        with pytest.raises(ValueError):
            handler.select([a], [], [], -1)
        with pytest.raises(TypeError):  # kazoo's fileobj_to_fd, as in its own select
            handler.select([-1], [], [], 0)
    finally:
        a.close()
        b.close()


def test_the_connection_reads_packets_that_arrive_together_with_one_receive():
    """The handler's socket (``_BufferedSocket``) takes what the kernel holds in one
    ``recv`` and serves kazoo's reads (a packet's length, then its body) from it;
    ``pending()`` and the handler's ``select`` say when bytes are already there, so the
    second packet needs no poll and no receive. A packet split across arrivals is
    returned in pieces, as a socket would."""
    import socket

    from supervisor_dcdeploy.store.zookeeper import PollingHandler, _BufferedSocket

    class Counting:
        def __init__(self, sock):
            self.sock, self.receives = sock, 0

        def recv(self, size):
            self.receives += 1
            return self.sock.recv(size)

        def fileno(self):
            return self.sock.fileno()

    handler = PollingHandler()
    a, b = socket.socketpair()
    inner = Counting(a)
    conn = _BufferedSocket(inner)
    try:
        assert conn.pending() == 0
        assert handler.select([conn], [], [], 0.01) == ([], [], [])
        b.sendall(b"\x00\x00\x00\x03abc" + b"\x00\x00\x00\x02de")  # two packets at once
        assert handler.select([conn], [], [], 1.0) == ([conn], [], [])
        assert conn.recv(4) == b"\x00\x00\x00\x03" and inner.receives == 1
        assert conn.pending() == 9
        assert handler.select([conn, b], [], [], 1.0) == ([conn], [], [])  # no poll
        assert conn.recv(3) == b"abc"
        assert conn.recv(4) == b"\x00\x00\x00\x02"
        assert conn.recv(5) == b"de"  # what is there, not more
        assert inner.receives == 1 and conn.pending() == 0
        b.sendall(b"fg")
        assert handler.select([conn], [], [], 1.0) == ([conn], [], [])
        assert conn.recv(2) == b"fg" and inner.receives == 2
        assert conn.fileno() == a.fileno()
    finally:
        a.close()
        b.close()
