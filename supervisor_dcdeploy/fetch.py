"""Fetch, verify and unpack release artifacts (docs/design.md §4.2, §5 S3/S5, §6 disk full).

A host may only switch to bytes whose sha256 matches the staged one (S3), and whatever it leaves
on disk must survive ``kill -9`` at any point (S5). So every step here is built from atomic moves:

* :func:`download` streams into ``<dest>.part`` (resumed with an HTTP ``Range`` request after an
  interruption), verifies it, fsyncs it and only then renames it to ``dest``. ``dest`` therefore
  exists only with verified content.
* :func:`unpack` extracts into a hidden temporary sibling of the release directory, safely by
  construction and within bounds (see the comment above :data:`MAX_UNPACKED_BYTES`), writes the
  release marker inside it, and renames it into place; on any refusal the sibling is deleted.
  A release directory is therefore either absent or complete with a valid marker.
* :func:`install_release` chains the two and is idempotent on the marker.

Everything downloaded or unpacked is treated as hostile: whoever writes the staged release
chooses the URL *and* the sha256 (issue 8; docs/security.md).

Errors form one family, :class:`FetchError`, whose ``reason`` is a sentence naming the problem and
the value, fit to show to an operator.

Not safe for two concurrent calls with the same ``dest`` (they would append to the same
``.part``): the agent fetches one artifact at a time.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import requests
import structlog
import tenacity
import urllib3

from .files import atomic_write, fsync_dir, sha256_file

log = structlog.get_logger(__name__)

MARKER_NAME = ".dcdeploy-release.json"
CHUNK_SIZE = 64 * 1024
PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress callbacks per second

# Retry policy around transient network errors, per URL. Module-level so tests can shrink it.
RETRY_ATTEMPTS = 5
RETRY_DEADLINE_S = 120.0
RETRY_WAIT_MULTIPLIER_S = 0.5
RETRY_WAIT_MAX_S = 10.0

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# 408/429 and 5xx are the server saying "not now", worth another try; other statuses are final.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

ProgressFn = Callable[[int, "int | None"], None]


# --------------------------------------------------------------------------------------- errors

class FetchError(Exception):
    """Base of every error raised by this module. ``reason`` is a human-readable sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def public_reason(self) -> str:
        """What may be published to the store (``/dc/hosts/<host>``), where every store reader
        sees it: :attr:`reason` minus anything learnt from the fetched bytes."""
        return self.reason


class DownloadError(FetchError):
    """A URL could not be fetched: network error, HTTP status, unreadable local file.

    ``url`` and ``status`` (HTTP status or None) name what failed; ``transient`` says whether
    trying the same URL again later may help (used for retries; final errors are not retried).
    """

    def __init__(self, reason: str, *, url: str | None = None, status: int | None = None,
                 transient: bool = False) -> None:
        super().__init__(reason)
        self.url = _redact(url) if url else url  # it may be shown or logged: no credentials
        self.status = status
        self.transient = transient


class VerificationError(FetchError):
    """Content does not match what was staged.

    ``what`` is ``"sha256"`` or ``"size"``; ``expected``/``actual`` hold the hex digests, or
    the sizes in bytes for a size mismatch.
    """

    def __init__(self, reason: str, *, expected: str | int, actual: str | int,
                 what: str = "sha256") -> None:
        super().__init__(reason)
        self.expected = expected
        self.actual = actual
        self.what = what

    @property
    def public_reason(self) -> str:
        # Not the actual digest or size: with a URL chosen by a store writer, they would be
        # an oracle for the content of any file or internal URL this host can read.
        if self.what == "size":
            return f"the artifact does not have the staged size of {self.expected} bytes"
        return f"the artifact does not match the staged sha256 {self.expected}"


class UnsafeArchive(FetchError):
    """The archive is refused: a member would land outside the release directory, is a device
    or fifo, uses a reserved name, or the file is not a readable tar/zip archive.
    ``member`` names the offending member, if any."""

    def __init__(self, reason: str, *, member: str | None = None) -> None:
        super().__init__(reason)
        self.member = member


class DiskFull(FetchError):
    """ENOSPC or EDQUOT while writing; ``directory`` is the directory that is full."""

    def __init__(self, reason: str, *, directory: Path) -> None:
        super().__init__(reason)
        self.directory = directory


def _disk_full(directory: Path, exc: OSError) -> DiskFull:
    what = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left"
    return DiskFull(f"{what} in directory {str(directory)!r} ({exc.strerror}); "
                    f"free some space there and retry", directory=directory)


# ------------------------------------------------------------------------------------- helpers

def _check_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256.lower()):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


def _redact(url: str) -> str:
    # URLs may carry credentials (https://user:token@mirror/...); never log or show them.
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class _Progress:
    """Rate-limits the caller's progress callback; the final call is never dropped."""

    def __init__(self, fn: ProgressFn | None) -> None:
        self._fn = fn
        self._last = 0.0

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        if self._fn is None:
            return
        now = time.monotonic()
        if final or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self._fn(done, total)


# ------------------------------------------------------------------------------------ download

