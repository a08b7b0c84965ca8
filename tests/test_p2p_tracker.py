"""The store-backed tracker against a real ZooKeeper: registration under peers/<infohash>,
answers ordered by rack, stop events, garbage in the store, re-registration after the
session is lost, and the trust rules: unstaged infohashes refused, announces rate-limited,
the swarm's node removed once its release is superseded."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.request
from urllib.parse import quote_from_bytes

import pytest
from kazoo.client import KazooClient

from supervisor_dcdeploy.waiting import wait_for as _wait_for
from supervisor_dcdeploy import ops
from supervisor_dcdeploy.model import StagedRelease
from supervisor_dcdeploy.p2p import bencode
from supervisor_dcdeploy.p2p.torrent import infohash
from supervisor_dcdeploy.p2p.tracker import Tracker, prune_unstaged_peers


def metainfo(name: bytes) -> bytes:
    """A one-piece private torrent of a one-byte file called ``name`` (no file needed)."""
    return bencode.encode({b"announce": b"http://127.0.0.1:6969/announce",
                           b"info": {b"length": 1, b"name": name, b"piece length": 16384,
                                     b"pieces": hashlib.sha1(name[:1]).digest(),
                                     b"private": 1}})


META = metainfo(b"x")
IH = bytes.fromhex(infohash(META))


def stage_torrent(store, svc: str, meta: bytes, version: str = "1") -> None:
    """What ``dcdeploy stage --path`` leaves in ``staging/<svc>`` (without the service)."""
    data = StagedRelease(svc, version, "0" * 64, 1, (),
                         base64.b64encode(meta).decode()).to_json()
    if store.exists(f"staging/{svc}") is None:
        store.create(f"staging/{svc}", data)
    else:
        store.set(f"staging/{svc}", data)


def announce(tracker: Tracker, *, port: int, left: int = 100, event: str = "",
             numwant: int = 50, downloaded: int = 0, ih: bytes = IH) -> dict:
    q = (f"info_hash={quote_from_bytes(ih)}&peer_id=-TR3000-000000000000&port={port}"
         f"&uploaded=0&downloaded={downloaded}&left={left}&numwant={numwant}&compact=1"
         + (f"&event={event}" if event else ""))
    with urllib.request.urlopen(f"http://127.0.0.1:{tracker.port}/announce?{q}", timeout=5) as r:
        return bencode.decode(r.read())


def peers_of(body: dict) -> list[tuple[str, int]]:
    raw = body[b"peers"]
    return [(".".join(str(b) for b in raw[i:i + 4]), int.from_bytes(raw[i + 4:i + 6], "big"))
            for i in range(0, len(raw), 6)]


def wait_for(cond, timeout=20.0, what="condition"):
    return _wait_for(cond, timeout, what, interval=0.05)


@pytest.fixture
def trackers(store):
    stage_torrent(store, "t", META)
    made: list[Tracker] = []

    def make(host, address, rack, **kw):
        kw.setdefault("staged_miss_secs", 0.0)  # re-read staging/* on every miss
        t = Tracker(store, host, address, rack, port=0, **kw)
        t.start()
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


def test_announce_registers_routable_address_and_answers_same_rack_first(store, trackers):
    hosts = {"a1": ("10.9.0.1", "A"), "a2": ("10.9.0.2", "A"), "b1": ("10.9.0.3", "B"),
             "b2": ("10.9.0.4", "B")}
    ts = {h: trackers(h, addr, rack) for h, (addr, rack) in hosts.items()}
    for i, (h, t) in enumerate(ts.items()):
        announce(t, port=7000 + i, event="started")
    # what the store holds: the host's address (not the 127.0.0.1 the announce came from)
    raw, _ = store.get(f"peers/{IH.hex()}/a1")
    assert json.loads(raw) == {"address": "10.9.0.1", "port": 7000, "rack": "A",
                               "complete": False}
    assert sorted(store.children(f"peers/{IH.hex()}")) == sorted(hosts)
    time.sleep(1.1)  # let the 1 s peer-list cache of a1 expire (it answered before b* joined)
    body = announce(ts["a1"], port=7000)
    got = peers_of(body)
    assert ("10.9.0.1", 7000) not in got
    assert got[0] == ("10.9.0.2", 7001)  # same rack first
    assert set(got[1:]) == {("10.9.0.3", 7002), ("10.9.0.4", 7003)}
    assert ts["a1"].last_answer(IH.hex()) == ["a2", "b1", "b2"] or \
        ts["a1"].last_answer(IH.hex()) == ["a2", "b2", "b1"]
    # numwant caps the answer: only the same-rack peer
    assert peers_of(announce(ts["b1"], port=7002, numwant=1)) == [("10.9.0.4", 7003)]


def test_complete_flag_stop_event_and_interval(store, trackers):
    active = {"on": True}
    t = trackers("h1", "10.9.1.1", "A", active=lambda: active["on"])
    body = announce(t, port=7100, left=0, event="completed")
    assert body[b"interval"] == 5
    assert json.loads(store.get(f"peers/{IH.hex()}/h1")[0])["complete"] is True
    active["on"] = False
    assert announce(t, port=7100, left=0)[b"interval"] == 60
    announce(t, port=7100, event="stopped")
    assert store.exists(f"peers/{IH.hex()}/h1") is None


def test_garbage_peer_nodes_are_skipped(store, trackers):
    t = trackers("h1", "10.9.2.1", "A")
    store.create(f"peers/{IH.hex()}/junk", b"{not json", ephemeral=True)
    store.create(f"peers/{IH.hex()}/h2", json.dumps(
        {"address": "10.9.2.2", "port": 7201, "rack": "A", "complete": True}).encode(),
        ephemeral=True)
    assert peers_of(announce(t, port=7200)) == [("10.9.2.2", 7201)]


def test_bad_announce_gets_a_failure_reason(store, trackers):
    t = trackers("h1", "10.9.3.1", "A")
    with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/announce?info_hash=x&port=1",
                                timeout=5) as r:
        body = bencode.decode(r.read())
    assert b"20 bytes" in body[b"failure reason"]
    assert t.refused["malformed"] == 1 and store.exists("peers") is None


def test_reregisters_after_session_loss(store, trackers, zk_server):
    t = trackers("h1", "10.9.4.1", "A")
    announce(t, port=7300, event="started")
    path = f"peers/{IH.hex()}/h1"
    assert store.exists(path) is not None
    # Expire the tracker's session the kazoo.testing way: a second client with the same
    # session id closes it.
    session_id, password = store.client.client_id
    other = KazooClient(hosts=f"127.0.0.1:{zk_server.client_port}",
                        client_id=(session_id, password))
    other.start(timeout=10)
    other.stop()
    other.close()
    wait_for(lambda: not store.connected or store.exists(path) is None, 15, "session loss")
    # No announce in between: the tracker's maintenance thread restores the registration.
    wait_for(lambda: store.connected and store.exists(path) is not None, 30,
             "re-registration after session loss")
    assert json.loads(store.get(path)[0])["port"] == 7300
    owner = store.client.exists(f"{store.root}/{path}").ephemeralOwner
    assert owner == store.client.client_id[0] != session_id  # owned by the new session


def test_an_empty_host_meets_the_seeders_first_then_everyone(store, trackers):
    seeder = trackers("s1", "10.9.5.1", "A")
    other = trackers("h2", "10.9.5.2", "A")
    late = trackers("h1", "10.9.5.3", "A", intro_window=30)
    announce(seeder, port=7401, left=0, event="completed")
    announce(other, port=7402, downloaded=1 << 20)
    body = announce(late, port=7403, event="started")  # has nothing yet: the seeder only
    assert peers_of(body) == [("10.9.5.1", 7401)]
    assert body[b"interval"] == 2  # ... and is asked back soon
    body = announce(late, port=7403, downloaded=16384)  # holds pieces now: everyone
    assert set(peers_of(body)) == {("10.9.5.1", 7401), ("10.9.5.2", 7402)}
    assert body[b"interval"] == 60
    # Past its window an empty host gets everyone (the seeders may not unchoke it).
    impatient = trackers("h3", "10.9.5.4", "A", intro_window=0)
    assert len(peers_of(announce(impatient, port=7404, event="started"))) == 3


def test_an_unstaged_infohash_is_refused_and_writes_nothing(store, trackers):
    t = trackers("h1", "10.9.6.1", "A")
    other = bytes.fromhex(infohash(metainfo(b"y")))
    body = announce(t, port=7500, event="started", ih=other)
    assert b"not a staged release" in body[b"failure reason"] and b"peers" not in body
    assert store.exists(f"peers/{other.hex()}") is None
    assert t.refused["unstaged"] == 1
    # Staged a moment later (by another client): the next announce is answered at once.
    stage_torrent(store, "u", metainfo(b"y"))
    assert b"failure reason" not in announce(t, port=7500, ih=other)
    assert store.exists(f"peers/{other.hex()}/h1") is not None


def test_announces_over_the_rate_are_refused(store, trackers):
    t = trackers("h1", "10.9.7.1", "A", rate=0.001, burst=3)
    bodies = [announce(t, port=7600) for _ in range(5)]
    assert [b"failure reason" in b for b in bodies] == [False, False, False, True, True]
    assert b"slow down" in bodies[-1][b"failure reason"]
    assert t.refused["rate"] == 2


def test_superseded_swarm_is_removed_from_the_store(store, trackers):
    ops.service_set(store, "t", program=None, quorum=1)
    stage_torrent(store, "t", META)
    a, b = trackers("h1", "10.9.8.1", "A"), trackers("h2", "10.9.8.2", "A")
    announce(a, port=7700, event="started")
    announce(b, port=7701, event="started")
    assert sorted(store.children(f"peers/{IH.hex()}")) == ["h1", "h2"]
    # A peers node nobody staged (left by an older version of the tracker).
    store.create("peers/" + "ab" * 20 + "/old", b"{}")
    new = metainfo(b"z")
    release = ops.stage(store, "t", "2", sha256="1" * 64, size=1,
                        torrent=base64.b64encode(new).decode())
    assert release.torrent
    assert store.children("peers") == []  # dcdeploy stage removed both superseded swarms
    # A tracker still seeding the old torrent is refused once it re-reads staging/* (within
    # STAGED_REFRESH_SECS); it then drops its registration and the swarm's node.
    wait_for(lambda: b"not a staged release" in announce(a, port=7700).get(
        b"failure reason", b""), 15, "the old torrent refused")
    assert store.children("peers") == []
    assert prune_unstaged_peers(store) == []


def test_a_superseded_seed_of_the_build_host_does_not_come_back_into_the_store(
        store, trackers):
    """The build host keeps seeding a release after the next one is staged; `dcdeploy stage`
    removes the old swarm's peers node, and the build host's tracker must not write it back
    (it did: its own seeds were always answered and re-registered, so the node came back
    within one maintenance pass, ~10 s; tests/test_swarm_deploy.py saw it as a flake)."""
    ops.service_set(store, "t", program=None, quorum=1)
    old_meta, new_meta = metainfo(b"o"), metainfo(b"n")
    old, new = infohash(old_meta), infohash(new_meta)
    seeds = [old]
    build = trackers("build", "10.9.9.1", "build", local_torrents=lambda: list(seeds))
    assert b"failure reason" not in announce(build, port=7800, left=0, ih=bytes.fromhex(old))
    stage_torrent(store, "t", old_meta)
    assert store.exists(f"peers/{old}/build") is not None
    seeds.append(new)  # dcdeploy stage --path: seed the next release, then stage it
    assert b"failure reason" not in announce(build, port=7800, left=0, ih=bytes.fromhex(new))
    ops.stage(store, "t", "2", sha256="1" * 64, size=1,
              torrent=base64.b64encode(new_meta).decode())
    assert store.exists(f"peers/{old}") is None  # pruned by the stage
    build._resync.set()  # its maintenance pass now, instead of within 10 s
    wait_for(lambda: old not in build.status()["registered"], 15,
             "the build host's tracker to drop the superseded seed")
    assert store.exists(f"peers/{old}") is None  # not written back
    assert store.exists(f"peers/{new}/build") is not None  # the staged one stays
    body = announce(build, port=7800, left=0, ih=bytes.fromhex(old))
    assert b"not a staged release" in body[b"failure reason"]
    assert store.exists(f"peers/{old}") is None
    # Staged again (the same bytes): answered and registered again.
    stage_torrent(store, "t", old_meta, version="3")
    assert b"failure reason" not in announce(build, port=7800, left=0, ih=bytes.fromhex(old))
    assert store.exists(f"peers/{old}/build") is not None


def test_the_seeders_own_torrents_are_answered_before_they_are_staged(store, trackers):
    # dcdeploy stage --path seeds first, then publishes: the seeder's tracker must answer.
    own = bytes.fromhex(infohash(metainfo(b"w")))
    t = trackers("build", "10.9.9.1", "build", local_torrents=lambda: [own.hex()])
    assert b"failure reason" not in announce(t, port=7800, left=0, ih=own)
    assert store.exists(f"peers/{own.hex()}/build") is not None
    other = trackers("h1", "10.9.9.2", "A")  # not its seed, not staged: refused
    assert b"not a staged release" in announce(other, port=7801, ih=own)[b"failure reason"]
