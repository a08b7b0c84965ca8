"""Tests for supervisor_dcdeploy.fetch against real loopback HTTP servers and real archives.

The HTTP server below is deliberately tiny but honest: it answers Range requests with 206 and a
Content-Range, can be told to ignore Range, to cut the connection after N bytes, or to answer
with a given status; it records every request so tests assert on what the client really sent.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import socket
import stat
import subprocess
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from needs import unavailable

from supervisor_dcdeploy import fetch
from supervisor_dcdeploy.fetch import (
    DiskFull,
    DownloadError,
    FetchError,
    UnsafeArchive,
    VerificationError,
    download,
    install_release,
    installed_sha256,
    unpack,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# ------------------------------------------------------------------------------ HTTP test server

class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drops: dict[str, list[int]] = {}       # path -> cut after N body bytes, per request
        self.statuses: dict[str, list[int]] = {}    # path -> statuses to answer first
        self.ignore_range = False


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        st = self.server.state
        rng = self.headers.get("Range")
        with st.lock:
            st.requests.append((self.path, rng))
            forced = st.statuses.get(self.path, [])
            status = forced.pop(0) if forced else None
            drops = st.drops.get(self.path, [])
            drop = drops.pop(0) if drops else None
            data = st.files.get(self.path)
        if status is not None:
            self.send_error(status)
            return
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not st.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, f"client sent an unexpected Range header {rng!r}"
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop is not None:
            # Promise the whole body, deliver part of it, hang up: a broken connection.
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        # A client that gives up mid-body (a wrong size, a bad checksum) is what several
        # tests provoke: not worth a traceback on the console.
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Server:
    def __init__(self) -> None:
        self.httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = self.state = _State()
        # A short poll interval only makes shutdown() prompt; requests are served at once.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def add(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
        return self.url(path)

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        with self.state.lock:
            return list(self.state.requests)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the retry logic (attempts, transient vs final) but don't wait between attempts.
    monkeypatch.setattr(fetch, "RETRY_WAIT_MULTIPLIER_S", 0.0)
    monkeypatch.setattr(fetch, "RETRY_WAIT_MAX_S", 0.0)


@pytest.fixture
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # One attempt per call, so a test can observe the state *between* two calls.
    monkeypatch.setattr(fetch, "RETRY_ATTEMPTS", 1)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/nothing-listens-here"


# ------------------------------------------------------------------------------------ download

def test_http_download_reports_progress_and_second_call_makes_no_request(
        server: Server, tmp_path: Path) -> None:
    data = blob(4 * 1024 * 1024)
    url = server.add("/a.tgz", data)
    dest = tmp_path / "cache" / "a.artifact"
    calls: list[tuple[int, int | None]] = []

    t0 = time.monotonic()
    assert download([url], sha(data), dest, size=len(data),
                    progress=lambda d, t: calls.append((d, t))) == dest
    elapsed = time.monotonic() - t0

    assert dest.read_bytes() == data
    assert not dest.with_name("a.artifact.part").exists()
    assert calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert all(t == len(data) for _, t in calls)
    # 64 chunks arrive; throttled to ~10/s plus the first and the final call.
    assert len(calls) <= 10 * elapsed + 2, (len(calls), elapsed)
    assert len(server.requests) == 1

    assert download([url], sha(data), dest, size=len(data)) == dest
    assert len(server.requests) == 1, "an idempotent call must not touch the network"


def test_resume_across_calls_sends_range_with_the_right_offset(
        server: Server, tmp_path: Path, no_retries: None) -> None:
    data = blob(500_000)
    url = server.add("/r.tgz", data)
    server.state.drops["/r.tgz"] = [123_457]
    dest = tmp_path / "r.artifact"
    part = tmp_path / "r.artifact.part"

    with pytest.raises(DownloadError) as ei:
        download([url], sha(data), dest, size=len(data))
    assert ei.value.url == url
    assert part.stat().st_size == 123_457, "the bytes received must be kept for resumption"
    assert not dest.exists()

    download([url], sha(data), dest, size=len(data))
    assert dest.read_bytes() == data
    assert not part.exists()
    assert server.requests == [("/r.tgz", None), ("/r.tgz", "bytes=123457-")]


def test_broken_connection_is_retried_and_resumed_within_one_call(
        server: Server, tmp_path: Path) -> None:
    data = blob(300_000)
    url = server.add("/r.tgz", data)
    server.state.drops["/r.tgz"] = [1000, 50_000]
    dest = tmp_path / "r.artifact"

    download([url], sha(data), dest, size=len(data))
    assert dest.read_bytes() == data
    assert server.requests == [("/r.tgz", None), ("/r.tgz", "bytes=1000-"),
                               ("/r.tgz", "bytes=51000-")]


def test_server_ignoring_range_restarts_from_zero(
        server: Server, tmp_path: Path, no_retries: None) -> None:
    data = blob(400_000)
    url = server.add("/r.tgz", data)
    server.state.drops["/r.tgz"] = [100_000]
    dest = tmp_path / "r.artifact"
    with pytest.raises(DownloadError):
        download([url], sha(data), dest, size=len(data))

    server.state.ignore_range = True  # answers 200 with the whole body
    download([url], sha(data), dest, size=len(data))
    # Appending the 200 body to the 100 kB already there would fail verification.
    assert dest.read_bytes() == data
    assert server.requests[-1] == ("/r.tgz", "bytes=100000-")


def test_complete_part_is_verified_without_a_request(server: Server, tmp_path: Path) -> None:
    # Killed after the last byte but before the rename: nothing is left to fetch.
    data = blob(50_000)
    url = server.add("/a.tgz", data)
    (tmp_path / "a.artifact.part").write_bytes(data)
    download([url], sha(data), tmp_path / "a.artifact", size=len(data))
    assert (tmp_path / "a.artifact").read_bytes() == data
    assert server.requests == []
    assert os.listdir(tmp_path) == ["a.artifact"]


def test_416_for_a_part_shorter_than_the_staged_size_is_a_size_error(
        server: Server, tmp_path: Path) -> None:
    # The server's artifact ends where our .part does, before the staged size.
    data = blob(50_000)
    url = server.add("/a.tgz", data)
    (tmp_path / "a.artifact.part").write_bytes(data)
    with pytest.raises(VerificationError) as ei:
        download([url], sha(data), tmp_path / "a.artifact", size=len(data) + 10)
    assert ei.value.what == "size"
    assert server.requests == [("/a.tgz", "bytes=50000-")]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("size", [None, -1, True, 1.5])
def test_a_download_needs_a_staged_size(size, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        download(["http://127.0.0.1:1/a.tgz"], sha(b"x"), tmp_path / "a.artifact", size=size)
    assert os.listdir(tmp_path) == []


def test_wrong_sha256_leaves_neither_dest_nor_part(server: Server, tmp_path: Path) -> None:
    data = blob(200_000)
    url = server.add("/a.tgz", data)
    dest = tmp_path / "a.artifact"
    wrong = sha(b"something else")
    with pytest.raises(VerificationError) as ei:
        download([url], wrong, dest, size=len(data))
    assert (ei.value.expected, ei.value.actual) == (wrong, sha(data))
    assert wrong in ei.value.reason and sha(data) in ei.value.reason
    assert os.listdir(tmp_path) == []


def test_stale_part_that_fails_verification_is_dropped_and_next_call_recovers(
        server: Server, tmp_path: Path) -> None:
    data = blob(200_000)
    url = server.add("/a.tgz", data)
    dest = tmp_path / "a.artifact"
    (tmp_path / "a.artifact.part").write_bytes(b"garbage from an older artifact")
    with pytest.raises(VerificationError):
        download([url], sha(data), dest, size=len(data))
    assert os.listdir(tmp_path) == []
    download([url], sha(data), dest, size=len(data))
    assert dest.read_bytes() == data


@pytest.mark.parametrize("delta", [+1, -1])
def test_size_mismatch_is_a_verification_error(server: Server, tmp_path: Path,
                                               delta: int) -> None:
    data = blob(100_000)
    url = server.add("/a.tgz", data)
    with pytest.raises(VerificationError) as ei:
        download([url], sha(data), tmp_path / "a.artifact", size=len(data) + delta)
    assert ei.value.what == "size"
    assert ei.value.expected == len(data) + delta
    assert os.listdir(tmp_path) == []


def test_404_names_url_and_status_and_is_not_retried(server: Server, tmp_path: Path) -> None:
    url = server.url("/missing.tgz")
    with pytest.raises(DownloadError) as ei:
        download([url], sha(b"x"), tmp_path / "a.artifact", size=1)
    assert ei.value.status == 404
    assert url in ei.value.reason and "404" in ei.value.reason
    assert server.requests == [("/missing.tgz", None)]
    assert isinstance(ei.value, FetchError)


def test_bad_urls_are_skipped_in_order(server: Server, tmp_path: Path) -> None:
    data = blob(10_000)
    good = server.add("/good.tgz", data)
    urls = [closed_port_url(), server.url("/missing.tgz"), good]
    download(urls, sha(data), tmp_path / "a.artifact", size=len(data))
    assert (tmp_path / "a.artifact").read_bytes() == data
    assert [p for p, _ in server.requests] == ["/missing.tgz", "/good.tgz"]


def test_all_urls_failing_reports_the_last_error(server: Server, tmp_path: Path) -> None:
    urls = [closed_port_url(), server.url("/missing.tgz")]
    with pytest.raises(DownloadError) as ei:
        download(urls, sha(b"x"), tmp_path / "a.artifact", size=1)
    assert ei.value.status == 404 and "all 2 URLs failed" in ei.value.reason


def test_server_error_is_retried(server: Server, tmp_path: Path) -> None:
    data = blob(10_000)
    url = server.add("/a.tgz", data)
    server.state.statuses["/a.tgz"] = [503, 502]
    download([url], sha(data), tmp_path / "a.artifact", size=len(data))
    assert len(server.requests) == 3


def test_file_url(tmp_path: Path) -> None:
    data = blob(300_000)
    src = tmp_path / "src" / "a.tgz"
    src.parent.mkdir()
    src.write_bytes(data)
    dest = tmp_path / "cache" / "a.artifact"
    calls: list[tuple[int, int | None]] = []
    download([src.as_uri()], sha(data), dest, size=len(data), file_root=tmp_path,
             progress=lambda d, t: calls.append((d, t)))
    assert dest.read_bytes() == data
    assert calls[-1] == (len(data), len(data))

    missing = (tmp_path / "src" / "nope.tgz").as_uri()
    with pytest.raises(DownloadError) as ei:
        download([missing], sha(data), tmp_path / "other.artifact", size=len(data),
                 file_root=tmp_path)
    assert missing in ei.value.reason


def test_file_url_resumes_a_part(tmp_path: Path) -> None:
    data = blob(300_000)
    src = tmp_path / "a.tgz"
    src.write_bytes(data)
    dest = tmp_path / "a.artifact"
    (tmp_path / "a.artifact.part").write_bytes(data[:1000])
    download([src.as_uri()], sha(data), dest, size=len(data), file_root=tmp_path)
    assert dest.read_bytes() == data


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="ftp"):
        download(["ftp://example.invalid/a.tgz"], sha(b"x"), tmp_path / "a.artifact", size=1)


def test_corrupt_cached_dest_is_fetched_again(server: Server, tmp_path: Path) -> None:
    data = blob(10_000)
    url = server.add("/a.tgz", data)
    dest = tmp_path / "a.artifact"
    dest.write_bytes(b"bit rot")
    download([url], sha(data), dest, size=len(data))
    assert dest.read_bytes() == data
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------------ disk full

@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the only honest way to get ENOSPC."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         check=False, capture_output=True, text=True)
    if res.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {res.stderr.strip() or res.returncode}"
        print(reason)
        unavailable(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_during_download(server: Server, tmp_path: Path, tiny_fs: Path) -> None:
    """Decision: on a full disk the .part is deleted too. The space belongs to the running
    release and the agent's state files first; the fetch is simply retried later."""
    data = blob(4 * 1024 * 1024)
    url = server.add("/big.tgz", data)
    with pytest.raises(DiskFull) as ei:
        download([url], sha(data), tiny_fs / "big.artifact", size=len(data))
    assert ei.value.directory == tiny_fs
    assert str(tiny_fs) in ei.value.reason
    assert os.listdir(tiny_fs) == []
    assert len(server.requests) == 1, "a full disk is not a network error: no retry"


