"""Issue 8, item 4: release archives and downloads cannot write outside the release, fill the
disk or read arbitrary local files (fetch.py). Every test checks the file system, not only
the exception: a broken check would visibly create files or bytes."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import struct
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostile import (MiB, Entry, aliased_chain, make, make_tar, make_zip, merge_tars,
                     tar_bomb, zip_bomb)

from supervisor_dcdeploy import fetch
from supervisor_dcdeploy.fetch import (
    DownloadError,
    Limits,
    UnsafeArchive,
    VerificationError,
    download,
    install_release,
    installed_sha256,
    prune_cache,
    unpack,
)

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` (symlinks not followed) -> its size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.lstat().st_size
    return out


@pytest.fixture
def box(tmp_path: Path) -> dict[str, Path]:
    """``outer/inner/releases`` is where releases go; everything else under tmp_path is
    "outside": the archives live in ``arc``, and a file landing in ``outer`` or ``inner``
    is an escape."""
    paths = {"arc": tmp_path / "arc", "outer": tmp_path / "outer",
             "releases": tmp_path / "outer" / "inner" / "releases"}
    paths["arc"].mkdir()
    paths["releases"].mkdir(parents=True)
    return paths


def assert_nothing_written(box: dict[str, Path], before: dict[str, int]) -> None:
    assert tree(box["outer"]) == before, "unpacking changed the file system outside"
    assert os.listdir(box["releases"]) == [], "no release or temporary directory may remain"


# ------------------------------------------------------------------------ symlinks and links

@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_aliased_symlink_chain_writes_nothing_outside(kind: str, box: dict[str, Path]) -> None:
    archive = make(kind, box["arc"] / f"chain.{kind}", aliased_chain())
    before = tree(box["outer"])

    with pytest.raises(UnsafeArchive) as ei:
        unpack(archive, box["releases"] / "1.0")

    # Refused at the first link made through another link, naming both.
    assert ei.value.member == "a16/l"
    assert "a16" in ei.value.reason and "symlink" in ei.value.reason
    assert_nothing_written(box, before)
    assert not (box["outer"] / "inner" / "evil").exists()


UNSAFE: dict[str, list[Entry]] = {
    # Symlinks whose target leaves the release, directly or via '..' after a name.
    "symlink-up": [("sym", "up", "../x")],
    "symlink-up-from-depth": [("dir", "d/e"), ("sym", "d/e/up", "../../../x")],
    "symlink-absolute": [("sym", "pw", "/etc/passwd")],
    "symlink-dotdot-after-name": [("dir", "d"), ("sym", "s", "d/../..")],
    "symlink-via-self-alias": [("sym", "a", "."), ("sym", "b", "a/..")],
    "symlink-empty-target": [("sym", "e", "")],
    # Members whose path passes through a symlink (even one pointing inside) or a file.
    "member-through-symlink": [("dir", "d"), ("sym", "l", "d"), ("file", "l/x", b"x")],
    "dir-through-symlink": [("dir", "d"), ("sym", "l", "d"), ("dir", "l/sub")],
    "member-through-file": [("file", "f", b"f"), ("file", "f/x", b"x")],
    "symlink-replaces-dir": [("dir", "x"), ("sym", "x", "."), ("file", "x/y", b"y")],
    "file-twice": [("file", "f", b"1"), ("file", "f", b"2")],
    "forged-marker": [("file", ".dcdeploy-release.json", b"{}")],
}
HARDLINKS: dict[str, list[Entry]] = {
    "hardlink-escape": [("hard", "pw", "../../../etc/passwd")],
    "hardlink-absolute": [("hard", "pw", "/etc/passwd")],
    "hardlink-through-symlink": [("dir", "d"), ("file", "d/f", b"f"), ("sym", "l", "d"),
                                 ("hard", "h", "l/f")],
    "hardlink-to-symlink": [("file", "f", b"f"), ("sym", "s", "f"), ("hard", "h", "s")],
    "hardlink-to-later-file": [("hard", "h", "f"), ("file", "f", b"f")],
}


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile, on the file-twice case
@pytest.mark.parametrize("case", sorted(UNSAFE))
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_unsafe_links_and_paths_are_refused(case: str, kind: str,
                                            box: dict[str, Path]) -> None:
    archive = make(kind, box["arc"] / "a.bin", UNSAFE[case])
    before = tree(box["outer"])
    with pytest.raises(UnsafeArchive) as ei:
        unpack(archive, box["releases"] / "1.0")
    assert ei.value.member, "the error names the member"
    assert ei.value.member in ei.value.reason
    assert_nothing_written(box, before)


@pytest.mark.parametrize("case", sorted(HARDLINKS))
def test_unsafe_hardlinks_are_refused(case: str, box: dict[str, Path]) -> None:
    archive = make_tar(box["arc"] / "a.tgz", HARDLINKS[case])
    before = tree(box["outer"])
    with pytest.raises(UnsafeArchive) as ei:
        unpack(archive, box["releases"] / "1.0")
    assert ei.value.member in ei.value.reason
    assert_nothing_written(box, before)


def test_links_that_stay_inside_are_kept(box: dict[str, Path]) -> None:
    entries: list[Entry] = [
        ("file", "lib/libx.so.1", b"elf"), ("sym", "lib/libx.so", "libx.so.1"),
        ("dir", "app/bin"), ("sym", "app/bin/lib", "../../lib"),  # leading '..' within depth
        ("sym", "top", "."), ("sym", "deep", "app/bin/lib/libx.so"),
        ("hard", "lib/libx.copy", "lib/libx.so.1"), ("file", "run", b"#!/bin/sh\n", 0o4755)]
    target = box["releases"] / "1.0"
    unpack(make_tar(box["arc"] / "ok.tgz", entries), target)
    assert (target / "deep").read_bytes() == b"elf"
    assert (target / "app" / "bin" / "lib" / "libx.so").read_bytes() == b"elf"
    lib = target / "lib"
    assert (lib / "libx.copy").stat().st_ino == (lib / "libx.so.1").stat().st_ino
    mode = stat.S_IMODE((target / "run").stat().st_mode)
    assert mode == 0o755, "setuid (and group/world write) bits are dropped"
    assert installed_sha256(target)


def test_special_files_are_refused(box: dict[str, Path]) -> None:
    path = box["arc"] / "dev.tar"
    with tarfile.open(path, "w") as tf:
        ti = tarfile.TarInfo("console")
        ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 5, 1
        tf.addfile(ti)
    with pytest.raises(UnsafeArchive, match="character device") as ei:
        unpack(path, box["releases"] / "1.0")
    assert ei.value.member == "console"
    assert os.listdir(box["releases"]) == []


# ---------------------------------------------------------------------------------- bounds

def keep_tmp(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Leave the temporary release directory in place on failure, to measure what was
    written before the refusal."""
    kept: list[Path] = []
    monkeypatch.setattr(fetch.shutil, "rmtree", lambda p, **kw: kept.append(Path(p)))
    return kept