def download(urls: Sequence[str], sha256: str, dest: Path, *, size: int,
             file_root: Path | str | None = None, progress: ProgressFn | None = None,
             timeout: float = 30.0) -> Path:
    """Fetch the artifact with digest ``sha256`` to ``dest`` and return ``dest``.

    ``urls`` (schemes ``http``, ``https``, ``file``) are tried in order; transient network errors
    (connection errors, timeouts, truncated bodies, 408/429/5xx) are retried on the same URL with
    jittered exponential backoff under a deadline, each retry resuming where the data stopped.

    Partial data is kept at ``dest + ".part"`` and resumed with an HTTP ``Range`` request by the
    next attempt or the next call; a server answering 200 instead of 206 restarts from zero.
    The sha256 and ``size`` are checked *before* ``.part`` is fsynced and renamed to
    ``dest``, so ``dest`` only ever holds verified bytes.

    Idempotent: if ``dest`` already exists with the right digest, returns at once without any
    request. A ``dest`` with a wrong digest (a corrupt cache) is deleted and fetched again.

    ``progress(done_bytes, total_bytes_or_None)`` is called at most ~10 times per second, and once
    more when the download completes.

    ``size`` (the staged size, always known: docs/store-layout.md) bounds what a wrong or
    hostile source can write here, byte for byte, while it arrives. ``file://`` URLs are
    read only from regular files under ``file_root`` (after resolving symlinks); with no
    ``file_root`` they are refused. Files are created 0600.

    Raises:
        VerificationError: the fetched bytes have the wrong sha256 or size; ``.part`` is deleted
            so the next call starts afresh.
        DownloadError: every URL failed; the error is the last URL's (``url``, ``status``).
            A ``.part`` is kept for resumption.
        DiskFull: ENOSPC/EDQUOT in ``dest``'s directory. The ``.part`` is deleted: on a full
            disk the running release (its logs, the agent's own state files) matters more than
            the bytes already fetched, so we give the space back.
        ValueError: no URL, a malformed sha256, or a size that is not an int >= 0.
    """
    sha256 = _check_sha256(sha256)
    if not urls:
        raise ValueError("no URL given for artifact " + sha256)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size must be an int >= 0 (the staged size), got {size!r}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")

    if dest.exists():
        actual = sha256_file(dest)
        if actual == sha256 and dest.stat().st_size == size:
            log.debug("fetch.cached", dest=str(dest), sha256=sha256)
            return dest
        log.warning("fetch.cache_corrupt", dest=str(dest), expected=sha256, actual=actual)
        dest.unlink()

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(dest.parent, exc) from exc
        raise

    report = _Progress(progress)
    last_error: DownloadError | None = None
    for url in urls:
        try:
            _fetch_with_retries(url, part, sha256, size, report, timeout, file_root)
        except DownloadError as exc:
            log.warning("fetch.url_failed", url=_redact(url), reason=exc.reason)
            last_error = exc
            continue
        except DiskFull:
            _unlink_quietly(part)
            log.error("fetch.disk_full", dest=str(dest), directory=str(dest.parent))
            raise
        except VerificationError:
            _unlink_quietly(part)
            raise
        try:
            os.rename(part, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                _unlink_quietly(part)
                raise _disk_full(dest.parent, exc) from exc
            raise
        log.info("fetch.done", url=_redact(url), dest=str(dest), sha256=sha256)
        return dest
    assert last_error is not None
    if len(urls) > 1:
        raise DownloadError(f"all {len(urls)} URLs failed for artifact {sha256}; "
                            f"last error: {last_error.reason}",
                            url=last_error.url, status=last_error.status) from last_error
    raise last_error


def _fetch_with_retries(url: str, part: Path, sha256: str, size: int,
                        report: _Progress, timeout: float,
                        file_root: Path | str | None) -> None:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.info("fetch.retry", url=_redact(url), attempt=state.attempt_number,
                 reason=getattr(exc, "reason", repr(exc)))

    retrying = tenacity.Retrying(
        stop=(tenacity.stop_after_attempt(RETRY_ATTEMPTS)
              | tenacity.stop_after_delay(RETRY_DEADLINE_S)),
        wait=tenacity.wait_random_exponential(multiplier=RETRY_WAIT_MULTIPLIER_S,
                                              max=RETRY_WAIT_MAX_S),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, DownloadError) and e.transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    retrying(_fetch_once, url, part, sha256, size, report, timeout, file_root)


class _PartWriter:
    """Appends to ``.part`` while keeping a running sha256 of its whole content."""

    def __init__(self, part: Path, restart: bool) -> None:
        self.part = part
        self.hasher = hashlib.sha256()
        self.done = 0
        try:
            # Owned by this object across calls; closed by close(). 0600 whatever the umask
            # or an older .part: it may be a copy of a file only root could read.
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (
                os.O_TRUNC if restart else os.O_APPEND)
            fd = os.open(part, flags, 0o600)
            os.fchmod(fd, 0o600)
            self._f: IO[bytes] = os.fdopen(fd, "wb" if restart else "ab")
            if not restart:
                # The existing prefix must be part of the digest: hash it before appending.
                with open(part, "rb") as old:
                    for chunk in iter(lambda: old.read(1024 * 1024), b""):
                        self.hasher.update(chunk)
                        self.done += len(chunk)
        except OSError as exc:
            self._raise_write(exc)

    def _raise_write(self, exc: OSError) -> None:
        if exc.errno in _NO_SPACE:
            raise _disk_full(self.part.parent, exc) from exc
        raise DownloadError(f"cannot write {str(self.part)!r}: {exc.strerror}") from exc

    def write(self, data: bytes, limit: int) -> None:
        """Append ``data``, unless it would take ``.part`` past ``limit`` bytes: then nothing
        is written and a VerificationError (size) is raised."""
        if self.done + len(data) > limit:
            raise VerificationError(
                f"artifact is larger than the staged size {limit} bytes (got at least "
                f"{self.done + len(data)})", expected=limit, actual=self.done + len(data),
                what="size")
        try:
            self._f.write(data)
        except OSError as exc:
            self._raise_write(exc)
        self.hasher.update(data)
        self.done += len(data)

    def finish(self) -> None:
        """Flush and fsync: ENOSPC often only surfaces here (delayed allocation, tmpfs)."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            self._raise_write(exc)

    def close(self) -> None:
        # A failing flush at close was already reported by write()/finish().
        with contextlib.suppress(OSError):
            self._f.close()


def _fetch_once(url: str, part: Path, sha256: str, size: int,
                report: _Progress, timeout: float, file_root: Path | str | None) -> None:
    """One attempt at one URL: resume ``part``, stream the rest, verify. Raises on any failure."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > size:
        log.warning("fetch.part_oversized", part=str(part), offset=offset, size=size)
        offset = 0
    if offset == size:
        # Complete but unverified (killed between write and rename): verify without a request.
        writer = _PartWriter(part, restart=False)
        writer.close()
        _verify(writer, sha256, size, url)
        return

    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        _fetch_http(url, part, offset, sha256, size, report, timeout)
    elif scheme == "file":
        _fetch_file(url, part, offset, sha256, size, report, file_root)
    else:
        raise DownloadError(f"unsupported URL scheme {scheme!r} in {_redact(url)!r}; "
                            f"use http, https or file", url=url)


def _stream(chunks: Iterator[bytes], writer: _PartWriter, total: int, size: int,
            report: _Progress) -> None:
    # Don't let a wrong or hostile source fill the disk: the first chunk that would go past
    # the staged size stops the download before it is written.
    for chunk in chunks:
        writer.write(chunk, size)
        report(writer.done, total)


def _fetch_http(url: str, part: Path, offset: int, sha256: str, size: int,
                report: _Progress, timeout: float) -> None:
    shown = _redact(url)
    # identity: a transparently gunzipped body would not match the digest nor Range offsets.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.RequestException as exc:
        raise DownloadError(f"cannot fetch {shown!r}: {type(exc).__name__}: {exc}",
                            url=url, transient=True) from exc
    with resp:
        if resp.status_code == 416 and offset:
            # Our .part is at least as long as the file: it may be complete, or stale garbage.
            writer = _PartWriter(part, restart=False)
            writer.close()
            _verify(writer, sha256, size, url)
            return
        if resp.status_code not in (200, 206):
            raise DownloadError(f"HTTP {resp.status_code} {resp.reason} from {shown!r}",
                                url=url, status=resp.status_code,
                                transient=resp.status_code in _TRANSIENT_STATUS)
        restart = True
        if resp.status_code == 206 and offset:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start == offset:
                restart = False
                log.info("fetch.resume", url=shown, offset=offset)
            else:
                # We cannot splice a range we did not ask for; start over next attempt.
                _unlink_quietly(part)
                raise DownloadError(
                    f"{shown!r} answered Range bytes={offset}- with Content-Range "
                    f"{resp.headers.get('Content-Range')!r}; restarting from zero",
                    url=url, status=206, transient=True)
        elif offset:
            log.info("fetch.restart", url=shown, offset=offset, status=resp.status_code,
                     why="server ignored Range")
        length = resp.headers.get("Content-Length")
        expected_body = int(length) if length and length.isdigit() else None
        start = offset if not restart else 0
        if expected_body is not None and start + expected_body > size:
            raise VerificationError(
                f"{shown!r} announces {start + expected_body} bytes, more than the staged size "
                f"{size}; not downloading it", expected=size, actual=start + expected_body,
                what="size")
        writer = _PartWriter(part, restart=restart)
        try:
            total = size
            report(writer.done, total)
            body_start = writer.done
            try:
                _stream(_body_chunks(resp), writer, total, size, report)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                # Bytes already written stay in .part: the retry resumes after them.
                raise DownloadError(f"connection to {shown!r} broke after {writer.done} bytes: "
                                    f"{type(exc).__name__}", url=url, transient=True) from exc
            if expected_body is not None and writer.done - body_start != expected_body:
                raise DownloadError(f"{shown!r} sent {writer.done - body_start} of "
                                    f"{expected_body} bytes", url=url, transient=True)
            writer.finish()
        finally:
            writer.close()
    report(writer.done, writer.done, final=True)
    _verify(writer, sha256, size, url)


def _body_chunks(resp: requests.Response) -> Iterator[bytes]:
    """The raw body bytes, each chunk as soon as it arrives.

    Not ``iter_content``: on a broken connection it drops the partial chunk it was filling, and
    those bytes would have to be fetched again; ``read1`` hands over whatever did arrive, so
    the resume offset is exactly what the server sent. ``decode_content=False``: we verify and
    store the bytes as served, whatever Content-Encoding a misconfigured server claims.
    """
    raw = resp.raw
    if not hasattr(raw, "read1"):  # urllib3 < 2
        yield from raw.stream(CHUNK_SIZE, decode_content=False)
        return
    while True:
        data = raw.read1(CHUNK_SIZE, decode_content=False)
        if not data:
            return
        yield data


def probe_size(urls: Sequence[str], *, timeout: float = 10.0) -> tuple[int, str] | None:
    """The artifact's size as the operator's machine sees it, for ``dcdeploy stage --url``
    without ``--size``: a ``file://`` URL's regular file here, or an http(s) URL's
    Content-Length answered to HEAD (redirects followed). Returns (bytes, the URL it came
    from, without credentials) for the first URL that tells, or None. A wrong answer costs
    no safety: every host checks the downloaded bytes against this size and the sha256."""
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "file":
            path = Path(urllib.parse.unquote(parts.path))
            try:
                st = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                return st.st_size, url
        elif scheme in ("http", "https"):
            try:
                resp = requests.head(url, headers={"Accept-Encoding": "identity"},
                                     allow_redirects=True, timeout=(timeout, timeout))
            except requests.RequestException as exc:
                log.info("fetch.probe_failed", url=_redact(url), error=type(exc).__name__)
                continue
            length = resp.headers.get("Content-Length", "")
            if resp.status_code == 200 and re.fullmatch(r"[0-9]{1,19}", length) \
                    and int(length) > 0:
                return int(length), _redact(url)
    return None


def _content_range_start(value: str) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value)
    return int(m.group(1)) if m else None


