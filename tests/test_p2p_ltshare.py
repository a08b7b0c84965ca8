"""The libtorrent daemon's piece shares (``--share-pieces``, on by default): which share
each downloading host takes, the priorities that make libtorrent ask for it first, and the
settings and command line that switch it on. Pure; the daemon applying it on loopback is in
test_p2p_ltengine.py."""

from __future__ import annotations

import json

import pytest

from supervisor_dcdeploy.p2p.ltdaemon import (LT_SETTINGS, PRIO_DEFAULT, PRIO_SHARE, parser,
                                              settings, share_of, share_priorities)
from supervisor_dcdeploy.p2p.ltengine import daemon_command


def test_hosts_that_see_the_same_downloaders_take_disjoint_shares_covering_every_piece():
    hosts = ["10.215.1.12", "10.215.1.3", "10.215.2.7", "10.215.1.20"]
    shares = [share_of(h, [o for o in hosts if o != h]) for h in hosts]
    # ranked by address, not by string: .3 < .12 < .20 < 2.7
    assert shares == [(1, 4), (0, 4), (3, 4), (2, 4)]
    prios = [share_priorities(r, n, 1023) for r, n in shares]
    for piece in range(1023):
        assert sorted(p[piece] for p in prios) == [PRIO_DEFAULT] * 3 + [PRIO_SHARE]


def test_a_host_alone_has_no_share_and_itself_or_bad_addresses_do_not_count():
    assert share_of("10.0.0.1", []) is None
    assert share_of("10.0.0.1", ["10.0.0.1", "not an address"]) is None
    assert share_of("10.0.0.2", ["10.0.0.1", "10.0.0.1"]) == (1, 2)
    assert share_of("fd00::2", ["10.0.0.9"]) == (1, 2)  # IPv4 ranks before IPv6


def test_share_priorities_never_exclude_a_piece():
    prios = share_priorities(2, 3, 10)
    assert prios == [4, 4, 7, 4, 4, 7, 4, 4, 7, 4]
    assert 0 not in share_priorities(0, 1, 5)
    with pytest.raises(ValueError, match="rank 3"):
        share_priorities(3, 3, 10)


def test_sharing_turns_off_whole_piece_runs_which_ignore_priorities():
    assert "whole_pieces_threshold" not in LT_SETTINGS  # libtorrent's default (20 s) otherwise
    assert settings("10.0.0.5", 1, {}, share_pieces=True)["whole_pieces_threshold"] == 0
    assert "whole_pieces_threshold" not in settings("10.0.0.5", 1, {})
    # an explicit tuning still wins (to measure the two separately)
    assert settings("10.0.0.5", 1, {"whole_pieces_threshold": 20},
                    share_pieces=True)["whole_pieces_threshold"] == 20


def test_share_pieces_is_a_switch_of_the_daemon_on_by_default(tmp_path):
    cmd = daemon_command(tmp_path, [tmp_path], "10.0.0.5", 51413,
                         {"share_pieces": False, "request_timeout": 5})
    assert "--no-share-pieces" in cmd
    assert json.loads(cmd[cmd.index("--tuning") + 1]) == {"request_timeout": 5}
    default = daemon_command(tmp_path, [tmp_path], "10.0.0.5", 51413)
    assert "--no-share-pieces" not in default and "--tuning" not in default
    args = parser().parse_args(["--state-dir", "/x", "--address", "10.0.0.5"])
    assert args.share_pieces is True
    args = parser().parse_args(["--state-dir", "/x", "--address", "10.0.0.5",
                                "--no-share-pieces"])
    assert args.share_pieces is False
