"""The swarm's trust boundary as pure rules (issue 8): the daemon settings dcdeploy writes
(RPC on loopback, password, whitelist, no done-script), the password file, the bounded
announce parser, the per-address token bucket, and which staged data yields infohashes.
The real daemon and tracker are exercised in test_p2p_swarm.py and test_p2p_tracker.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from supervisor_dcdeploy.agent.config import ConfigError, load
from supervisor_dcdeploy.model import StagedRelease
from supervisor_dcdeploy.p2p import bencode
from supervisor_dcdeploy.p2p.daemon import (SECRET_FILE, ensure_secret, read_secret,
                                            settings, write_settings)
from supervisor_dcdeploy.p2p.torrent import infohash
from supervisor_dcdeploy.p2p.tracker import (MAX_NUMWANT, MAX_QUERY, AnnounceError, Bucket,
                                             parse_announce, staged_infohashes, take_token)


def write(tmp_path: Path, **tuning) -> dict:
    path = write_settings(tmp_path / "cfg", download_dir=tmp_path / "dl", rpc_bind="127.0.0.1",
                          rpc_port=9091, peer_port=51413, bind_address="10.0.0.5", **tuning)
    return json.loads(path.read_text())


# -- daemon settings and the password file ----------------------------------------------------

def test_settings_lock_the_rpc_down(tmp_path):
    data = write(tmp_path)
    assert data["rpc-bind-address"] == "127.0.0.1"
    assert data["rpc-authentication-required"] is True and data["rpc-username"] == "dcdeploy"
    assert data["rpc-whitelist-enabled"] is True and data["rpc-whitelist"] == "127.0.0.1,::1"
    assert data["script-torrent-done-enabled"] is False
    assert data["script-torrent-done-filename"] == ""
    secret = tmp_path / "cfg" / SECRET_FILE
    assert data["rpc-password"] == secret.read_text().strip()
    assert len(data["rpc-password"]) >= 32
    # Only root (the daemon's and the agent's user) may read the password, or the settings
    # that hold it until the daemon hashes it.
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cfg" / "settings.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cfg").stat().st_mode & 0o777 == 0o700


def test_password_is_made_once_and_kept(tmp_path):
    first = write(tmp_path)["rpc-password"]
    assert write(tmp_path)["rpc-password"] == first  # rewriting settings keeps it
    other = tmp_path / "other"
    other.mkdir()
    assert ensure_secret(other) != first  # random per host


@pytest.mark.parametrize("bind", ["0.0.0.0", "10.0.0.5", "::", "localhost", ""])
def test_rpc_bind_must_be_loopback(tmp_path, bind):
    with pytest.raises(ValueError, match="loopback|not an IP address"):
        settings(download_dir=tmp_path, rpc_bind=bind, rpc_port=9091, peer_port=1,
                 bind_address="10.0.0.5", rpc_password="p")


@pytest.mark.parametrize("key", ["rpc_authentication_required", "rpc_whitelist_enabled",
                                 "rpc_whitelist", "script_torrent_done_enabled",
                                 "script_torrent_done_filename", "rpc_bind_address",
                                 "rpc_host_whitelist_enabled", "rpc_username",
                                 "script_torrent_added_enabled"])
def test_tuning_cannot_open_the_rpc(tmp_path, key):
    with pytest.raises(ValueError, match="fixed by dcdeploy"):
        settings(download_dir=tmp_path, rpc_bind="127.0.0.1", rpc_port=9091, peer_port=1,
                 bind_address="10.0.0.5", rpc_password="p", **{key: "x"})


def test_read_secret_refuses_a_readable_or_empty_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("hunter2\n")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="mode 0600"):
        read_secret(path)
    os.chmod(path, 0o600)
    assert read_secret(path) == "hunter2"
    path.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_secret(path)
    with pytest.raises(OSError):
        read_secret(tmp_path / "missing")
    os.symlink(path, tmp_path / "link")
    with pytest.raises(OSError):  # O_NOFOLLOW: a planted symlink is not followed
        read_secret(tmp_path / "link")


@pytest.mark.parametrize("url, ok", [("http://127.0.0.1:9091/transmission/rpc", True),
                                     ("http://[::1]:9091/transmission/rpc", True),
                                     ("http://10.0.0.5:9091/transmission/rpc", False),
                                     ("http://0.0.0.0:9091/transmission/rpc", False),
                                     ("http://rpc.example:9091/transmission/rpc", False)])
def test_agent_refuses_a_non_loopback_transmission_rpc(tmp_path, url, ok):
    cfg = tmp_path / "agent.conf"
    cfg.write_text(f"[agent]\nstore = zk://z:2181/dc\nroot = /x\ninsecure_unsigned = true\n"
                   f"transmission_rpc = {url}\n"
                   "[service:api]\nport = 80\n")
    if ok:
        assert load(cfg).extra["transmission_rpc"] == url
    else:
        with pytest.raises(ConfigError, match="transmission_rpc host"):
            load(cfg)


# -- announce parsing with bounds --------------------------------------------------------------

IH = bytes(range(20))
PEER_ID = b"-TR3000-abcdefghijkl"


def query(**params: object) -> str:
    base: dict[str, object] = {"info_hash": IH, "peer_id": PEER_ID, "port": 51413,
                               "uploaded": 0, "downloaded": 0, "left": 10, "compact": 1}
    base.update(params)
    return "&".join(f"{k}={quote_from_bytes(v) if isinstance(v, bytes) else v}"
                    for k, v in base.items() if v is not None)


def test_a_real_announce_parses():
    ann = parse_announce(query(event="started", numwant=80))
    assert ann.infohash == IH.hex() and ann.peer_id == PEER_ID and ann.port == 51413
    assert ann.left == 10 and ann.event == "started" and ann.numwant == 80 and ann.compact


@pytest.mark.parametrize("params, why", [
    ({"info_hash": IH[:19]}, "info_hash must be 20 bytes"),
    ({"info_hash": IH + b"x"}, "info_hash must be 20 bytes"),
    ({"info_hash": None}, "missing parameter 'info_hash'"),
    ({"peer_id": None}, "missing parameter 'peer_id'"),
    ({"peer_id": b"short"}, "peer_id must be 20 bytes"),
    ({"peer_id": PEER_ID + b"x"}, "peer_id must be 20 bytes"),
    ({"port": 0}, "port 0 is out of range"),
    ({"port": 65536}, "port 65536 is out of range"),
    ({"port": "-1"}, "out of range"),
    ({"port": "+80"}, "is not a number"),
    ({"numwant": "--5"}, "is not a number"),
    ({"port": "80\n"}, "is not a number"),
    ({"port": "8_0"}, "is not a number"),
    ({"port": "٣"}, "is not a number"),  # a digit int() would take
    ({"left": -1}, "left -1 is out of range"),
    ({"left": "9" * 30}, "is not a number"),  # longer than any 64-bit counter
    ({"downloaded": 2**63}, "out of range"),
    ({"event": "exploded"}, "unknown event"),
])
def test_bad_announces_are_refused_naming_the_parameter(params, why):
    with pytest.raises(AnnounceError, match=why):
        parse_announce(query(**params))


def test_numwant_is_capped_and_never_negative():
    assert parse_announce(query(numwant=10**9)).numwant == MAX_NUMWANT
    assert parse_announce(query(numwant=-5)).numwant == 0


def test_an_oversized_or_many_field_query_is_refused():
    with pytest.raises(AnnounceError, match="longer than"):
        parse_announce(query(key="k" * MAX_QUERY))
    with pytest.raises(AnnounceError, match="bad query"):
        parse_announce(query() + "&x=1" * 100)


@given(st.binary(max_size=600))
@hsettings(max_examples=300, deadline=None)
def test_any_query_parses_or_is_refused_cleanly(raw):
    try:
        ann = parse_announce(raw.decode("latin-1"))
    except AnnounceError:
        return
    assert len(bytes.fromhex(ann.infohash)) == 20 and len(ann.peer_id) == 20
    assert 0 < ann.port < 65536 and 0 <= ann.numwant <= MAX_NUMWANT


# -- rate limit --------------------------------------------------------------------------------

def test_token_bucket_table():
    ok, b = take_token(None, now=100.0, rate=1.0, burst=2.0)  # new client: full bucket
    assert ok and b == Bucket(1.0, 100.0)
    ok, b = take_token(b, 100.0, 1.0, 2.0)
    assert ok and b.tokens == 0.0
    ok, b = take_token(b, 100.5, 1.0, 2.0)  # half a token back: refused, none taken
    assert not ok and b == Bucket(0.5, 100.5)
    ok, b = take_token(b, 101.0, 1.0, 2.0)  # a whole token now
    assert ok and b.tokens == 0.0
    ok, b = take_token(b, 1000.0, 1.0, 2.0)  # a long pause refills up to the burst only
    assert ok and b.tokens == 1.0
    ok, b = take_token(Bucket(0.0, 50.0), 40.0, 1.0, 2.0)  # clock went back: no refill
    assert not ok and b.tokens == 0.0


@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=1,
                max_size=200),
       st.floats(min_value=0.1, max_value=20), st.integers(min_value=1, max_value=20))
@hsettings(max_examples=200, deadline=None)
def test_token_bucket_never_allows_more_than_burst_plus_rate_times_elapsed(gaps, rate, burst):
    now, bucket, allowed = 0.0, None, 0
    for gap in gaps:
        now += gap
        ok, bucket = take_token(bucket, now, rate, burst)
        allowed += ok
    assert allowed <= burst + rate * (now - gaps[0]) + 1e-6


# -- which staged data names an infohash --------------------------------------------------------

def metainfo(name: bytes) -> bytes:
    return bencode.encode({b"announce": b"http://127.0.0.1:6969/announce",
                           b"info": {b"length": 1, b"name": name, b"piece length": 16384,
                                     b"pieces": hashlib.sha1(name[:1]).digest()}})


def staged(svc: str, torrent: str | None, urls: tuple[str, ...] = ()) -> bytes:
    return StagedRelease(svc, "1", "0" * 64, 1, urls, torrent).to_json()


def test_staged_infohashes_from_staging_values():
    good = metainfo(b"a")
    found, problems = staged_infohashes({
        "a": staged("a", base64.b64encode(good).decode()),
        "b": staged("b", None, ("https://origin/b.tgz",)),  # URLs only: no swarm
        "c": b"{not json",
        "d": staged("d", "!!not base64!!"),
        "e": staged("e", base64.b64encode(b"l" * 100_000).decode()),  # nested 100,000 deep
        "f": None,  # a service whose staging node is empty
        "g": b"[" * 100_000,  # JSON nested 100,000 deep
    })
    assert found == {infohash(good)}
    assert len(problems) == 4
    assert any(p.startswith("staging/c") for p in problems)
    assert any(p.startswith("staging/d: torrent") for p in problems)
    assert any(p.startswith("staging/e: torrent") for p in problems)