def _open_under_root(url: str, source: str, file_root: Path | str | None) -> IO[bytes]:
    """Open ``source`` for reading if, symlinks resolved, it is a regular file under
    ``file_root``. The resolved path is then opened one component at a time without following
    symlinks, so a path swapped meanwhile fails instead of leading elsewhere."""
    if file_root is None:
        raise DownloadError(f"file URL {url!r} refused: file:// URLs are disabled on this host "
                            f"(set file_root in agent.conf to the directory they may read)",
                            url=url)
    root = os.path.realpath(file_root)
    real = os.path.realpath(source)
    if real == root or os.path.commonpath([root, real]) != root:
        raise DownloadError(f"file URL {url!r} refused: {real!r} is not under this host's "
                            f"file_root {root!r}", url=url)
    parts = os.path.relpath(real, root).split(os.sep)
    fd = -1
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for comp in parts[:-1]:
            nxt = os.open(comp, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        # O_NONBLOCK: opening a fifo must not hang the fetch thread; no effect on files.
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                      dir_fd=fd)
    except OSError as exc:
        raise DownloadError(f"cannot read {url!r}: {exc.strerror}", url=url) from exc
    finally:
        if fd >= 0:
            os.close(fd)
    mode = os.fstat(ffd).st_mode
    if not stat.S_ISREG(mode):
        os.close(ffd)
        raise DownloadError(f"file URL {url!r} refused: {real!r} is not a regular file",
                            url=url)
    return os.fdopen(ffd, "rb")


