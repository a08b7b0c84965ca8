"""Pure parts of p2p distribution: bencoding, tracker answers and peer ordering, piece size,
torrents and artifact hashes, daemon settings, error mapping, retention, page-cache warming."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given, settings, strategies as st

from supervisor_dcdeploy.p2p import bencode
from supervisor_dcdeploy.p2p.daemon import daemon_command, write_settings
from supervisor_dcdeploy.p2p.daemon import settings as daemon_settings
from supervisor_dcdeploy.p2p.errors import DiskFull, DownloadError
from supervisor_dcdeploy.p2p.swarm import (TorrentState, choose_transport, decode_metainfo,
                                           error_for, kick_reasons, retained, status_name)
from supervisor_dcdeploy.p2p.torrent import (artifact_sha256, infohash, make_torrent,
                                             piece_count, piece_size_for, torrent_name,
                                             torrent_size, web_seeds)
from supervisor_dcdeploy.p2p.tracker import (AnnounceError, PeerInfo, announce_response,
                                             compact_peers, order_peers, parse_announce,
                                             seeders_first)
from supervisor_dcdeploy.p2p.warm import drop_cache, residency, unlock, warm
from supervisor_dcdeploy.agent.distribution import fetch_transport
from supervisor_dcdeploy.model import InvalidData, StagedRelease

MiB = 1 << 20

# -- bencode --------------------------------------------------------------------------------

bvalues = st.recursive(
    # Integers within the decoder's bound (bencode.MAX_INT_DIGITS; longer ones are refused,
    # see tests/test_bounded_parse.py).
    st.integers(min_value=-10**bencode.MAX_INT_DIGITS + 1,
                max_value=10**bencode.MAX_INT_DIGITS - 1)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.binary(max_size=8), children, max_size=5),
    max_leaves=20)


@given(bvalues)
@settings(max_examples=200, deadline=None)
def test_bencode_round_trips(value):
    assert bencode.decode(bencode.encode(value)) == value


@pytest.mark.parametrize("value, encoded", [
    (0, b"i0e"), (-3, b"i-3e"), (b"spam", b"4:spam"), ([1, b"a"], b"li1e1:ae"),
    ({"b": 1, "a": b"x"}, b"d1:a1:x1:bi1ee"),  # keys sorted
])
def test_bencode_known_values(value, encoded):
    assert bencode.encode(value) == encoded


@pytest.mark.parametrize("bad", [b"i01e", b"i-0e", b"ie", b"5:abc", b"li1e", b"d1:ai1e",
                                 b"i1ei2e", b"x", b""])
def test_bencode_rejects_malformed(bad):
    with pytest.raises(bencode.BencodeError):
        bencode.decode(bad)


def test_bencode_refuses_types_it_cannot_represent():
    for value in (1.5, None, True):
        with pytest.raises(TypeError):
            bencode.encode(value)


# -- announce parsing and answers -------------------------------------------------------------

IH = bytes(range(20))


def query(**params) -> str:
    base = {"info_hash": IH, "peer_id": b"-TR3000-abcdefghijkl", "port": "51413",
            "uploaded": "0", "downloaded": "0", "left": "100", "compact": "1"}
    base.update(params)
    return "&".join(f"{k}={quote_from_bytes(v if isinstance(v, bytes) else str(v).encode())}"
                    for k, v in base.items())


def test_parse_announce_decodes_binary_infohash():
    ann = parse_announce(query(event="started", numwant="30"))
    assert ann.infohash == IH.hex()
    assert (ann.port, ann.left, ann.event, ann.numwant, ann.compact) == (51413, 100, "started",
                                                                        30, True)


def test_parse_announce_clamps_numwant_and_defaults_it():
    assert parse_announce(query(numwant="100000")).numwant == 200
    q = "&".join(p for p in query().split("&") if not p.startswith("numwant"))
    assert parse_announce(q).numwant == 50


@pytest.mark.parametrize("params, needle", [
    ({"info_hash": b"short"}, "20 bytes"), ({"port": "0"}, "port"), ({"port": "x"}, "port"),
    ({"event": "bogus"}, "event"), ({"left": "many"}, "left"),
])
def test_parse_announce_names_the_bad_parameter(params, needle):
    with pytest.raises(AnnounceError, match=needle):
        parse_announce(query(**params))


def peer(host, rack, n, complete=False):
    return PeerInfo(host, f"10.0.0.{n}", 6881 + n, rack, complete)


def test_order_peers_same_rack_first_then_others_without_self():
    peers = [peer("a1", "A", 1), peer("b1", "B", 2), peer("a2", "A", 3), peer("b2", "B", 4),
             peer("me", "A", 5), peer("build", "build", 6, complete=True)]
    out = order_peers("me", "A", peers, 50)
    hosts = [p.host for p in out]
    assert "me" not in hosts
    assert set(hosts[:2]) == {"a1", "a2"}
    assert set(hosts[2:]) == {"b1", "b2", "build"}


def test_order_peers_caps_at_numwant_and_keeps_a_seeder():
    peers = [peer(f"a{i}", "A", i) for i in range(1, 6)] + [peer("build", "X", 9, True)]
    out = order_peers("a1", "A", peers, 3)
    assert len(out) == 3
    assert [p.rack for p in out[:2]] == ["A", "A"]
    assert out[-1].host == "build"  # no same-rack peer is complete: a seeder takes the last slot


def test_seeders_first_only_for_an_empty_host_inside_its_window():
    peers = [peer("a1", "A", 1), peer("b1", "B", 2), peer("build", "build", 3, complete=True)]
    empty = parse_announce(query(left="100", downloaded="0"))
    has_some = parse_announce(query(left="100", downloaded="16384"))
    done = parse_announce(query(left="0", downloaded="0"))
    assert [p.host for p in seeders_first(empty, peers, waited=1, window=6)] == ["build"]
    assert seeders_first(empty, peers, waited=6, window=6) == peers  # seeders did not serve it
    assert seeders_first(has_some, peers, waited=1, window=6) == peers
    assert seeders_first(done, peers, waited=1, window=6) == peers
    no_seeder = peers[:2]
    assert seeders_first(empty, no_seeder, waited=1, window=6) == no_seeder


def test_order_peers_is_stable_per_asker_and_differs_between_askers():
    peers = [peer(f"h{i}", "A", i) for i in range(20)]
    first = [p.host for p in order_peers("x", "A", peers, 5)]
    assert first == [p.host for p in order_peers("x", "A", list(reversed(peers)), 5)]
    others = {tuple(p.host for p in order_peers(f"y{i}", "A", peers, 5)) for i in range(5)}
    assert len(others) > 1  # askers do not all get the same first peers


@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from("ABC"), st.booleans()),
                max_size=30, unique_by=lambda t: t[0]),
       st.sampled_from("ABC"), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_order_peers_properties(spec, rack, numwant):
    peers = [PeerInfo(f"h{n}", f"10.0.1.{n}", 7000 + n, r, c) for n, r, c in spec]
    out = order_peers("h0", rack, peers, numwant)
    others = [p for p in peers if p.host != "h0"]
    assert len(out) == min(numwant, len(others))
    assert len({p.host for p in out}) == len(out) and all(p.host != "h0" for p in out)
    same = [p.rack == rack for p in out]
    # same-rack peers come first, except the seeder rescue in the last slot
    body = same[:-1] if out and out[-1].complete else same
    assert body == sorted(body, reverse=True)
    if out and any(p.complete for p in others):
        assert any(p.complete for p in out)


def test_compact_peers_and_response_are_bencoded_bep23():
    peers = [PeerInfo("a", "10.1.2.3", 6881, "A", True), PeerInfo("b", "fd00::1", 80, "A")]
    v4, v6 = compact_peers(peers)
    assert v4 == bytes([10, 1, 2, 3, 0x1a, 0xe1])
    assert len(v6) == 18 and v6[-2:] == (80).to_bytes(2, "big")
    body = bencode.decode(announce_response(peers, interval=5))
    assert body[b"interval"] == 5 and body[b"min interval"] == 5
    assert body[b"peers"] == v4 and body[b"peers6"] == v6
    assert (body[b"complete"], body[b"incomplete"]) == (1, 1)


def test_peer_info_rejects_garbage_from_the_store():
    ok = PeerInfo("h1", "10.0.0.1", 51413, "A", False)
    assert PeerInfo.parse("ab" * 20, "h1", ok.to_json()) == ok
    for raw, field in [(b"nope", "(json)"), (b'{"address":"x","port":1}', "address"),
                       (b'{"address":"10.0.0.1","port":70000}', "port"),
                       (b'{"address":"10.0.0.1"}', "port")]:
        with pytest.raises(InvalidData) as err:
            PeerInfo.parse("ab" * 20, "h1", raw)
        assert err.value.field == field


# -- piece size, torrents, hashes --------------------------------------------------------------

@pytest.mark.parametrize("size, piece", [
    (0, 64 * 1024), (1 * MiB, 64 * 1024), (64 * MiB, 64 * 1024), (64 * MiB + 1, 128 * 1024),
    (256 * MiB, 256 * 1024), (4096 * MiB, 4 * MiB), (1 << 50, 16 * MiB),
])
def test_piece_size_for(size, piece):
    assert piece_size_for(size) == piece


@given(st.integers(0, 1 << 45))
def test_piece_size_is_a_bounded_power_of_two_giving_few_pieces(size):
    piece = piece_size_for(size)
    assert piece & (piece - 1) == 0 and 64 * 1024 <= piece <= 16 * MiB
    assert -(-size // piece) <= 1024 or piece == 16 * MiB


def test_make_torrent_private_webseed_infohash_matches_torf(tmp_path):
    import torf
    art = tmp_path / "rel-1.tar.gz"
    art.write_bytes(os.urandom(3 * MiB + 7))
    calls = []
    meta, ih = make_torrent(art, webseeds=["http://origin/rel-1.tar.gz"],
                            progress=lambda d, t: calls.append((d, t)))
    t = torf.Torrent.read_stream(io.BytesIO(meta))
    assert t.infohash == ih == infohash(meta)
    assert t.private and t.webseeds == ["http://origin/rel-1.tar.gz"]
    assert t.trackers == [["http://127.0.0.1:6969/announce"]]
    assert t.piece_size == piece_size_for(art.stat().st_size)
    assert calls[-1][0] == calls[-1][1] == t.pieces == piece_count(meta)
    assert torrent_name(meta) == art.name and torrent_size(meta) == art.stat().st_size
    assert make_torrent(art)[1] == make_torrent(art)[1]  # deterministic: no creation date
    assert web_seeds(meta) == ["http://origin/rel-1.tar.gz"]
    assert web_seeds(make_torrent(art)[0]) == []


def test_artifact_sha256_file_and_directory_manifest(tmp_path):
    f = tmp_path / "one.bin"
    f.write_bytes(b"hello")
    assert artifact_sha256(f) == hashlib.sha256(b"hello").hexdigest()
    d = tmp_path / "rel"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"B")
    (d / "sub" / "a.txt").write_bytes(b"A")
    manifest = (f"{hashlib.sha256(b'B').hexdigest()}  b.txt\n"
                f"{hashlib.sha256(b'A').hexdigest()}  sub/a.txt\n")
    assert artifact_sha256(d) == hashlib.sha256(manifest.encode()).hexdigest()
    (d / "sub" / "a.txt").write_bytes(b"a")
    assert artifact_sha256(d) != hashlib.sha256(manifest.encode()).hexdigest()


def test_decode_metainfo_rejects_garbage(tmp_path):
    with pytest.raises(DownloadError):
        decode_metainfo("!!not base64!!")
    with pytest.raises(DownloadError):
        decode_metainfo(base64.b64encode(b"d3:fooi1ee").decode())


# -- daemon settings, errors, retention -------------------------------------------------------

def test_settings_close_the_swarm_and_never_queue(tmp_path):
    path = write_settings(tmp_path / "cfg", download_dir=tmp_path / "dl", rpc_bind="127.0.0.1",
                          rpc_port=9091, peer_port=51413, bind_address="10.0.0.5",
                          cache_size_mb=8)
    data = json.loads(path.read_text())
    for key in ("dht-enabled", "pex-enabled", "lpd-enabled", "port-forwarding-enabled",
                "download-queue-enabled", "seed-queue-enabled", "ratio-limit-enabled",
                "speed-limit-down-enabled", "speed-limit-up-enabled", "utp-enabled"):
        assert data[key] is False, key
    assert data["cache-size-mb"] == 8 and data["bind-address-ipv4"] == "10.0.0.5"
    assert data["download-dir"] == str(tmp_path / "dl") and (tmp_path / "dl").is_dir()
    assert daemon_command(tmp_path / "cfg")[:4] == ["transmission-daemon", "-f", "-g",
                                                    str(tmp_path / "cfg")]
    assert daemon_settings(download_dir=Path("/x"), rpc_bind="127.0.0.1", rpc_port=1,
                           peer_port=2, bind_address="b", rpc_password="p",
                           peer_limit_global=7)["peer-limit-global"] == 7


def state(error=0, text=""):
    return TorrentState("ab" * 20, "rel", "downloading", 0, 10, error, text, "/dl", 0, 0, 0, 0, 0)


def test_error_for_maps_daemon_errors(tmp_path):
    assert error_for(state(), tmp_path) is None
    assert error_for(state(2, "Tracker gave HTTP response code 0"), tmp_path) is None
    full = error_for(state(3, "No space left on device (/dl/rel)"), tmp_path)
    assert isinstance(full, DiskFull) and "untouched" in str(full)
    other = error_for(state(3, "Permission denied"), tmp_path)
    assert isinstance(other, DownloadError) and not isinstance(other, DiskFull)
    assert status_name(6) == "seeding" and status_name("checking") == "checking"


def test_retained_keeps_last_n_and_protected():
    order = ["r1", "r2", "r3", "r4"]
    assert retained(order, 2) == {"r3", "r4"}
    assert retained(order, 2, protected={"r1"}) == {"r1", "r3", "r4"}
    assert retained(order, 0) == set()


# -- page cache -------------------------------------------------------------------------------

def test_warm_reads_into_page_cache_and_mincore_sees_it(tmp_path):
    f = tmp_path / "rel.bin"
    f.write_bytes(os.urandom(8 * MiB + 123))
    drop_cache(f)
    resident, total = residency(f)
    assert total == 8 * MiB + 123
    if resident == total and os.statvfs(f).f_blocks and \
            subprocess.run(["stat", "-f", "-c", "%T", str(f)], capture_output=True,
                           text=True).stdout.strip() == "tmpfs":
        pytest.skip("tmp_path is on tmpfs: its pages cannot be evicted")
    assert resident < total / 2  # evicted
    result = warm(f)
    assert result.bytes_total == total and result.bytes_resident == total
    assert result.bytes_locked == 0 and result.mlock_error is None
    assert residency(f) == (total, total)


def test_warm_locks_up_to_the_cap(tmp_path):
    d = tmp_path / "rel"
    d.mkdir()
    for i in range(3):
        (d / f"f{i}").write_bytes(os.urandom(2 * MiB))
    try:
        result = warm(d, mlock_cap=3 * MiB)
        if result.mlock_error:
            pytest.skip(f"mlock not allowed here: {result.mlock_error}")
        assert result.bytes_locked == 3 * MiB and result.bytes_resident == 6 * MiB
    finally:
        assert unlock(d) >= 1


def test_warm_reports_rlimit_memlock_refusal(tmp_path):
    f = tmp_path / "rel.bin"
    f.write_bytes(os.urandom(4 * MiB))
    code = textwrap.dedent(f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
        from supervisor_dcdeploy.p2p.warm import warm
        r = warm(__import__("pathlib").Path({str(f)!r}), mlock_cap=4 << 20)
        print(json.dumps([r.bytes_locked, r.bytes_resident, r.mlock_error]))
    """)
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # CAP_IPC_LOCK ignores the limit: drop it for the child
        cmd = ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    locked, resident, error = json.loads(out.stdout.strip().splitlines()[-1])
    assert locked == 0 and resident == 4 * MiB
    assert error and "RLIMIT_MEMLOCK" in error