def test_disk_full_during_unpack_leaves_nothing(tmp_path: Path, tiny_fs: Path) -> None:
    archive = make_tar(tmp_path / "big.tar", [("file", "big.bin", blob(4 * 1024 * 1024))], "w")
    with pytest.raises(DiskFull) as ei:
        unpack(archive, tiny_fs / "1.0")
    assert ei.value.directory == tiny_fs
    assert os.listdir(tiny_fs) == []


# -------------------------------------------------------------------------------------- unpack

# ("file", name, data[, mode]) | ("dir", name) | ("sym"|"hard", name, target) | ("chr"|"fifo", name)
Entry = tuple[Any, ...]


def make_tar(path: Path, entries: list[Entry], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for kind, name, *rest in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                ti.size, ti.mode = len(rest[0]), (rest[1] if len(rest) > 1 else 0o644)
                tf.addfile(ti, io.BytesIO(rest[0]))
                continue
            ti.type, ti.mode = {"dir": (tarfile.DIRTYPE, 0o755), "sym": (tarfile.SYMTYPE, 0o777),
                                "hard": (tarfile.LNKTYPE, 0o644), "chr": (tarfile.CHRTYPE, 0o644),
                                "fifo": (tarfile.FIFOTYPE, 0o644)}[kind]
            if kind in ("sym", "hard"):
                ti.linkname = rest[0]
            tf.addfile(ti)
    return path


def make_zip(path: Path, entries: list[Entry]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for kind, name, *rest in entries:
            if kind == "dir":
                zi = zipfile.ZipInfo(name.rstrip("/") + "/")
                zi.external_attr = (stat.S_IFDIR | 0o755) << 16
                zf.writestr(zi, b"")
            elif kind == "sym":
                zi = zipfile.ZipInfo(name)
                zi.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(zi, rest[0])
            else:
                zi = zipfile.ZipInfo(name)
                zi.external_attr = (stat.S_IFREG | (rest[1] if len(rest) > 1 else 0o644)) << 16
                zf.writestr(zi, rest[0])
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "arc").mkdir()
    (tmp_path / "work" / "releases").mkdir(parents=True)
    return tmp_path / "arc", tmp_path / "work" / "releases"


UNSAFE = {
    "dotdot": ("tar", [("file", "ok.txt", b"ok"), ("file", "../evil", b"x")]),
    "dotdot-deep": ("tar", [("file", "a/../../evil", b"x")]),
    "absolute": ("tar", [("file", "ABS/evil", b"x")]),
    "symlink-etc-passwd": ("tar", [("sym", "passwd", "/etc/passwd")]),
    "symlink-relative-out": ("tar", [("sym", "up", "../../..")]),
    # Each link is harmless lexically; followed, b = (a -> root)/.. = the root's parent.
    "symlink-chain": ("tar", [("sym", "a", "."), ("sym", "b", "a/..")]),
    "symlink-chain-deep": ("tar", [("dir", "d"), ("sym", "d/l1", ".."),
                                   ("sym", "l2", "d/l1/.."), ("file", "l2/evil", b"x")]),
    "hardlink-outside": ("tar", [("hard", "pw", "../../../etc/passwd")]),
    "hardlink-absolute": ("tar", [("hard", "pw", "/etc/passwd")]),
    "hardlink-to-unknown": ("tar", [("hard", "pw", "etc/passwd")]),
    "char-device": ("tar", [("chr", "null")]),
    "fifo": ("tar", [("fifo", "pipe")]),
    "dir-then-symlink": ("tar", [("dir", "x"), ("sym", "x", "."), ("file", "x/y", b"y")]),
    "forged-marker": ("tar", [("file", ".dcdeploy-release.json", b"{}")]),
    "marker-tmp-symlink": ("tar", [("file", "x", b""), ("sym", ".dcdeploy-release.json.tmp", "x")]),
    "zip-dotdot": ("zip", [("file", "ok.txt", b"ok"), ("file", "../evil", b"x")]),
    "zip-absolute": ("zip", [("file", "ABS/evil", b"x")]),
    "zip-symlink-out": ("zip", [("sym", "passwd", "/etc/passwd")]),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused_before_writing_anything(
        case: str, layout: tuple[Path, Path], tmp_path: Path) -> None:
    arc_dir, releases = layout
    kind, entries = UNSAFE[case]
    assert isinstance(entries, list)
    outside = tmp_path / "outside"
    # Absolute members point into tmp_path, so a broken check would visibly create them.
    entries = [(e[0], e[1].replace("ABS", str(outside)), *e[2:]) for e in entries]
    archive = (make_tar(arc_dir / "a.bin", entries) if kind == "tar"
               else make_zip(arc_dir / "a.bin", entries))
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(UnsafeArchive) as ei:
        unpack(archive, releases / "1.0")

    assert ei.value.reason
    assert os.listdir(releases) == []
    assert os.listdir(tmp_path / "work") == ["releases"]
    assert sorted(os.listdir(tmp_path)) == before
    assert not outside.exists()


def test_unknown_format_is_refused(layout: tuple[Path, Path]) -> None:
    arc_dir, releases = layout
    archive = arc_dir / "a.tar.gz"
    archive.write_bytes(b"this is not an archive at all" * 100)
    with pytest.raises(UnsafeArchive, match="neither a tar"):
        unpack(archive, releases / "1.0")
    assert os.listdir(releases) == []


def test_truncated_archive_is_refused_and_leaves_nothing(layout: tuple[Path, Path]) -> None:
    arc_dir, releases = layout
    whole = make_tar(arc_dir / "whole.tar", [("file", f"f{i}", blob(20_000, i)) for i in range(5)],
                     "w").read_bytes()
    archive = arc_dir / "cut.tar"
    archive.write_bytes(whole[:70_000])
    with pytest.raises(UnsafeArchive, match="corrupt"):
        unpack(archive, releases / "1.0")
    assert os.listdir(releases) == []


VALID = [("dir", "bin"), ("file", "bin/app", b"#!/bin/sh\necho hi\n", 0o755),
         ("file", "etc/app.conf", b"port=80\n"), ("sym", "lib/current", "../bin/app"),
         ("sym", "app", "bin/app"), ("sym", "conf", "etc")]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz", "zip"])
def test_valid_archive_with_internal_relative_symlinks(mode: str,
                                                       layout: tuple[Path, Path]) -> None:
    arc_dir, releases = layout
    # The name lies on purpose: detection is by content.
    archive = arc_dir / "artifact.bin"
    if mode == "zip":
        make_zip(archive, VALID)
    else:
        make_tar(archive, VALID + [("hard", "bin/app2", "bin/app")], mode)
    target = releases / "1.0"

    unpack(archive, target)

    assert (target / "lib" / "current").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(target / "lib" / "current") == "../bin/app"
    assert os.readlink(target / "app") == "bin/app"
    assert (target / "conf" / "app.conf").read_bytes() == b"port=80\n"
    assert os.stat(target / "bin" / "app").st_mode & 0o111
    if mode != "zip":
        assert os.stat(target / "bin" / "app2").st_ino == os.stat(target / "bin" / "app").st_ino
    assert installed_sha256(target) == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert json.loads((target / ".dcdeploy-release.json").read_text())["version"] == "1.0"
    assert os.listdir(releases) == ["1.0"], "no temporary directory may be left behind"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


def test_existing_target_without_marker_is_never_overwritten(layout: tuple[Path, Path]) -> None:
    arc_dir, releases = layout
    archive = make_tar(arc_dir / "a.tgz", VALID)
    target = releases / "1.0"
    target.mkdir()
    (target / "running.txt").write_text("in use")
    with pytest.raises(FileExistsError):
        unpack(archive, target)
    assert os.listdir(target) == ["running.txt"]
    assert os.listdir(releases) == ["1.0"]


def test_unpack_twice_is_a_no_op(layout: tuple[Path, Path]) -> None:
    arc_dir, releases = layout
    archive = make_tar(arc_dir / "a.tgz", VALID)
    target = releases / "1.0"
    unpack(archive, target)
    marker = (target / ".dcdeploy-release.json").read_bytes()
    (target / "added-by-the-app").write_text("state")
    unpack(archive, target)
    assert (target / ".dcdeploy-release.json").read_bytes() == marker
    assert (target / "added-by-the-app").exists()

    other = make_tar(arc_dir / "b.tgz", [("file", "x", b"other")])
    with pytest.raises(FileExistsError):
        unpack(other, target)


# ----------------------------------------------------------------------------- install_release

def test_install_release_is_idempotent(server: Server, tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", VALID)
    data = archive.read_bytes()
    url = server.add("/svc/1.0.tgz", data)
    releases, cache = tmp_path / "releases", tmp_path / "cache"
    calls: list[tuple[int, int | None]] = []

    rel = install_release([url], sha(data), releases, "1.0", cache, size=len(data),
                          progress=lambda d, t: calls.append((d, t)))

    assert rel == releases / "1.0"
    assert (rel / "bin" / "app").exists()
    assert installed_sha256(rel) == sha(data)
    assert (cache / f"{sha(data)}.artifact").read_bytes() == data
    assert calls[-1] == (len(data), len(data))
    assert len(server.requests) == 1

    # The marker alone decides: even without the cached artifact, no fetch happens.
    (cache / f"{sha(data)}.artifact").unlink()
    assert install_release([url], sha(data), releases, "1.0", cache, size=len(data)) == rel
    assert len(server.requests) == 1
    assert sorted(os.listdir(releases)) == ["1.0"]


def test_install_release_refuses_a_different_sha_under_the_same_version(
        server: Server, tmp_path: Path) -> None:
    old = make_tar(tmp_path / "old.tgz", VALID)
    new = make_tar(tmp_path / "new.tgz", VALID + [("file", "extra", b"new")])
    releases, cache = tmp_path / "releases", tmp_path / "cache"
    install_release([old.as_uri()], sha(old.read_bytes()), releases, "1.0", cache,
                    size=old.stat().st_size, file_root=tmp_path)
    url = server.add("/new.tgz", new.read_bytes())

    with pytest.raises(VerificationError) as ei:
        install_release([url], sha(new.read_bytes()), releases, "1.0", cache,
                        size=new.stat().st_size)

    assert ei.value.expected == sha(new.read_bytes())
    assert ei.value.actual == sha(old.read_bytes())
    assert server.requests == []
    assert installed_sha256(releases / "1.0") == sha(old.read_bytes())
    assert not (releases / "1.0" / "extra").exists()


@pytest.mark.parametrize("version", ["../x", ".hidden", "a/b", "", ".."])
def test_install_release_rejects_unsafe_versions(version: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        install_release(["file:///nonexistent"], sha(b"x"), tmp_path / "r", version,
                        tmp_path / "c", size=1)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content", [None, b"", b"not json", b"[1, 2]",
                                     b'{"version": "1.0", "sha256": "abc"}',
                                     b'{"sha256": "' + b"a" * 64 + b'"}'])
def test_installed_sha256_is_none_for_missing_or_garbage_markers(
        content: bytes | None, tmp_path: Path) -> None:
    if content is not None:
        (tmp_path / ".dcdeploy-release.json").write_bytes(content)
    assert installed_sha256(tmp_path) is None
    assert installed_sha256(tmp_path / "absent") is None


def test_installed_sha256_follows_a_marker_replaced_rewritten_or_removed(tmp_path: Path) -> None:
    """The digest is remembered per marker as stat shows it (one system call per cycle),
    so each way a marker changes is seen at the next call."""
    from supervisor_dcdeploy.fetch import write_marker
    first, second = "a" * 64, "b" * 64
    write_marker(tmp_path, version="1", sha256=first)
    assert installed_sha256(tmp_path) == first
    assert installed_sha256(tmp_path) == first  # remembered
    write_marker(tmp_path, version="1", sha256=second)  # replaced by a rename
    assert installed_sha256(tmp_path) == second
    marker = tmp_path / ".dcdeploy-release.json"
    marker.write_bytes(b"not json, and longer than the marker was" * 3)  # in place
    assert installed_sha256(tmp_path) is None
    write_marker(tmp_path, version="1", sha256=first)
    assert installed_sha256(tmp_path) == first
    marker.unlink()
    assert installed_sha256(tmp_path) is None


def test_errors_are_one_family() -> None:
    for cls in (DownloadError, VerificationError, UnsafeArchive, DiskFull):
        assert issubclass(cls, FetchError)
    assert errno.ENOSPC in fetch._NO_SPACE and errno.EDQUOT in fetch._NO_SPACE