def _fetch_file(url: str, part: Path, offset: int, sha256: str, size: int,
                report: _Progress, file_root: Path | str | None) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"file URL {url!r} names a remote host {parts.netloc!r}; "
                            f"only local files are supported", url=url)
    source = urllib.request.url2pathname(parts.path)
    src = _open_under_root(url, source, file_root)
    length = os.fstat(src.fileno()).st_size
    if length > size:
        src.close()
        raise VerificationError(f"{url!r} is larger than the staged size {size} bytes; not "
                                f"copying it", expected=size, actual=length, what="size")
    with src:
        total = size
        restart = offset == 0 or offset > os.fstat(src.fileno()).st_size
        if not restart:
            src.seek(offset)
            log.info("fetch.resume", url=url, offset=offset)
        writer = _PartWriter(part, restart=restart)
        try:
            report(writer.done, total)
            try:
                _stream(iter(lambda: src.read(CHUNK_SIZE), b""), writer, total, size, report)
            except OSError as exc:
                raise DownloadError(f"cannot read {url!r}: {exc.strerror}", url=url) from exc
            writer.finish()
        finally:
            writer.close()
    report(writer.done, writer.done, final=True)
    _verify(writer, sha256, size, url)


def _verify(writer: _PartWriter, sha256: str, size: int, url: str) -> None:
    if writer.done != size:
        raise VerificationError(
            f"artifact from {_redact(url)!r} is {writer.done} bytes, staged size is {size}",
            expected=size, actual=writer.done, what="size")
    actual = writer.hasher.hexdigest()
    if actual != sha256:
        log.error("fetch.mismatch", url=_redact(url), expected=sha256, actual=actual)
        raise VerificationError(
            f"artifact from {_redact(url)!r} has sha256 {actual}, staged sha256 is {sha256}",
            expected=sha256, actual=actual)
    log.info("fetch.verified", url=_redact(url), sha256=sha256, bytes=writer.done)


# -------------------------------------------------------------------------------------- unpack
#
# Safe by construction (issue 8): every member is created beneath the temporary release
# directory one path component at a time, with ``dir_fd`` and ``O_NOFOLLOW``, so the kernel
# itself refuses to walk through a symlink, whatever the archive's names or links say. On top
# of that the bookkeeping in :class:`_Tree` refuses, with a sentence naming the member:
#
# * a member whose path passes through a symlink, a hard link or a file made earlier;
# * a symlink whose target is absolute, longer than MAX_LINK_TARGET, or leaves the release:
#   only *leading* ``..`` components are accepted, no more of them than the link's own depth.
#   (``a -> .`` then ``b -> a/..`` is the kind of chain the old name-based check missed: with
#   ``..`` only at the start, the kernel's resolution of any target is its lexical one);
# * a hard link to anything but a regular file made earlier in this archive;
# * devices, fifos, and the reserved marker name; setuid/setgid/sticky bits are dropped;
# * more than the limits below, counted on the bytes actually decompressed and written, never
#   on the sizes the headers declare (headers can lie).

GiB = 1024 ** 3
# Defaults, each overridable per host in agent.conf (keys in Limits.from_config).
MAX_UNPACKED_BYTES = 32 * GiB   # unpack_max_bytes: all members together
MAX_MEMBER_BYTES = 16 * GiB     # unpack_max_member_bytes: one file
MAX_MEMBERS = 200_000           # unpack_max_members: files, dirs and links (inodes)
# unpack_max_ratio: unpacked bytes per archive byte. Code, binaries and text compress 2-10:1,
# logs or JSON fixtures up to ~50:1; gzip cannot exceed ~1030:1, which only long runs of one
# byte reach. 200:1 keeps 4x headroom over the most compressible real content while a bomb
# can expand to at most 200 times its (size-bounded) download.
MAX_RATIO = 200.0
RATIO_FLOOR_BYTES = 16 * 1024 ** 2  # below this much output the ratio is not checked
MAX_LINK_TARGET = 4096          # PATH_MAX: also the most we read of a zip symlink's data
# What tarfile may read outside member data (headers, pax records, GNU long names, skipped
# data) between two members: it holds those in memory, so a 10 GB pax record would OOM us.
MAX_TAR_HEADER_BYTES = 1024 ** 2