@pytest.mark.parametrize("size_mib, hosts, want", [
    (256, 8, "swarm"),  # HTTP 172 s vs swarm ~21.5 s + overhead
    (16, 2, "http"),  # 2.7 s of HTTP vs ~25 s of swarm overhead (measured: 2.8 s vs 19.5 s)
    (16, 100, "swarm"),
    (1024, 2, "swarm"),
])
def test_choose_transport(size_mib, hosts, want):
    assert choose_transport(size_mib * MiB, hosts, 100e6) == want
    assert choose_transport(size_mib * MiB, hosts, 100e6, has_urls=False) == "swarm"


def test_fetch_transport_picks_http_for_small_releases_only_when_it_can(tmp_path):
    art = tmp_path / "rel.bin"
    art.write_bytes(b"x" * 100_000)
    meta_b64 = base64.b64encode(make_torrent(art)[0]).decode()
    sha = "0" * 64
    both_small = StagedRelease("a", "2", sha, size=MiB, urls=("http://o/rel",), torrent=meta_b64)
    both_big = StagedRelease("a", "2", sha, size=4096 * MiB, urls=("http://o/rel",),
                             torrent=meta_b64)
    torrent_only = StagedRelease("a", "2", sha, size=MiB, torrent=meta_b64)
    urls_only = StagedRelease("a", "2", sha, size=4096 * MiB, urls=("http://o/rel",))
    assert fetch_transport(both_small, 8, 100e6, swarm_available=True) == "http"
    assert fetch_transport(both_big, 8, 100e6, swarm_available=True) == "swarm"
    assert fetch_transport(torrent_only, 8, 100e6, swarm_available=True) == "swarm"
    assert fetch_transport(urls_only, 8, 100e6, swarm_available=True) == "http"
    assert fetch_transport(both_big, 8, 100e6, swarm_available=False) == "http"


def test_kick_reasons_counts_choked_wanters_and_ignored_holders():
    waiting = {"peerIsInterested": True, "peerIsChoked": True}
    holder = {"clientIsInterested": False, "progress": 0.3}
    empty = {"clientIsInterested": False, "progress": 0.0}
    assert kick_reasons({"leftUntilDone": 10, "peers": [waiting, holder, empty]}) == 2
    assert kick_reasons({"leftUntilDone": 0, "peers": [holder]}) == 0  # seeding: not needed
    assert kick_reasons({"leftUntilDone": 10, "peers": []}) == 0
