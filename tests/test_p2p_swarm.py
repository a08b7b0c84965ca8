"""Swarm tests: real BitTorrent daemons in network namespaces, a real ZooKeeper, one
store-backed tracker per host. A build host (rack "build") and four hosts in two racks.

Every test runs against both engines (the module's lab is parametrized: one lab of
transmission-daemons, then one of libtorrent ltdaemons); the control-channel test checks
each engine's own protection.

Needs root (namespaces, tc, a tmpfs); skips with the reason otherwise, and fails with it
under CI=true (tests/needs.py). Every namespace is prefixed "dcdp" (10.214.0.0/16) and torn down after
the module, failures included.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from needs import unavailable

from supervisor_dcdeploy.waiting import wait_for
from supervisor_dcdeploy.lab import netns
from supervisor_dcdeploy.p2p.errors import DiskFull, DownloadError
from supervisor_dcdeploy.lab.swarmlab import LabHost, SwarmLab
from supervisor_dcdeploy.p2p.seed import Staged, add_seed, stage
from supervisor_dcdeploy.p2p.torrent import artifact_sha256

MiB = 1 << 20
HOSTS = {"h1": "r1", "h2": "r1", "h3": "r2", "h4": "r2"}
FETCH_TIMEOUT = 120


def _why_not() -> str:
    ok, why = netns.available()
    if not ok:
        return why
    if not shutil.which("transmission-daemon"):
        return "transmission-daemon is not installed (apt-get install transmission-daemon)"
    try:
        import libtorrent  # noqa: F401
    except ImportError:
        return "libtorrent is not installed (pip install libtorrent; scripts/setup.sh does)"
    if not Path("/usr/share/zookeeper").is_dir():
        return "zookeeper is not installed (apt-get install zookeeper)"
    return ""


REASON = _why_not()
if REASON:
    print(f"\ntests/test_p2p_swarm.py skipped: {REASON}", file=sys.stderr)


@pytest.fixture(scope="module", autouse=True)
def _needs_namespaces():
    """Before the module's other fixtures (autouse comes first in its scope): they mount
    and build namespaces."""
    if REASON:
        unavailable(REASON)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 24 MiB tmpfs, mounted before the daemons start so their namespaces see it."""
    path = tmp_path_factory.mktemp("small")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module", params=["transmission", "libtorrent"])
def lab(request, tmp_path_factory, small_disk):
    work = tmp_path_factory.mktemp(f"swarm-{request.param}")
    # The small disk is a download directory of its own (test_disk_full...): the libtorrent
    # daemon saves only under its data roots.
    lab = SwarmLab(work, prefix="dcdp", subnet="10.214.0.0/16", engine=request.param,
                   data_roots=(str(small_disk),))
    try:
        lab.up()
        lab.add_host("build", "build")
        for name, rack in HOSTS.items():
            lab.add_host(name, rack)
        for name in ["build", *HOSTS]:
            lab.start_node(name)
        yield lab
    finally:
        lab.down()


def make_artifact(lab: SwarmLab, name: str, size: int) -> Path:
    d = lab.workdir / "artifacts"
    d.mkdir(exist_ok=True)
    path = d / name
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
    return path


def stage_and_seed(lab: SwarmLab, name: str, size: int = 4 * MiB) -> Staged:
    staged = stage(make_artifact(lab, name, size))
    lab.publish(staged)  # the trackers answer staged infohashes only
    build = lab.hosts["build"]
    add_seed(build.dir, build.rpc_url, staged, wait=60, runner=build.runner)
    return staged