@dataclass(frozen=True)
class Limits:
    """Bounds on one unpack; see the module constants for the defaults and why."""

    max_bytes: int = MAX_UNPACKED_BYTES
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_members: int = MAX_MEMBERS
    max_ratio: float = MAX_RATIO
    ratio_floor: int = RATIO_FLOOR_BYTES

    # agent.conf [agent] key -> field
    KEYS = {"unpack_max_bytes": "max_bytes", "unpack_max_member_bytes": "max_member_bytes",
            "unpack_max_members": "max_members", "unpack_max_ratio": "max_ratio"}

    @classmethod
    def from_config(cls, extra: Mapping[str, str]) -> Limits:
        """Defaults overridden by the ``unpack_*`` keys of agent.conf's ``[agent]`` section
        (validated at load time by agent/config.py); raises ValueError on a bad value."""
        values: dict[str, Any] = {}
        for key, name in cls.KEYS.items():
            raw = (extra.get(key) or "").strip()
            if not raw:
                continue
            try:
                value = float(raw) if name == "max_ratio" else int(raw)
            except ValueError:
                value = 0
            if not 0 < value < float("inf"):  # also refuses NaN
                raise ValueError(f"{key}: must be a positive "
                                 f"{'number' if name == 'max_ratio' else 'integer'}, "
                                 f"got {raw!r}")
            values[name] = value
        return cls(**values)

    def budget(self, archive_size: int) -> int:
        """The most bytes an archive of ``archive_size`` bytes may expand to (ratio bound)."""
        return max(self.ratio_floor, int(self.max_ratio * archive_size))


@dataclass(frozen=True)
class _Member:
    name: str           # normalized relative POSIX path, no "." / ".." components
    kind: str           # "file" | "dir" | "symlink" | "hardlink"
    mode: int
    mtime: float
    link: str = ""      # symlink target as written, or hardlink target (normalized)
    size: int = 0       # declared size (only used to refuse early; never trusted)
    raw: str = ""       # the name as written in the archive, for messages


def _normalize(name: str, raw: str) -> str:
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise UnsafeArchive(f"archive member {raw!r} has an absolute path", member=raw)
    if "\0" in name:
        raise UnsafeArchive(f"archive member {raw!r} has a NUL byte in its name", member=raw)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {raw!r} contains a '..' component", member=raw)
    return "/".join(parts)


def _check_link_target(m: _Member) -> None:
    """A symlink may point only inside the release: relative, and with ``..`` only at the
    start, at most as many as the link's depth. Then the kernel's resolution equals the lexical
    one, whatever other links the release holds (by induction on the links followed)."""
    target, name = m.link, m.raw or m.name
    if not target:
        raise UnsafeArchive(f"archive member {name!r} is a symlink with an empty target",
                            member=name)
    if len(target.encode("utf-8", "surrogateescape")) > MAX_LINK_TARGET or "\0" in target:
        raise UnsafeArchive(f"archive member {name!r} is a symlink whose target is longer than "
                            f"{MAX_LINK_TARGET} bytes or holds a NUL byte", member=name)
    if target.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r} is a symlink to the absolute path "
                            f"{target!r}", member=name)
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    for i, part in enumerate(parts):
        if part == "..":
            if i != ups:
                raise UnsafeArchive(f"archive member {name!r} is a symlink to {target!r}, "
                                    f"which has '..' after a name; only leading '..' are "
                                    f"allowed in symlink targets", member=name)
            ups += 1
    if ups > m.name.count("/"):
        raise UnsafeArchive(f"archive member {name!r} is a symlink to {target!r}, which points "
                            f"outside the release directory", member=name)


# errnos that mean "the archive asks for something impossible or unsafe", not "our host broke"
_ARCHIVE_ERRNOS = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
                             errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EMLINK})
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FD_CACHE = 64  # directory fds kept open while unpacking