def file_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        for dirpath, _, files in os.walk(p):
            total += sum((Path(dirpath) / f).lstat().st_size for f in files)
    return total


def test_zip_bomb_is_refused_at_the_ratio(box: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # 128 members of 1 MiB of zeros: ~1000:1, and each member's declared size is small, so
    # members are written until the total reaches the ratio budget.
    archive = zip_bomb(box["arc"] / "bomb.zip")
    size = archive.stat().st_size
    assert 128 * MiB / size > 500
    limits = Limits(ratio_floor=MiB)  # the default 200:1; a small floor for a small bomb
    kept = keep_tmp(monkeypatch)

    with pytest.raises(UnsafeArchive, match="unpack_max_ratio") as ei:
        unpack(archive, box["releases"] / "1.0", limits=limits)

    assert ei.value.member and ei.value.member != "z000.bin"  # some members went in
    assert MiB <= file_bytes(kept) <= limits.budget(size) < 128 * MiB


def test_1000_to_1_tar_gz_is_refused_before_the_disk_fills(
        box: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tar_bomb(box["arc"] / "bomb.tgz")
    size = archive.stat().st_size
    assert 128 * MiB / size > 900, "the archive really is ~1000:1"
    limits = Limits(ratio_floor=MiB)
    kept = keep_tmp(monkeypatch)

    with pytest.raises(UnsafeArchive, match="unpack_max_ratio"):
        unpack(archive, box["releases"] / "1.0", limits=limits)

    assert MiB <= file_bytes(kept) <= limits.budget(size) < 128 * MiB
    monkeypatch.undo()
    for p in kept:
        fetch.shutil.rmtree(p)
    assert os.listdir(box["releases"]) == []


def test_bytes_are_counted_as_written_not_as_declared(tmp_path: Path) -> None:
    """tarfile and zipfile stop at the declared size themselves; should a reader ever hand
    over more, the count while writing stops it at the limit."""
    root = tmp_path / "rel"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    tree = fetch._Tree(fd, root, Limits(max_member_bytes=MiB), archive_size=10 * MiB)
    stream = io.BytesIO(bytes(4 * MiB))  # "10 bytes", 4 MiB in fact
    try:
        with pytest.raises(UnsafeArchive, match="unpack_max_member_bytes"):
            tree.add(fetch._Member("f", "file", 0o644, 0.0, "", 10, "f"), stream.read)
    finally:
        tree.close()
        os.close(fd)
    assert (root / "f").stat().st_size <= MiB


@pytest.mark.parametrize("limit,value,entries", [
    ("unpack_max_member_bytes", {"max_member_bytes": 1000},
     [("file", "small", b"s" * 10), ("file", "big", os.urandom(1001))]),
    ("unpack_max_bytes", {"max_bytes": 1500},
     [("file", "a", os.urandom(1000)), ("file", "b", os.urandom(1000))]),
    ("unpack_max_members", {"max_members": 3},
     [("file", f"f{i}", b"x") for i in range(4)]),
])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_each_limit_is_named_with_the_member(limit: str, value: dict, entries: list[Entry],
                                              kind: str, box: dict[str, Path]) -> None:
    archive = make(kind, box["arc"] / "a.bin", entries)
    with pytest.raises(UnsafeArchive, match=limit):
        unpack(archive, box["releases"] / "1.0", limits=Limits(**value))
    assert os.listdir(box["releases"]) == []
    # ... and the same archive within the default limits unpacks fine.
    unpack(archive, box["releases"] / "2.0")
    assert installed_sha256(box["releases"] / "2.0")


def patch_zip_sizes(path: Path, declared: int) -> None:
    """Make every local and central header claim ``declared`` uncompressed bytes."""
    data = bytearray(path.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        while at >= 0:
            struct.pack_into("<I", data, at + offset, declared)
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))


def test_zip_headers_that_lie_about_the_size_do_not_bypass_the_limit(
        box: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    archive = box["arc"] / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.bin", os.urandom(512 * 1024) * 8)  # 4 MiB, compresses 8:1
    # "100 bytes": within any declared-size check. zipfile stops at the declared size and
    # then fails the CRC; our own count of written bytes is the second line. Either way no
    # more than the limit reaches the disk.
    patch_zip_sizes(archive, 100)
    limits = Limits(max_member_bytes=MiB)
    kept = keep_tmp(monkeypatch)

    with pytest.raises(UnsafeArchive) as ei:
        unpack(archive, box["releases"] / "1.0", limits=limits)

    assert "data.bin" in ei.value.reason or "corrupt" in ei.value.reason
    assert file_bytes(kept) <= MiB


def test_tar_pax_record_cannot_make_us_hold_gigabytes(box: dict[str, Path]) -> None:
    # A pax extended header is read into memory whole by tarfile; 64 MiB of it is refused
    # after 1 MiB (the test would need GBs to OOM, the bound is the point).
    archive = box["arc"] / "pax.tgz"
    record = b"x" * (64 * MiB)
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type, hdr.size = tarfile.XHDTYPE, len(record)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        tf.addfile(hdr, io.BytesIO(record))
        tf.addfile(tarfile.TarInfo("after"), io.BytesIO(b""))
    with pytest.raises(UnsafeArchive, match="tar headers"):
        unpack(archive, box["releases"] / "1.0", limits=Limits(ratio_floor=1 << 40))
    assert os.listdir(box["releases"]) == []


def test_agent_conf_checks_the_unpack_keys_and_file_root(tmp_path: Path) -> None:
    from supervisor_dcdeploy.agent.config import ConfigError, load
    cfg = tmp_path / "agent.conf"
    base = "[agent]\nstore = zk://z/dc\nroot = /x\ninsecure_unsigned = true\n"
    cfg.write_text(base + "file_root = /srv/releases\nunpack_max_ratio = 50\n[service:api]\n")
    loaded = load(cfg)
    assert loaded.extra["file_root"] == "/srv/releases"
    assert Limits.from_config(loaded.extra).max_ratio == 50.0
    for bad, what in (("unpack_max_ratio = nan", "unpack_max_ratio"),
                      ("unpack_max_members = 0", "unpack_max_members"),
                      ("unpack_max_bytes = 1.5", "unpack_max_bytes"),
                      ("file_root = releases", "file_root")):
        cfg.write_text(base + bad + "\n[service:api]\n")
        with pytest.raises(ConfigError, match=what):
            load(cfg)


def test_limits_from_agent_conf_keys() -> None:
    limits = Limits.from_config({"unpack_max_bytes": "1000", "unpack_max_ratio": "50",
                                 "unpack_max_members": "7", "other": "x"})
    assert (limits.max_bytes, limits.max_ratio, limits.max_members) == (1000, 50.0, 7)
    assert limits.max_member_bytes == fetch.MAX_MEMBER_BYTES
    for bad in ({"unpack_max_ratio": "nan"}, {"unpack_max_bytes": "-1"},
                {"unpack_max_members": "many"}):
        with pytest.raises(ValueError):
            Limits.from_config(bad)


# ------------------------------------------------------------------------------ downloads

def test_file_dev_zero_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "z.artifact"
    for root in (tmp_path, Path("/")):  # outside the root; and a root that holds it
        with pytest.raises(DownloadError) as ei:
            download(["file:///dev/zero"], sha(b""), dest, size=1 << 30, file_root=root)
        assert "/dev/zero" in ei.value.reason
        assert "file_root" in ei.value.reason or "regular file" in ei.value.reason
    assert not dest.exists() and not dest.with_name("z.artifact.part").exists()


def test_file_urls_only_under_file_root(tmp_path: Path) -> None:
    root, other = tmp_path / "releases-src", tmp_path / "elsewhere"
    root.mkdir()
    other.mkdir()
    secret = other / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    (root / "link").symlink_to(secret)  # a symlink inside the root does not widen it
    dest = tmp_path / "cache" / "a.artifact"
    for url, root_ in ((secret.as_uri(), root), ((root / "link").as_uri(), root),
                       (secret.as_uri(), None), ((root / ".." / "elsewhere" / "secret")
                                                 .as_uri(), root)):
        with pytest.raises(DownloadError, match="file_root|disabled"):
            download([url], sha(b"root only"), dest, size=9, file_root=root_)
    assert not dest.parent.exists() or os.listdir(dest.parent) == []

    ok = root / "a.tgz"
    ok.write_bytes(b"release")
    download([ok.as_uri()], sha(b"release"), dest, size=7, file_root=root)
    assert dest.read_bytes() == b"release"


def test_download_without_a_size_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "a.tgz"
    src.write_bytes(b"data")
    with pytest.raises(ValueError, match="staged size"):
        download([src.as_uri()], sha(b"data"), tmp_path / "x", size=None,  # type: ignore
                 file_root=tmp_path)
    assert not (tmp_path / "x").exists()


class Endless:
    """An HTTP server sending an endless body, without or with a (lying) Content-Length."""

    def __init__(self, content_length: int | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sent = 0
        self.content_length = content_length
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/endless"

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            head = "HTTP/1.1 200 OK\r\nConnection: close\r\n"
            if self.content_length is not None:
                head += f"Content-Length: {self.content_length}\r\n"
            conn.sendall((head + "\r\n").encode())
            chunk = b"z" * 65536
            try:
                while self.sent < 1 << 30:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                return  # the client hung up: what we want

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)


@pytest.fixture(autouse=True)
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "RETRY_ATTEMPTS", 1)


@pytest.mark.parametrize("content_length", [None, 1 << 30])
def test_download_stops_at_the_staged_size(content_length: int | None, tmp_path: Path) -> None:
    server = Endless(content_length)
    dest = tmp_path / "a.artifact"
    try:
        with pytest.raises(VerificationError) as ei:
            download([server.url], sha(b"whatever"), dest, size=100_000)
    finally:
        server.close()
    assert ei.value.what == "size" and ei.value.expected == 100_000
    assert not dest.exists() and not dest.with_name("a.artifact.part").exists()
    # The client hung up long before the server's 1 GiB (socket buffers hold a few MB).
    assert server.sent < 64 * MiB


# ------------------------------------------------------------------------ cache and store

def test_cache_is_private_and_prunable(tmp_path: Path) -> None:
    src_root = tmp_path / "src"
    src_root.mkdir()
    archive = make_tar(src_root / "a.tgz", [("file", "x", b"x")])
    archive.chmod(0o600)
    data = archive.read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)

    install_release([archive.as_uri()], sha(data), tmp_path / "rel", "1", cache,
                    size=len(data), file_root=src_root)

    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    artifact = cache / f"{sha(data)}.artifact"
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o600
    (cache / f"{'0' * 64}.artifact.part").write_bytes(b"old")
    (cache / "not-ours").write_bytes(b"?")
    assert prune_cache(cache, {sha(data)}) == [f"{'0' * 64}.artifact.part"]
    assert sorted(os.listdir(cache)) == [artifact.name, "not-ours"]
    assert prune_cache(cache, set()) == [artifact.name]
    assert os.listdir(cache) == ["not-ours"]