def fetch_all(hosts: list[LabHost], staged: Staged) -> dict[str, Path | BaseException]:
    results: dict[str, Path | BaseException] = {}

    def one(host: LabHost) -> None:
        try:
            results[host.name] = host.fetcher().fetch(staged.metainfo_b64, staged.sha256,
                                                      timeout=FETCH_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            results[host.name] = exc

    threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_verified(results: dict, staged: Staged) -> None:
    for name, got in results.items():
        assert isinstance(got, Path), f"{name}: {got!r}"
        assert artifact_sha256(got) == staged.sha256, name
        assert got.read_bytes() == staged.path.read_bytes(), name


@pytest.fixture(scope="module")
def everywhere(lab):
    """A release staged on the build host and fetched by all four hosts at once."""
    staged = stage_and_seed(lab, "rel-1.bin", 8 * MiB)
    return staged, fetch_all([lab.hosts[h] for h in HOSTS], staged)


def test_everyone_completes_verifies_and_prefers_its_rack(lab, everywhere):
    staged, results = everywhere
    assert_verified(results, staged)

    # The store holds every host of the swarm, with its routable address, complete.
    base = f"peers/{staged.infohash}"
    def all_complete():
        names = set(lab.store.children(base))
        if names != {"build", *HOSTS}:
            return False
        return all(json.loads(lab.store.get(f"{base}/{n}")[0])["complete"] for n in names)
    wait_for(all_complete, 30, "every host registered complete")
    raw = json.loads(lab.store.get(f"{base}/h3")[0])
    assert raw["address"] == lab.hosts["h3"].address and raw["rack"] == "r2"

    # Rack preference in what the trackers answered the real daemons: same rack first.
    # (Awaited: a daemon's last announce may predate the others' registration; they
    # announce every 5 s while the deploy is active.)
    def answered_everyone() -> bool:
        return all(set(lab.hosts[n].tracker_status()["answers"][staged.infohash])
                   == {"build", *HOSTS} - {n} for n in HOSTS)
    wait_for(answered_everyone, 30, "every tracker to answer its daemon every other host")
    for name, rack in HOSTS.items():
        answered = lab.hosts[name].tracker_status()["answers"][staged.infohash]
        racks = [HOSTS.get(h, "build") for h in answered]
        assert racks and racks[0] == rack, (name, answered)
        assert racks == sorted(racks, key=lambda r: r != rack), (name, answered)
    # ... and when numwant caps the answer, only the same-rack peer is given.
    from supervisor_dcdeploy.p2p import bencode
    from urllib.parse import quote_from_bytes
    # (polled: the tracker caches its peer list for 1 s, and while h2 is not yet known to
    # be complete the one slot goes to a seeder so that a rack never starves)
    h1 = lab.hosts["h1"]

    def first_peer() -> str:
        body = bencode.decode(h1.announce(
            f"info_hash={quote_from_bytes(bytes.fromhex(staged.infohash))}"
            f"&peer_id=-XX0000-000000000000"
            f"&port=51413&left=0&numwant=1&compact=1"))
        assert len(body[b"peers"]) == 6
        return ".".join(str(b) for b in body[b"peers"][:4])
    wait_for(lambda: first_peer() == lab.hosts["h2"].address, 10,
             "h1's tracker to answer its rack peer h2 for numwant=1")


def test_corrupted_copy_is_repaired_from_peers(lab, everywhere):
    staged, results = everywhere
    assert_verified(results, staged)
    h3 = lab.hosts["h3"]
    copy = h3.releases / staged.path.name
    with open(copy, "r+b") as fh:  # flip bytes in two distant pieces
        for offset in (1 * MiB + 100, 6 * MiB + 5):
            fh.seek(offset)
            old = fh.read(64)
            fh.seek(offset)
            fh.write(bytes(b ^ 0xFF for b in old))
    assert artifact_sha256(copy) != staged.sha256  # really corrupted
    got = h3.fetcher().fetch(staged.metainfo_b64, staged.sha256, timeout=FETCH_TIMEOUT)
    assert got == copy and copy.read_bytes() == staged.path.read_bytes()


def test_peer_serving_bad_data_is_detected_and_data_comes_from_others(lab):
    staged = stage_and_seed(lab, "rel-3.bin", 4 * MiB)
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    assert_verified(fetch_all([h1], staged), staged)
    # h2 must be told about h1 at once: an empty host first meets only complete peers
    # (tracker: seeders_first), so wait until h1 is registered complete.
    wait_for(lambda: json.loads(lab.store.get(f"peers/{staged.infohash}/h1")[0])["complete"],
             30, "h1 registered as a complete peer")
    # h1 now serves garbage for most of the file (its daemon does not know) and is fast;
    # the build host is the only good source and is slow.
    # Silent corruption: the file's mtime is set an hour back. Transmission re-checks a piece
    # before serving it when the file's mtime is later than the second the piece was
    # checked, and on a mismatch stops the torrent instead of serving garbage; with an
    # older mtime h1 serves what is on disk, as a peer with a bad disk or a bug would.
    copy = h1.releases / staged.path.name
    with open(copy, "r+b") as fh:
        fh.seek(512 * 1024)
        fh.write(os.urandom(3 * MiB))
    an_hour_ago = time.time() - 3600
    os.utime(copy, (an_hour_ago, an_hour_ago))
    # The build host starts nearly silent (4 MiB would take ~3 minutes), so h2 can only make
    # progress through h1. At 20 Mbit/s the build host alone delivered the whole file in under
    # 2 s, sometimes before h2 had even connected to h1, and the test then saw no bad data at
    # all. Once the bad data has been caught, the build host is opened up so h2 can finish.
    lab.net.shape("build", 200_000)
    results: dict = {}
    fetching = threading.Thread(target=lambda: results.update(fetch_all([h2], staged)))
    fetching.start()
    try:
        def caught() -> bool:
            state = h2.fetcher().state(staged.infohash)
            served = h1.fetcher().state(staged.infohash)
            # Caught on one side or the other: h2 received bad pieces and dropped them
            # (corruptEver), or h1's daemon re-checked a piece before sending it, found it bad
            # and stopped offering it (no longer complete).
            return (state is not None and state.corrupt > 0) or (
                served is not None and served.done_bytes < served.total_bytes)
        wait_for(caught, 60, "h2 to drop h1's bad pieces (or h1 to find its copy bad)")
        lab.net.shape("build", 20_000_000)
        fetching.join()
        assert_verified(results, staged)  # and h2's copy is good: the rest came from others
    finally:
        lab.net.unshape("build")
        fetching.join()


def test_origin_killed_after_one_full_copy_the_rest_still_finish(lab):
    staged = stage_and_seed(lab, "rel-4.bin")
    first, rest = lab.hosts["h2"], [lab.hosts[h] for h in ("h1", "h3", "h4")]
    assert_verified(fetch_all([first], staged), staged)
    lab.kill_node("build")
    try:
        assert_verified(fetch_all(rest, staged), staged)
    finally:
        lab.start_node("build")


def test_fetch_survives_daemon_restart(lab):
    staged = stage_and_seed(lab, "rel-5.bin", 16 * MiB)
    h4 = lab.hosts["h4"]
    lab.net.shape("h4", 40_000_000)  # slow enough to be mid-download when killed
    started = threading.Event()
    result: dict = {}

    def run() -> None:
        try:
            result["path"] = h4.fetcher().fetch(
                staged.metainfo_b64, staged.sha256, timeout=FETCH_TIMEOUT,
                progress=lambda done, total: started.set() if 0 < done < total else None)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    t = threading.Thread(target=run)
    try:
        t.start()
        assert started.wait(60), "download never started"
        old_pid = h4.info["daemon_pid"]
        os.kill(old_pid, 9)
        t.join(FETCH_TIMEOUT + 30)
    finally:
        lab.net.unshape("h4")
    assert "error" not in result, result.get("error")
    assert result["path"].read_bytes() == staged.path.read_bytes()
    assert json.loads((h4.dir / "node.json").read_text())["daemon_pid"] != old_pid


# Transmission only (the lab's engine parameter narrowed, not a skip): the timers in question
# are Transmission's; libtorrent's re-announce ignores its min interval, and its restart is
# covered by test_fetch_survives_daemon_restart[libtorrent]. Kept to one engine for CI time
# (#12: the swarm suite may add ~3 min).
@pytest.mark.parametrize("lab", ["transmission"], indirect=True)
def test_fetch_recovers_when_the_restarted_daemon_cannot_reach_its_tracker_at_first(lab):
    """Issue #12 item 6: a restarted daemon whose first announces fail (here: its tracker on
    loopback refuses connections, and peers cannot dial it, for 25 s after the restart) must
    get peers as soon as the tracker answers again, not when the daemon's own retry timers
    say so. Transmission
    retries a failed announce after 20 s, then 5-6 min, and ignores torrent-reannounce for
    120 s after each answer until one succeeds; the fetch then stops and starts the torrent
    (which announces at once) instead of asking for a re-announce it would drop."""
    staged = stage_and_seed(lab, "rel-13.bin", 8 * MiB)
    h4 = lab.hosts["h4"]
    # The fault, both ways: h4's daemon cannot reach its tracker (loopback) and no peer can
    # dial h4's peer port, so only an announce by h4 itself brings it peers again.
    rules = [["OUTPUT", "-o", "lo", "-p", "tcp", "--dport", "6969", "-j", "REJECT"],
             ["INPUT", "!", "-i", "lo", "-p", "tcp", "--dport", "51413", "-j", "REJECT"]]
    lab.net.shape("h4", 20_000_000)  # mid-download when killed
    started = threading.Event()
    result: dict = {}

    def run() -> None:
        try:
            result["path"] = h4.fetcher().fetch(
                staged.metainfo_b64, staged.sha256, timeout=FETCH_TIMEOUT,
                progress=lambda done, total: started.set() if 0 < done < total else None)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    t = threading.Thread(target=run)
    blocked = False
    try:
        t.start()
        assert started.wait(60), "download never started"
        for rule in rules:
            h4.ns.run("iptables", "-w", "-I", *rule)
        blocked = True
        old_pid = json.loads((h4.dir / "node.json").read_text())["daemon_pid"]  # current one
        os.kill(old_pid, 9)
        wait_for(lambda: json.loads((h4.dir / "node.json").read_text())["daemon_pid"]
                 != old_pid, 60, "the node to restart h4's daemon")
        # The fault lasts 25 s after the restart, past the daemon's first announce and
        # Transmission's 20 s retry.
        time.sleep(25)
        for rule in rules:
            h4.ns.run("iptables", "-w", "-D", *rule)
        blocked = False
        t.join(FETCH_TIMEOUT + 30)
    finally:
        if blocked:
            for rule in rules:
                h4.ns.run("iptables", "-w", "-D", *rule, check=False)
        lab.net.unshape("h4")
        t.join()
        h4.info = json.loads((h4.dir / "node.json").read_text())
    assert "error" not in result, result.get("error")
    assert result["path"].read_bytes() == staged.path.read_bytes()


def test_forgotten_torrent_is_added_again(lab):
    staged = stage_and_seed(lab, "rel-6.bin", 4 * MiB)
    h1 = lab.hosts["h1"]
    f = h1.fetcher()
    assert_verified({"h1": f.fetch(staged.metainfo_b64, staged.sha256, timeout=60)}, staged)
    f.remove(staged.infohash, delete_data=False)  # as if the daemon lost its state
    assert f.state(staged.infohash) is None
    got = f.fetch(staged.metainfo_b64, staged.sha256, timeout=60)
    assert got.read_bytes() == staged.path.read_bytes()
    assert staged.infohash in f.seeding()
    removed = f.prune(set())  # keep nothing: drops this torrent (and the others) with data
    assert staged.infohash in removed and f.prune(set()) == []
    assert f.state(staged.infohash) is None and not got.exists()


def test_disk_full_fails_clearly_and_leaves_the_running_version(lab, small_disk):
    h2 = lab.hosts["h2"]
    running = small_disk / "current-release.bin"
    running.write_bytes(b"the version that runs")
    fetcher = h2.fetcher(small_disk)
    # Too big for the free space: refused before anything is added.
    big = stage_and_seed(lab, "rel-7.bin", 16 * MiB)
    with pytest.raises(DiskFull, match="bytes free"):
        fetcher.fetch(big.metainfo_b64, big.sha256, timeout=60)
    assert fetcher.state(big.infohash) is None
    # Fits at first, then the disk fills while downloading: the daemon's ENOSPC surfaces.
    mid = stage_and_seed(lab, "rel-8.bin", 4 * MiB)
    filler = small_disk / "filler"

    def fill(done: int, total: int) -> None:
        if not filler.exists():
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            try:
                with open(filler, "wb") as fh:
                    fh.write(b"\0" * (free - 64 * 1024))
            except OSError as exc:  # the daemon wrote meanwhile: the disk is full anyway
                if exc.errno != errno.ENOSPC:
                    raise
    # The origin slowed down (4 MiB in ~8 s): unshaped, the whole file could be written
    # before the first progress report (libtorrent counts a piece only once hashed, which
    # may trail the write), the disk then filled after the fact and the fetch succeeded
    # (libtorrent lab: failed 1 run in 16 before the flush change, 2 in 9 after it).
    lab.net.shape("build", 4_000_000)
    try:
        with pytest.raises(DiskFull, match="No space left"):
            fetcher.fetch(mid.metainfo_b64, mid.sha256, timeout=60, progress=fill)
    finally:
        lab.net.unshape("build")
        filler.unlink(missing_ok=True)
        fetcher.remove(mid.infohash, delete_data=True)
    assert running.read_bytes() == b"the version that runs"


def test_a_swarm_nobody_seeds_fails_as_stalled_not_forever(lab):
    staged = stage(make_artifact(lab, "rel-10.bin", 1 * MiB))  # staged, never seeded
    lab.publish(staged)
    f = lab.hosts["h3"].fetcher()
    try:
        with pytest.raises(DownloadError, match="stalled: no new data for 5 s at 0/"):
            f.fetch(staged.metainfo_b64, staged.sha256, timeout=FETCH_TIMEOUT,
                    stall_timeout=5)
    finally:
        f.remove(staged.infohash, delete_data=True)


# libtorrent: the final CI run of 2026-12-02 saw the engine report this web-seeded download
# complete while rel-9.bin was not in h1's releases directory yet: libtorrent counts a piece
# once its hash passed, before its write reached the file. The fetch now has the daemon flush
# first (LtEngine.settle; tests/test_p2p_ltengine.py::
# test_what_the_daemon_reports_complete_is_in_the_file_once_flushed).
def test_web_seed_alone_serves_a_host(lab):
    """BEP 19: nobody seeds this release over BitTorrent; an HTTP server on the build host
    that answers Range requests is the torrent's web seed, and a host's daemon fetches the
    whole release from it."""
    build = lab.hosts["build"]
    art = make_artifact(lab, "rel-9.bin", 4 * MiB)
    port = 8089
    server = subprocess.Popen(
        build.ns.exec_args(sys.executable, str(Path(__file__).with_name("rangeserver.py")),
                           build.address, str(port), str(art.parent)),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        staged = stage(art, webseeds=[f"http://{build.address}:{port}/{art.name}"])
        lab.publish(staged)
        before = lab.egress_bytes("build")
        got = lab.hosts["h1"].fetcher().fetch(staged.metainfo_b64, staged.sha256,
                                              timeout=FETCH_TIMEOUT)
        assert got.read_bytes() == art.read_bytes()
        # Every byte came from the web seed: the build host's daemon never had the torrent.
        assert build.fetcher().state(staged.infohash) is None
        assert lab.egress_bytes("build") - before >= staged.size
    finally:
        server.kill()
        server.wait()


# -- trust boundary (issue 8, #12): the daemon's control is local only; tracker on staged data

def test_control_channel_is_local_only(lab):
    if lab.engine == "libtorrent":
        return check_ltdaemon_control_is_local_only(lab)
    check_rpc_wants_the_password_and_is_only_on_loopback(lab)


def check_rpc_wants_the_password_and_is_only_on_loopback(lab):
    import requests

    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    settings = json.loads((h1.dir / "transmission" / "settings.json").read_text())
    assert settings["rpc-bind-address"] == "127.0.0.1"
    assert settings["script-torrent-done-enabled"] is False
    assert settings["rpc-authentication-required"] is True
    assert (h1.secret_file.stat().st_mode & 0o777) == 0o600
    password = h1.secret_file.read_text().strip()
    url = "http://127.0.0.1:9091/transmission/rpc"
    # Inside h1's namespace (where its agent would run): no password, a wrong one -> 401.
    assert h1.runner(lambda: requests.get(url, timeout=5).status_code) == 401
    assert h1.runner(lambda: requests.get(url, timeout=5,
                                          auth=("dcdeploy", "guess")).status_code) == 401
    # With the password: 409, the daemon's "here is your session id".
    assert h1.runner(lambda: requests.get(url, timeout=5,
                                          auth=("dcdeploy", password)).status_code) == 409
    # On h1's network address nothing listens on the RPC port: not from the root
    # namespace, not from a peer host, even with the password.
    remote = f"http://{h1.address}:9091/transmission/rpc"
    for where in (lambda fn: fn(), h2.runner):
        with pytest.raises(requests.ConnectionError):
            where(lambda: requests.get(remote, timeout=5, auth=("dcdeploy", password)))


def check_ltdaemon_control_is_local_only(lab):
    """libtorrent: a unix socket only the daemon's user (or root) may open, requests
    checked, downloads only under the data roots, and no TCP listener but the peer port."""
    h1 = lab.hosts["h1"]
    sock = Path(h1.info["control"])
    assert (sock.stat().st_mode & 0o777) == 0o600
    assert (sock.parent.stat().st_mode & 0o777) == 0o700
    # Another local user cannot even connect.
    probe = subprocess.run(  # Debian's python: nobody may not run the venv's under /root
        ["/usr/bin/python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
         f"s.connect({str(sock)!r})"], preexec_fn=lambda: os.setuid(65534),
        capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe
    # A download directory outside the data roots is refused, also through a symlink.
    staged = stage(make_artifact(lab, "rel-12.bin", 64 * 1024))
    engine = h1.fetcher()
    with pytest.raises(DownloadError, match="outside the data roots"):
        engine.add(staged.metainfo, download_dir=Path("/etc"))
    escape = h1.releases / "escape"
    escape.symlink_to("/etc")
    try:
        with pytest.raises(DownloadError, match="outside the data roots"):
            engine.add(staged.metainfo, download_dir=escape)
    finally:
        escape.unlink()
    assert engine.state(staged.infohash) is None
    # Requests outside the fixed set are refused, the daemon keeps serving.
    with pytest.raises(DownloadError, match="unknown op"):
        engine._call("session_set", infohash=staged.infohash)
    with pytest.raises(DownloadError, match="infohash"):
        engine._call("state", infohash="../../etc")
    assert engine.ping()["pid"] == h1.info["daemon_pid"]
    # The daemon listens on TCP only on its peer port: h1's data address for peers, and
    # loopback, from where it announces to the tracker on loopback.
    listening = subprocess.run([*h1.ns.exec_args("ss", "-Hltnp")], capture_output=True,
                               text=True, check=True).stdout
    mine = [line.split()[3] for line in listening.splitlines()
            if f"pid={h1.info['daemon_pid']}," in line]
    mine = [addr.split("%")[0] + ":" + addr.rsplit(":", 1)[1] for addr in mine]  # ss: ADDR%IF:PORT
    assert sorted(mine) == sorted([f"{h1.address}:51413", "127.0.0.1:51413"]), listening


def test_tracker_of_a_real_host_refuses_an_unstaged_infohash(lab):
    from supervisor_dcdeploy.p2p import bencode
    from urllib.parse import quote_from_bytes

    unstaged = stage(make_artifact(lab, "rel-11.bin", 64 * 1024))  # hashed, never published
    body = bencode.decode(lab.hosts["h1"].announce(
        f"info_hash={quote_from_bytes(bytes.fromhex(unstaged.infohash))}"
        f"&peer_id=-XX0000-000000000000&port=51413&left=1&compact=1&event=started"))
    assert b"not a staged release" in body[b"failure reason"]
    assert lab.store.exists(f"peers/{unstaged.infohash}") is None
    assert lab.hosts["h1"].tracker_status()["refused"]["unstaged"] >= 1
    # The real daemons of this module's swarms never ran into the rate limit.
    refused = {n: lab.hosts[n].tracker_status()["refused"] for n in ["build", *HOSTS]}
    assert all(r["rate"] == 0 and r["malformed"] == 0 for r in refused.values()), refused
