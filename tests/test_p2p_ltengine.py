"""The libtorrent engine's daemon and client on this host's loopback (no namespaces): the
control socket's rules, seeding from data on disk, the records that survive a restart, and
the settings it runs with. The swarm itself (several hosts) is in test_p2p_swarm.py, run
against both engines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor_dcdeploy.p2p.engine import Engine
from supervisor_dcdeploy.p2p.errors import DownloadError
from supervisor_dcdeploy.p2p.ltdaemon import (LT_SETTINGS, LtDaemon, inside, settings,
                                              share_priorities)
from supervisor_dcdeploy.p2p.ltengine import LtDaemonProcess, LtEngine
from supervisor_dcdeploy.p2p.seed import stage
from supervisor_dcdeploy.p2p.swarm import SwarmFetcher
from supervisor_dcdeploy.p2p.torrent import artifact_sha256
from supervisor_dcdeploy.waiting import wait_for



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(tmp_path):
    proc = LtDaemonProcess(tmp_path / "state", [tmp_path / "releases"], "127.0.0.1",
                           free_port())
    proc.start(wait=30)
    try:
        yield proc
    finally:
        proc.stop()


def test_both_engines_implement_the_interface():
    assert issubclass(LtEngine, Engine) and issubclass(SwarmFetcher, Engine)
    assert not LtEngine.__abstractmethods__ and not SwarmFetcher.__abstractmethods__


def test_settings_close_the_swarm_and_keep_the_tuning():
    s = settings("10.0.0.5", 51413, {"unchoke_slots_limit": 4})
    # Peers on the data address; announces to the loopback tracker from 127.0.0.1 only.
    assert s["listen_interfaces"] == "10.0.0.5:51413l,127.0.0.1:51413"
    assert settings("127.0.0.1", 7, {})["listen_interfaces"] == "127.0.0.1:7"
    assert not any(s[k] for k in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp",
                                  "enable_outgoing_utp", "enable_incoming_utp"))
    assert s["unchoke_slots_limit"] == 4 and LT_SETTINGS["unchoke_slots_limit"] == 8
    assert s["min_announce_interval"] <= 5  # our tracker's active interval is honoured
    # Short request queues: a host's picks stay visible to the others (docs/distribution.md).
    assert LT_SETTINGS["request_queue_time"] == 1 and LT_SETTINGS["max_out_request_queue"] <= 16
    with pytest.raises(ValueError, match="listen_interfaces"):
        settings("10.0.0.5", 51413, {"listen_interfaces": "0.0.0.0:1"})


def test_inside_follows_symlinks(tmp_path):
    root = tmp_path / "releases"
    (root / "a").mkdir(parents=True)
    (root / "out").symlink_to("/etc")
    assert inside(root / "a", [root]) and inside(root, [root])
    assert not inside(root / "out", [root]) and not inside(tmp_path, [root])
    assert not inside(root / ".." / "x", [root])


def test_seeds_from_disk_refuses_outside_paths_and_survives_a_restart(tmp_path, daemon):
    rel = tmp_path / "releases"
    art = rel / "a.bin"
    art.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    staged = stage(art)
    engine = LtEngine(daemon.control, rel, poll=0.1)
    # The socket: 0600 in a 0700 directory.
    assert (daemon.control.stat().st_mode & 0o777) == 0o600
    assert (daemon.control.parent.stat().st_mode & 0o777) == 0o700
    with pytest.raises(DownloadError, match="outside the data roots"):
        engine.add(staged.metainfo, download_dir=tmp_path)
    with pytest.raises(DownloadError, match="unknown op"):
        engine._call("set_settings", infohash="0" * 40)
    with pytest.raises(DownloadError, match="metainfo"):
        engine._call("add", metainfo="bm90IGEgdG9ycmVudA==", save_path=str(rel))
    # Seeding the origin's copy: the daemon checks the pieces, nothing is downloaded.
    engine.ensure_seeding(staged.metainfo, rel, origin=True)
    st = engine.wait_seeding(staged.infohash, timeout=30)
    assert st.done_bytes == st.total_bytes == staged.size and st.error == 0
    assert engine.fetch(staged.metainfo_b64, staged.sha256, timeout=30) == art
    # The read-only diagnostics: every piece held, no peer on this lone daemon.
    d = engine.detail(staged.infohash)
    assert d["pieces"] == "1" * len(d["pieces"]) and len(d["pieces"]) >= 1
    assert d["peers"] == [] and d["done_bytes"] == staged.size
    assert engine.detail("0" * 40) is None
    with pytest.raises(DownloadError, match="infohash"):
        engine._call("detail", infohash="../etc")
    # A restarted daemon adds its recorded torrents back and checks them again.
    old_pid = daemon.proc.pid
    daemon.kill()
    daemon.start(wait=30)
    assert daemon.proc.pid != old_pid
    assert engine.wait_seeding(staged.infohash, timeout=30).done_bytes == staged.size
    # Stop seeding and delete: gone from the daemon, its records and the disk.
    assert engine.prune(set()) == [staged.infohash]
    assert engine.state(staged.infohash) is None and not art.exists()
    assert not list((daemon.state_dir / "torrents").glob("*.json"))


def test_downloading_hosts_give_their_share_of_the_pieces_the_top_priority(tmp_path):
    """--share-pieces on two daemons in this process (127.0.0.2 and .3) that download the
    same torrent from nobody: each sees the other downloading and gives its share (every
    second piece) priority 7; once the other is gone, its priorities go back to the
    default. (Whether libtorrent then asks for those pieces first was measured, not
    tested: docs/distribution.md.)"""
    art = tmp_path / "src" / "a.bin"
    art.parent.mkdir()
    art.write_bytes(os.urandom(20 * 64 * 1024))
    staged = stage(art)
    daemons = []
    for k in range(2):
        addr = f"127.0.0.{k + 2}"
        daemons.append(LtDaemon(tmp_path / f"state{k}", [tmp_path / f"rel{k}"], addr,
                                free_port(), {"outgoing_interfaces": addr}, share_pieces=True))
    try:
        for k, d in enumerate(daemons):
            d.add(staged.metainfo, tmp_path / f"rel{k}", origin=False)
        ih = staged.infohash
        listen = daemons[0].ses.listen_port()
        daemons[1]._handle(ih).connect_peer(("127.0.0.2", listen))

        def handshaken(d):
            import libtorrent as lt
            busy = lt.peer_info.connecting | lt.peer_info.handshake
            return [p for p in d._handle(ih).get_peer_info() if not p.flags & busy]

        for d in daemons:
            wait_for(lambda d=d: handshaken(d), 30, "the two daemons connected")
            d.share_tick()
        assert [d.detail(ih)["share"] for d in daemons] == [[0, 2], [1, 2]]
        n = daemons[0]._handle(ih).torrent_file().num_pieces()
        assert n == 20
        for rank, d in enumerate(daemons):
            assert list(d._handle(ih).get_piece_priorities()) == share_priorities(rank, 2, n)
        daemons[1].remove(ih, delete_data=True)
        wait_for(lambda: not daemons[0]._handle(ih).get_peer_info(), 30, "the peer gone")
        daemons[0].share_tick()
        assert daemons[0].detail(ih)["share"] is None
        assert set(daemons[0]._handle(ih).get_piece_priorities()) == {4}
    finally:
        for d in daemons:
            d.stopping.set()
        del daemons


def test_what_the_daemon_reports_complete_is_in_the_file_once_flushed(tmp_path, daemon):
    """#12 (the libtorrent web-seed xfail): libtorrent counts a piece as had once its hash
    passed, computed from the blocks in memory, before their writes reach the file; read at
    once, the file was short of bytes (or, once in CI, not there). After the daemon's
    ``flush`` the file holds every byte. Five web-seeded downloads on loopback (measured
    without the flush: 6 of 8 read wrong at completion)."""
    origin = tmp_path / "origin"
    origin.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("rangeserver.py")), "127.0.0.1",
         str(port), str(origin)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    releases = tmp_path / "releases"
    engine = LtEngine(daemon.control, releases, poll=0.05)
    try:
        assert server.stdout.readline().strip() == "listening"
        for i in range(5):
            art = origin / f"r{i}.bin"
            art.write_bytes(os.urandom(4 * 1024 * 1024))
            staged = stage(art, webseeds=[f"http://127.0.0.1:{port}/{art.name}"])
            engine.add(staged.metainfo)

            def complete(ih: str = staged.infohash) -> bool:
                st = engine.state(ih)
                return st is not None and st.complete
            wait_for(complete, 60, f"r{i}.bin reported complete", interval=0.01)
            assert engine._call("flush", infohash=staged.infohash) is True
            assert artifact_sha256(releases / art.name) == staged.sha256, i
        # The engine's fetch flushes before its sha256 read: no re-check needed.
        assert engine.fetch(staged.metainfo_b64, staged.sha256, timeout=30) == \
            releases / art.name
        assert engine._call("flush", infohash="0" * 40) is False  # unknown torrent
    finally:
        server.kill()
        server.wait()


def test_an_unreachable_daemon_is_a_clear_download_error(tmp_path):
    engine = LtEngine(tmp_path / "nothing.sock", tmp_path, rpc_retry_secs=0.5)
    with pytest.raises(DownloadError, match="ltdaemon at .* unreachable"):
        engine.state("0" * 40)


def test_another_user_cannot_connect(tmp_path, daemon):
    if os.getuid() != 0:
        pytest.skip("needs root to run a probe as another user")
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import socket; s=socket.socket(socket.AF_UNIX); "
         f"s.connect({str(daemon.control)!r})"], preexec_fn=lambda: os.setuid(65534),
        capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe


def test_the_agent_picks_its_engine_from_agent_conf(tmp_path):
    from supervisor_dcdeploy.agent.config import ConfigError, load
    from supervisor_dcdeploy.agent.distribution import Distribution, make_engine

    cfg = tmp_path / "agent.conf"
    base = "[agent]\nstore = zk://z/dc\nroot = /x\ninsecure_unsigned = true\n"
    cfg.write_text(base + "swarm_engine = libtorrent\naddress = 10.0.0.5\n[service:api]\n")
    conf = load(cfg)
    assert Distribution.enabled(conf)
    engine = make_engine(conf)
    assert isinstance(engine, LtEngine) and engine.name == "libtorrent"
    assert engine.control == Path("/x/ltdaemon/control.sock")
    assert engine.download_dir == Path("/x/downloads")
    cfg.write_text(base + "transmission_rpc = http://127.0.0.1:9091/transmission/rpc\n"
                   "[service:api]\n")
    assert isinstance(make_engine(load(cfg)), SwarmFetcher)
    cfg.write_text(base + "swarm_engine = rtorrent\n[service:api]\n")
    conf = load(cfg)
    assert Distribution.enabled(conf)  # so that the agent's start fails, naming the key
    with pytest.raises(ConfigError, match="swarm_engine: 'rtorrent' is not an engine"):
        make_engine(conf)
    cfg.write_text(base + "[service:api]\n")
    assert not Distribution.enabled(load(cfg))