class _Tree:
    """The release being extracted beneath ``root_fd``; counts what is actually written."""

    def __init__(self, root_fd: int, root: Path, limits: Limits, archive_size: int) -> None:
        self.root_fd = root_fd
        self.root = root
        self.limits = limits
        self.archive_size = archive_size
        self.budget = limits.budget(archive_size)
        self.kinds: dict[str, str] = {}
        self.members = 0
        self.written = 0
        # Directory fds by path, most recent last: a directory, once made, is never replaced
        # (no member may reuse its name), so an fd reached by a safe walk stays right.
        self._fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- limits -----------------------------------------------------------------------
    def count_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchive(f"archive has more than {self.limits.max_members} members "
                                f"(limit unpack_max_members); refused at member {name!r}",
                                member=name)

    def _check_bytes(self, name: str, member_total: int, total: int) -> None:
        lim = self.limits
        if member_total > lim.max_member_bytes:
            raise UnsafeArchive(f"archive member {name!r} is larger than {lim.max_member_bytes} "
                                f"bytes (limit unpack_max_member_bytes)", member=name)
        if total > lim.max_bytes:
            raise UnsafeArchive(f"archive expands to more than {lim.max_bytes} bytes (limit "
                                f"unpack_max_bytes); refused at member {name!r}", member=name)
        if total > self.budget:
            raise UnsafeArchive(
                f"archive expands to more than {self.budget} bytes, {lim.max_ratio:g} times its "
                f"{self.archive_size} bytes (limit unpack_max_ratio): a compression bomb? "
                f"refused at member {name!r}", member=name)

    # -- the walk ---------------------------------------------------------------------
    def _os_error(self, exc: OSError, name: str, what: str) -> FetchError:
        if exc.errno in _NO_SPACE:
            return _disk_full(self.root.parent, exc)
        if exc.errno in _ARCHIVE_ERRNOS:
            return UnsafeArchive(f"archive member {name!r}: cannot {what} safely "
                                 f"({exc.strerror})", member=name)
        raise exc

    def _parent(self, path: str, name: str) -> tuple[int, str]:
        """An fd of ``path``'s parent directory, made as needed, reached without following any
        symlink, and ``path``'s last component. The fd is borrowed: valid until the next
        :meth:`add`."""
        parts = path.split("/")
        parent = "/".join(parts[:-1])
        if not parent:
            return self.root_fd, parts[-1]
        if parent in self._fds:
            return self._fds[parent], parts[-1]
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                sofar = "/".join(parts[: i + 1])
                kind = self.kinds.get(sofar)
                if kind is not None and kind != "dir":
                    raise UnsafeArchive(f"archive member {name!r} passes through {sofar!r}, "
                                        f"which is a {kind}, not a directory", member=name)
                if kind is None:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    self.kinds[sofar] = "dir"
                nxt = os.open(comp, _NOFOLLOW_DIR, dir_fd=fd)  # ELOOP on a symlink
                os.close(fd)
                fd = nxt
            self._fds[parent] = fd
            return fd, parts[-1]
        except OSError as exc:
            os.close(fd)
            raise self._os_error(exc, name, f"make its directory {'/'.join(parts[:-1])!r}") \
                from exc
        except BaseException:
            os.close(fd)
            raise

    # -- members ----------------------------------------------------------------------
    def add(self, m: _Member, read: Callable[[int], bytes] | None = None) -> None:
        name = m.raw or m.name
        self.count_member(name)
        while len(self._fds) > DIR_FD_CACHE:  # only here: fds handed out are in use below
            os.close(self._fds.pop(next(iter(self._fds))))
        if not m.name:
            if m.kind == "dir":
                return  # "./": the root itself
            raise UnsafeArchive(f"archive member {name!r} of kind {m.kind} has an empty name",
                                member=name)
        if m.name.split("/")[0].startswith(MARKER_NAME):  # the marker and its temporary file
            raise UnsafeArchive(f"archive member {name!r} uses a name reserved for the "
                                f"release marker", member=name)
        previous = self.kinds.get(m.name)
        if previous is not None:
            if previous == "dir" and m.kind == "dir":
                return  # a repeated directory entry is harmless
            raise UnsafeArchive(f"archive member {name!r} appears twice ({previous}, then "
                                f"{m.kind})", member=name)
        if m.kind == "symlink":
            _check_link_target(m)
        elif m.kind == "hardlink" and self.kinds.get(m.link) != "file":
            raise UnsafeArchive(f"archive member {name!r} is a hard link to {m.link!r}, which "
                                f"is not a regular file earlier in the archive", member=name)
        elif m.kind == "file":
            self._check_bytes(name, m.size, self.written + m.size)  # early, if declared
        fd, last = self._parent(m.name, name)
        try:
            if m.kind == "dir":
                os.mkdir(last, 0o755, dir_fd=fd)
            elif m.kind == "symlink":
                os.symlink(m.link, last, dir_fd=fd)
            elif m.kind == "hardlink":
                src_fd, src_last = self._parent(m.link, name)
                os.link(src_last, last, src_dir_fd=src_fd, dst_dir_fd=fd,
                        follow_symlinks=False)
            else:
                assert read is not None
                self._write(m, name, fd, last, read)
        except OSError as exc:
            raise self._os_error(exc, name, f"create it as a {m.kind}") from exc
        self.kinds[m.name] = m.kind

    def _write(self, m: _Member, name: str, dir_fd: int, last: str,
               read: Callable[[int], bytes]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(last, flags, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as dst:
            done = 0
            while True:
                chunk = read(CHUNK_SIZE)
                if not chunk:
                    break
                done += len(chunk)
                self._check_bytes(name, done, self.written + len(chunk))
                self.written += len(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(fd)  # the marker promises complete content, even after power loss
            # Keep the executable bits; drop setuid/setgid/sticky and group/world write.
            os.fchmod(fd, (m.mode & 0o755) | 0o600)
            os.utime(fd, (m.mtime, m.mtime))


class _Counting(io.RawIOBase):
    """The decompressed tar stream, counted: refuses to expand past the ratio budget, and
    lets tarfile read at most MAX_TAR_HEADER_BYTES between two members (see there)."""

    def __init__(self, inner: IO[bytes], tree: _Tree) -> None:
        self.inner = inner
        self.tree = tree
        self.total = 0
        self.mark = 0
        self.member = "(archive header)"

    def readable(self) -> bool:
        return True

    def between_members(self) -> None:
        self.mark = self.total

    def in_member(self, name: str) -> None:
        self.mark = -1
        self.member = name

    def readinto(self, buf: Any) -> int:
        try:
            data = self.inner.read(len(buf))
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                raise
            raise UnsafeArchive(f"corrupt compressed data after member {self.member!r}: "
                                f"{exc}", member=self.member) from exc
        n = len(data)
        self.total += n
        if self.mark >= 0 and self.total - self.mark > MAX_TAR_HEADER_BYTES:
            raise UnsafeArchive(f"archive has more than {MAX_TAR_HEADER_BYTES} bytes of tar "
                                f"headers or skipped data after member {self.member!r}",
                                member=self.member)
        if self.total > self.tree.budget:
            t = self.tree
            raise UnsafeArchive(
                f"archive expands to more than {t.budget} bytes, {t.limits.max_ratio:g} times "
                f"its {t.archive_size} bytes (limit unpack_max_ratio): a compression bomb? "
                f"refused at member {self.member!r}", member=self.member)
        buf[:n] = data
        return n


_COMPRESSED = ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _decompressor(raw: IO[bytes]) -> IO[bytes]:
    head = raw.read(6)
    raw.seek(0)
    for magic, cls in _COMPRESSED:
        if head.startswith(magic):
            return cls(fileobj=raw) if cls is gzip.GzipFile else cls(raw)  # type: ignore
    return raw


def _archive_kind(archive: Path) -> str:
    """"tar" or "zip", by content (artifacts are cached as "<sha256>.artifact"); reads one
    tar header at most, never a whole member (tarfile.is_tarfile would read a pax record)."""
    with open(archive, "rb") as raw:
        try:
            block = _decompressor(raw).read(tarfile.BLOCKSIZE)
        except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise UnsafeArchive(f"{str(archive)!r} is a corrupt archive: {exc}") from exc
    if len(block) == tarfile.BLOCKSIZE:
        try:
            tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            return "tar"
        except tarfile.HeaderError:
            pass
    if zipfile.is_zipfile(archive):
        return "zip"
    raise UnsafeArchive(f"{str(archive)!r} is neither a tar (plain, gz, bz2, xz) nor a zip "
                        f"archive")


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file that :func:`unpack` would take for a tar or zip archive.
    Reads one header at most (unlike ``tarfile.is_tarfile``); never raises for bad data."""
    try:
        return Path(path).is_file() and _archive_kind(Path(path)) in ("tar", "zip")
    except UnsafeArchive:
        return False


def _tar_member(ti: tarfile.TarInfo) -> _Member:
    name = _normalize(ti.name, ti.name)
    if ti.isreg():
        return _Member(name, "file", ti.mode, float(ti.mtime), "", ti.size, ti.name)
    if ti.isdir():
        return _Member(name, "dir", 0o755, float(ti.mtime), "", 0, ti.name)
    if ti.issym():
        return _Member(name, "symlink", 0o777, float(ti.mtime), ti.linkname, 0, ti.name)
    if ti.islnk():
        return _Member(name, "hardlink", ti.mode, float(ti.mtime),
                       _normalize(ti.linkname, ti.linkname), 0, ti.name)
    what = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
            tarfile.FIFOTYPE: "a fifo"}.get(ti.type, f"of tar type {ti.type!r}")
    raise UnsafeArchive(f"archive member {ti.name!r} is {what}; only files, directories and "
                        f"links are allowed", member=ti.name)


def _extract_tar(archive: Path, tree: _Tree) -> None:
    with open(archive, "rb") as raw:
        stream = _Counting(_decompressor(raw), tree)
        # Stream mode: one pass, members in order; nothing is kept but the headers.
        with tarfile.open(fileobj=stream, mode="r|",  # type: ignore[call-overload]
                          encoding="utf-8", errors="surrogateescape") as tf:
            while True:
                stream.between_members()
                ti = tf.next()
                if ti is None:
                    return
                m = _tar_member(ti)
                stream.in_member(m.raw)
                if m.kind == "file":
                    src = tf.extractfile(ti)
                    assert src is not None
                    with src:
                        tree.add(m, src.read)
                else:
                    tree.add(m)
                tf.members.clear()  # stream mode keeps every TarInfo otherwise


def _zip_time(zi: zipfile.ZipInfo) -> float:
    try:
        return time.mktime(zi.date_time + (0, 0, -1))
    except (OverflowError, ValueError):
        return 0.0


def _extract_zip(archive: Path, tree: _Tree) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > tree.limits.max_members:
            raise UnsafeArchive(f"archive has {len(infos)} members, more than "
                                f"{tree.limits.max_members} (limit unpack_max_members)")
        for zi in infos:
            name = _normalize(zi.filename.replace("\\", "/"), zi.filename)
            mode = zi.external_attr >> 16  # Unix mode when created on Unix, else 0
            mtime = _zip_time(zi)
            if zi.is_dir():
                tree.add(_Member(name, "dir", 0o755, mtime, "", 0, zi.filename))
            elif stat.S_ISLNK(mode):
                # Info-ZIP stores a symlink as a member whose data is the target: read a
                # bounded amount of it, whatever the headers claim.
                with zf.open(zi) as f:
                    data = f.read(MAX_LINK_TARGET + 1)
                target = data.decode("utf-8", "surrogateescape")
                tree.add(_Member(name, "symlink", 0o777, mtime, target, 0, zi.filename))
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                raise UnsafeArchive(f"archive member {zi.filename!r} is a special file "
                                    f"(mode {oct(mode)}); only files, directories and links "
                                    f"are allowed", member=zi.filename)
            else:
                m = _Member(name, "file", stat.S_IMODE(mode) or 0o644, mtime, "",
                            zi.file_size, zi.filename)
                with zf.open(zi) as f:
                    tree.add(m, f.read)


_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error,
            lzma.LZMAError, RuntimeError, NotImplementedError, ValueError)


def unpack(archive: Path, target: Path, *, limits: Limits | None = None) -> None:
    """Unpack ``archive`` (tar, tar.gz/bz2/xz or zip, detected by content) into ``target``.

    Safe by construction (see the comment above :data:`MAX_UNPACKED_BYTES`): members are created
    one path component at a time without following symlinks; the archive is refused whole
    (:class:`UnsafeArchive`, naming the member and the rule or limit) for an absolute name, a
    ``..`` component, a path through a symlink or a file, a symlink leaving ``target``, a hard
    link to anything but an earlier regular file, a device or fifo, the reserved marker name,
    a name used twice, more than ``limits`` allow, or an unknown/corrupt format.

    Extraction happens in ``target.parent / ".tmp-<name>-<random>"``, which gets the release
    marker (version ``target.name``, the archive's sha256) and is then renamed to ``target``:
    ``target`` is never visible half-unpacked. The temporary directory is removed on any failure.
    Ownership is not restored; modes keep only the executable bits.

    Idempotent: if ``target`` already holds a marker with the archive's sha256, returns at once.

    Raises:
        FileExistsError: ``target`` exists without such a marker (never overwritten: it may be
            a running release).
        UnsafeArchive: see above. DiskFull: ENOSPC/EDQUOT under ``target.parent``.
    """
    archive, target = Path(archive), Path(target)
    digest = sha256_file(archive)
    if installed_sha256(target) == digest:
        log.info("unpack.present", target=str(target), sha256=digest)
        return
    _unpack(archive, target, sha256=digest, version=target.name, limits=limits or Limits())


def _unpack(archive: Path, target: Path, *, sha256: str, version: str, limits: Limits) -> None:
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, f"release directory exists and has no marker for "
                              f"sha256 {sha256}; refusing to overwrite it", str(target))
    kind = _archive_kind(archive)
    log.info("unpack.start", archive=str(archive), target=str(target), kind=kind)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(target.parent, exc) from exc
        raise
    try:
        root_fd = os.open(tmp, _NOFOLLOW_DIR)
        try:
            tree = _Tree(root_fd, tmp, limits, archive.stat().st_size)
            try:
                (_extract_tar if kind == "tar" else _extract_zip)(archive, tree)
            except _CORRUPT as exc:
                raise UnsafeArchive(f"{str(archive)!r} is a corrupt archive: "
                                    f"{type(exc).__name__}: {exc}") from exc
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    raise _disk_full(target.parent, exc) from exc
                if exc.errno is None:  # bz2/gzip say "invalid data" with a bare OSError
                    raise UnsafeArchive(f"{str(archive)!r} is a corrupt archive: "
                                        f"{exc}") from exc
                raise
            finally:
                tree.close()
        finally:
            os.close(root_fd)
        try:
            write_marker(tmp, version=version, sha256=sha256)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            os.rename(tmp, target)
            fsync_dir(target.parent)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _disk_full(target.parent, exc) from exc
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.exists():
                raise FileExistsError(errno.EEXIST, "release directory appeared while "
                                      "unpacking; refusing to overwrite it",
                                      str(target)) from exc
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, UnsafeArchive):
            log.error("unpack.rejected", archive=str(archive), member=exc.member,
                      reason=exc.reason)
        raise
    log.info("unpack.done", target=str(target), sha256=sha256, members=tree.members,
             bytes=tree.written)


def write_marker(directory: Path, *, version: str, sha256: str) -> None:
    """Write the release marker (last, atomically): a directory without one is not an
    installed release."""
    data = json.dumps({"version": version, "sha256": sha256,
                       "installed_at": datetime.now(UTC).isoformat()}).encode()
    atomic_write(directory / MARKER_NAME, data)


# marker path -> (what stat said of it, the digest it held): the agent asks on every cycle
# (prefetch, the cache's pruning), and a stat is one system call where reading and parsing
# the marker were four and a JSON parse. A marker is replaced by a rename (a new inode) or
# deleted with its release, either of which the stat shows.
_MARKERS: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
_MARKERS_MAX = 4096


def installed_sha256(release_dir: Path) -> str | None:
    """The sha256 recorded in ``release_dir``'s marker; None if absent, unreadable or malformed.
    Never raises for a bad marker: a release without a valid marker is simply not installed."""
    marker = os.path.join(release_dir, MARKER_NAME)
    try:
        st = os.stat(marker)
    except (OSError, ValueError):
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    known = _MARKERS.get(marker)
    if known is not None and known[0] == key:
        return known[1]
    sha = _read_marker(marker)
    if len(_MARKERS) >= _MARKERS_MAX:
        _MARKERS.clear()
    _MARKERS[marker] = (key, sha)
    return sha


def _read_marker(marker: str) -> str | None:
    try:
        with open(marker, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    sha = data.get("sha256")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        return None
    if not isinstance(data.get("version"), str):
        return None
    return sha


# ------------------------------------------------------------------------------------- install

def install_release(urls: Sequence[str], sha256: str, releases_dir: Path, version: str,
                    cache_dir: Path, *, size: int, file_root: Path | str | None = None,
                    limits: Limits | None = None, progress: ProgressFn | None = None) -> Path:
    """Make ``releases_dir / version`` hold the release with digest ``sha256``; return it.

    Downloads to ``cache_dir / f"{sha256}.artifact"`` (see :func:`download`), then unpacks it
    (see :func:`unpack`) with a marker ``{"version", "sha256", "installed_at"}`` written inside
    the temporary directory before the rename, so a release dir is installed iff it has a
    valid marker.

    Idempotent: a release dir whose marker has ``sha256`` is returned at once, without touching
    the network or the cache.

    ``cache_dir`` is made (or reset to) mode 0700: artifacts may be copies of files only root
    may read. ``size`` (the staged size) and ``file_root`` go to :func:`download`,
    ``limits`` (default :class:`Limits`) to the unpack.

    Raises:
        VerificationError: the release dir's marker names a *different* sha256 (never overwritten:
            it may be running), or the download does not verify.
        FileExistsError: the release dir exists without a valid marker.
        ValueError: ``version`` is not a safe directory name, or bad sha256/size.
        DownloadError, UnsafeArchive, DiskFull: from download/unpack.
    """
    sha256 = _check_sha256(sha256)
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"version {version!r} is not a valid release directory name "
                         f"(letters, digits, '_.+-', not starting with '.' or '-')")
    releases_dir, cache_dir = Path(releases_dir), Path(cache_dir)
    release = releases_dir / version
    present = installed_sha256(release)
    if present == sha256:
        log.info("install.present", version=version, sha256=sha256, release=str(release))
        return release
    if present is not None:
        raise VerificationError(
            f"release directory {str(release)!r} already holds version {version} with sha256 "
            f"{present}, but sha256 {sha256} was staged; a version must not change its bytes "
            f"(stage it under a new version)", expected=sha256, actual=present)
    _private_dir(cache_dir)
    artifact = download(urls, sha256, cache_dir / f"{sha256}.artifact", size=size,
                        file_root=file_root, progress=progress)
    try:
        releases_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(releases_dir, exc) from exc
        raise
    _unpack(artifact, release, sha256=sha256, version=version, limits=limits or Limits())
    log.info("install.done", version=version, sha256=sha256, release=str(release))
    return release


def _private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # also a cache made by an older version, 0755
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(directory, exc) from exc
        raise


_CACHE_NAME = re.compile(r"^([0-9a-f]{64})\.artifact(\.part)?$")


def prune_cache(cache_dir: Path, keep: set[str]) -> list[str]:
    """Delete every artifact (and partial download) in ``cache_dir`` whose sha256 is not in
    ``keep``; return the names removed. Other names are not ours and stay. The caller keeps
    the digests still being fetched or not yet installed."""
    removed = []
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return []
    for name in sorted(names):
        m = _CACHE_NAME.match(name)
        if not m or m.group(1) in keep:
            continue
        path = Path(cache_dir) / name
        try:
            path.unlink()
            removed.append(name)
        except OSError as exc:
            log.warning("cache.prune_failed", path=str(path), error=str(exc))
    if removed:
        log.info("cache.pruned", directory=str(cache_dir), removed=removed)
    return removed