def test_published_reason_carries_no_digest_of_the_fetched_bytes(tmp_path: Path) -> None:
    src = tmp_path / "a.tgz"
    src.write_bytes(b"some local file")
    wrong = sha(b"other")
    with pytest.raises(VerificationError) as ei:
        download([src.as_uri()], wrong, tmp_path / "x", size=15, file_root=tmp_path)
    assert sha(b"some local file") in ei.value.reason  # for the host's own status and log
    assert sha(b"some local file") not in ei.value.public_reason
    assert wrong in ei.value.public_reason
    with pytest.raises(VerificationError) as ei:
        download([src.as_uri()], sha(b"some local file"), tmp_path / "x", size=14,
                 file_root=tmp_path)
    assert "15" not in ei.value.public_reason and "14" in ei.value.public_reason


# ---------------------------------------------------------- through the real agent (issue 8)

def supervisor_pid(layout: Any, program: str) -> int:
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport
    transport = SupervisorTransport(None, None, f"unix://{layout.sock}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    return int(proxy.supervisor.getProcessInfo(program)["pid"])


def test_agent_refuses_the_aliased_chain_and_keeps_serving(workdir: Path, store: Any,
                                                           store_url: str) -> None:
    """Real ZooKeeper, real supervisord, real agents: a staged release 2 that is the sample
    release plus the aliased symlink chain. Every host refuses it and says why (locally and
    in /dc/hosts), writes nothing outside the release, and serves 1 with the same pid."""
    from cluster import Cluster, wait_for

    from supervisor_dcdeploy import ops
    from supervisor_dcdeploy.lab.sample import build_release

    cluster = Cluster(workdir, store, store_url, 2, {"A": {"quorum": 1, "max_parallel": 1}})
    try:
        cluster.boot({"A": "1"})
        pids = {h: supervisor_pid(layout, "A") for h, layout in cluster.hosts.items()}
        good, _ = build_release(workdir / "build", "A", "2")
        chain = make_tar(workdir / "build" / "chain.tar", aliased_chain(), "w")
        data = merge_tars(good, chain)
        archive = workdir / "artifacts" / "A-2-chain.tar.gz"  # under the hosts' file_root
        archive.write_bytes(data)
        before = set(workdir.rglob("*"))

        ops.stage(store, "A", "2", sha256=sha(data), urls=[archive.as_uri()], size=len(data))
        ops.deploy(store, ["A"])

        def published(h: str) -> dict:
            return ops.status(store)["hosts"].get(h, {}).get("services", {}).get("A", {}) \
                .get("fetch", {})
        wait_for(lambda: all(published(h).get("state") == "failed" for h in cluster.hosts), 60,
                 "every host to report the refused archive in /dc/hosts")
        for h in cluster.hosts:
            local = cluster.host_status(h)["services"]["A"]["fetch"]
            assert local["version"] == "2" and "a16/l" in local["error"]
            assert "symlink" in local["error"]
            assert "a16/l" in published(h)["error"]
        # Every host refused the same bytes for good: the item says so instead of waiting.
        wait_for(lambda: ops.status(store)["deploy"][0]["state"] == "blocked" and
                 f"{len(cluster.hosts)} hosts failed to verify 2" in
                 ops.status(store)["deploy"][0]["reason"], 30,
                 "the deploy to show every host's refusal")

        assert not list(workdir.rglob("evil")), "a member landed outside the release"
        created = {p for p in set(workdir.rglob("*")) - before if "releases" in p.parts}
        assert created == set(), f"left in a releases directory: {sorted(created)}"
        assert store.children("staging/A") == []
        for h, layout in cluster.hosts.items():
            assert cluster.version(h, "A") == "1"
            assert supervisor_pid(layout, "A") == pids[h], "the service was not restarted"
            assert not (layout.root / "A" / "releases" / "2").exists()
            assert [p.name for p in (layout.root / "A" / "releases").iterdir()] == ["1"]

        # A wrong digest: the host's own status names the digest it fetched, /dc/hosts
        # does not (it would be an oracle for any file a store writer names).
        ops.abort(store)
        path, real = build_release(workdir / "artifacts", "A", "3")
        wrong = sha(b"not it")
        ops.stage(store, "A", "3", sha256=wrong, urls=[path.as_uri()], size=path.stat().st_size)
        wait_for(lambda: all(published(h).get("version") == "3" and
                             published(h).get("state") == "failed" for h in cluster.hosts), 60,
                 "every host to report the digest mismatch in /dc/hosts")
        for h in cluster.hosts:
            assert wrong in published(h)["error"] and real not in published(h)["error"]
            assert real in cluster.host_status(h)["services"]["A"]["fetch"]["error"]
    finally:
        cluster.stop_all()


def test_is_archive_reads_one_header_only(box: dict[str, Path]) -> None:
    import gzip
    arc = box["arc"]
    assert fetch.is_archive(make_tar(arc / "a.tgz", [("file", "x", b"x")]))
    assert fetch.is_archive(make_zip(arc / "a.zip", [("file", "x", b"x")]))
    (arc / "plain.bin").write_bytes(os.urandom(4096))
    (arc / "single.gz").write_bytes(gzip.compress(b"not a tar " * 100))
    assert not fetch.is_archive(arc / "plain.bin")
    assert not fetch.is_archive(arc / "single.gz")
    assert not fetch.is_archive(arc)
    # A tar starting with a 64 MiB pax record: recognised from its first header, without
    # reading the record (tarfile.is_tarfile would hold all of it in memory).
    record = b"x" * (64 * MiB)
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type, hdr.size = tarfile.XHDTYPE, len(record)
    with tarfile.open(arc / "pax.tar", "w") as tf:
        tf.addfile(hdr, io.BytesIO(record))
    del record
    import tracemalloc
    tracemalloc.start()
    try:
        assert fetch.is_archive(arc / "pax.tar")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MiB
