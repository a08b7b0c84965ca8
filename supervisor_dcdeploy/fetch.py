"""Fetch, verify and unpack release artifacts (DESIGN §4 step 2, §5 S3/S5, §6 disk full).

A host may only switch to bytes whose sha256 matches the staged one (S3), and whatever it leaves
on disk must survive ``kill -9`` at any point (S5). So every step here is built from atomic moves:

* :func:`download` streams into ``<dest>.part`` (resumed with an HTTP ``Range`` request after an
  interruption), verifies it, fsyncs it and only then renames it to ``dest``. ``dest`` therefore
  exists only with verified content.
* :func:`unpack` extracts into a hidden temporary sibling of the release directory, after checking
  *every* member before writing any byte, writes the release marker inside it, and renames it into
  place. A release directory is therefore either absent or complete with a valid marker.
* :func:`install_release` chains the two and is idempotent on the marker.

Errors form one family, :class:`FetchError`, whose ``reason`` is a sentence naming the problem and
the value, fit to show to an operator.

Not safe for two concurrent calls with the same ``dest`` (they would append to the same
``.part``): the agent fetches one artifact at a time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import requests
import structlog
import tenacity
import urllib3

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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Makes a rename/creation in `directory` durable across power loss, not only kill -9.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

def download(urls: Sequence[str], sha256: str, dest: Path, *, size: int | None = None,
             progress: ProgressFn | None = None, timeout: float = 30.0) -> Path:
    """Fetch the artifact with digest ``sha256`` to ``dest`` and return ``dest``.

    ``urls`` (schemes ``http``, ``https``, ``file``) are tried in order; transient network errors
    (connection errors, timeouts, truncated bodies, 408/429/5xx) are retried on the same URL with
    jittered exponential backoff under a deadline, each retry resuming where the data stopped.

    Partial data is kept at ``dest + ".part"`` and resumed with an HTTP ``Range`` request by the
    next attempt or the next call; a server answering 200 instead of 206 restarts from zero.
    The sha256 (and ``size``, if given) is checked *before* ``.part`` is fsynced and renamed to
    ``dest``, so ``dest`` only ever holds verified bytes.

    Idempotent: if ``dest`` already exists with the right digest, returns at once without any
    request. A ``dest`` with a wrong digest (a corrupt cache) is deleted and fetched again.

    ``progress(done_bytes, total_bytes_or_None)`` is called at most ~10 times per second, and once
    more when the download completes.

    Raises:
        VerificationError: the fetched bytes have the wrong sha256 or size; ``.part`` is deleted
            so the next call starts afresh.
        DownloadError: every URL failed; the error is the last URL's (``url``, ``status``).
            A ``.part`` is kept for resumption.
        DiskFull: ENOSPC/EDQUOT in ``dest``'s directory. The ``.part`` is deleted: on a full
            disk the running release (its logs, the agent's own state files) matters more than
            the bytes already fetched, so we give the space back.
        ValueError: no URL, a malformed sha256 or a negative size.
    """
    sha256 = _check_sha256(sha256)
    if not urls:
        raise ValueError("no URL given for artifact " + sha256)
    if size is not None and size < 0:
        raise ValueError(f"size must be >= 0, got {size!r}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")

    if dest.exists():
        actual = _sha256_file(dest)
        if actual == sha256 and (size is None or dest.stat().st_size == size):
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
            _fetch_with_retries(url, part, sha256, size, report, timeout)
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
            _fsync_dir(dest.parent)
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


def _fetch_with_retries(url: str, part: Path, sha256: str, size: int | None,
                        report: _Progress, timeout: float) -> None:
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
    retrying(_fetch_once, url, part, sha256, size, report, timeout)


class _PartWriter:
    """Appends to ``.part`` while keeping a running sha256 of its whole content."""

    def __init__(self, part: Path, restart: bool) -> None:
        self.part = part
        self.hasher = hashlib.sha256()
        self.done = 0
        try:
            # Owned by this object across calls; closed by close().
            self._f: IO[bytes] = open(part, "wb" if restart else "ab")  # noqa: SIM115
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

    def write(self, data: bytes) -> None:
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


def _fetch_once(url: str, part: Path, sha256: str, size: int | None,
                report: _Progress, timeout: float) -> None:
    """One attempt at one URL: resume ``part``, stream the rest, verify. Raises on any failure."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        log.warning("fetch.part_oversized", part=str(part), offset=offset, size=size)
        offset = 0
    if size is not None and offset == size:
        # Complete but unverified (killed between write and rename): verify without a request.
        writer = _PartWriter(part, restart=False)
        writer.close()
        _verify(writer, sha256, size, url)
        return

    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        _fetch_http(url, part, offset, sha256, size, report, timeout)
    elif scheme == "file":
        _fetch_file(url, part, offset, sha256, size, report)
    else:
        raise DownloadError(f"unsupported URL scheme {scheme!r} in {_redact(url)!r}; "
                            f"use http, https or file", url=url)


def _stream(chunks: Iterator[bytes], writer: _PartWriter, total: int | None, size: int | None,
            report: _Progress) -> None:
    for chunk in chunks:
        writer.write(chunk)
        if size is not None and writer.done > size:
            # Don't let a wrong or hostile server fill the disk: we already know it's bad.
            raise VerificationError(
                f"artifact is larger than the staged size {size} bytes (got at least "
                f"{writer.done})", expected=size, actual=writer.done, what="size")
        report(writer.done, total)


def _fetch_http(url: str, part: Path, offset: int, sha256: str, size: int | None,
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
        writer = _PartWriter(part, restart=restart)
        try:
            total = size if size is not None else (
                writer.done + expected_body if expected_body is not None else None)
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


def _content_range_start(value: str) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value)
    return int(m.group(1)) if m else None


def _fetch_file(url: str, part: Path, offset: int, sha256: str, size: int | None,
                report: _Progress) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"file URL {url!r} names a remote host {parts.netloc!r}; "
                            f"only local files are supported", url=url)
    source = urllib.request.url2pathname(parts.path)
    try:
        src = open(source, "rb")  # noqa: SIM115 -- closed by the `with src` below
    except OSError as exc:
        raise DownloadError(f"cannot read {url!r}: {exc.strerror}", url=url) from exc
    with src:
        total = size if size is not None else os.fstat(src.fileno()).st_size
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


def _verify(writer: _PartWriter, sha256: str, size: int | None, url: str) -> None:
    if size is not None and writer.done != size:
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

@dataclass(frozen=True)
class _Member:
    name: str           # normalized relative POSIX path, no "." / ".." components
    kind: str           # "file" | "dir" | "symlink" | "hardlink"
    mode: int
    mtime: float
    link: str = ""      # symlink target as written, or hardlink target (normalized)
    source: Any = None  # the TarInfo / ZipInfo to read the data from


def _normalize(name: str, raw: str) -> str:
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise UnsafeArchive(f"archive member {raw!r} has an absolute path", member=raw)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {raw!r} contains a '..' component", member=raw)
    return "/".join(parts)


def _tar_members(tf: tarfile.TarFile) -> list[_Member]:
    out = []
    for ti in tf.getmembers():
        name = _normalize(ti.name, ti.name)
        if ti.isdir():
            kind, link = "dir", ""
        elif ti.isreg():
            kind, link = "file", ""
        elif ti.issym():
            kind, link = "symlink", ti.linkname
        elif ti.islnk():
            kind, link = "hardlink", _normalize(ti.linkname, ti.linkname)
        else:
            what = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                    tarfile.FIFOTYPE: "a fifo"}.get(ti.type, f"of tar type {ti.type!r}")
            raise UnsafeArchive(f"archive member {ti.name!r} is {what}; only files, "
                                f"directories and links are allowed", member=ti.name)
        out.append(_Member(name, kind, ti.mode, float(ti.mtime), link, ti))
    return out


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for zi in zf.infolist():
        name = _normalize(zi.filename.replace("\\", "/"), zi.filename)
        mode = zi.external_attr >> 16  # Unix mode when created on Unix, else 0
        mtime = time.mktime(zi.date_time + (0, 0, -1))
        if zi.is_dir():
            out.append(_Member(name, "dir", 0o755, mtime, "", zi))
        elif stat.S_ISLNK(mode):
            # Info-ZIP stores a symlink as a member whose data is the target.
            target = zf.read(zi).decode("utf-8", "surrogateescape")
            out.append(_Member(name, "symlink", 0o777, mtime, target, zi))
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            raise UnsafeArchive(f"archive member {zi.filename!r} is a special file "
                                f"(mode {oct(mode)}); only files, directories and links "
                                f"are allowed", member=zi.filename)
        else:
            out.append(_Member(name, "file", stat.S_IMODE(mode) or 0o644, mtime, "", zi))
    return out


def _resolve(path: str, symlinks: dict[str, str], member: str, depth: int = 0) -> list[str]:
    """Resolve ``path`` (relative to the release root) through the archive's own symlinks,
    the way the kernel will once extracted. Lexical normalisation is not enough: with
    ``a -> .``, ``a/..`` is the root's parent. Raises UnsafeArchive when it leaves the root."""
    if depth > 40:
        raise UnsafeArchive(f"archive member {member!r}: too many levels of symbolic links",
                            member=member)
    resolved: list[str] = []
    pending = [p for p in path.split("/") if p not in ("", ".")]
    while pending:
        comp = pending.pop(0)
        if comp == "..":
            if not resolved:
                raise UnsafeArchive(f"archive member {member!r} resolves outside the release "
                                    f"directory", member=member)
            resolved.pop()
            continue
        candidate = "/".join(resolved + [comp])
        target = symlinks.get(candidate)
        if target is None:
            resolved.append(comp)
            continue
        if target.startswith("/"):
            raise UnsafeArchive(f"archive member {member!r} goes through an absolute symlink "
                                f"{candidate!r} -> {target!r}", member=member)
        base = "/".join(resolved)
        resolved = _resolve(posixpath.join(base, target), symlinks, member, depth + 1)
    return resolved


def _check_members(members: list[_Member]) -> None:
    """Refuse the whole archive if any member could write outside the release directory."""
    symlinks = {m.name: m.link for m in members if m.kind == "symlink"}
    kinds: dict[str, str] = {}
    for m in members:
        if not m.name:
            if m.kind == "dir":
                continue  # "./" entry: the root itself
            raise UnsafeArchive(f"archive member of kind {m.kind} has an empty name", member="")
        if m.name.startswith(MARKER_NAME):  # the marker and its temporary file
            raise UnsafeArchive(f"archive member {m.name!r} uses a name reserved for the "
                                f"release marker", member=m.name)
        previous = kinds.get(m.name)
        # A name redefined with another type (e.g. a dir, later a symlink) would make
        # validation depend on extraction order: refuse it; repeated dirs/files are harmless.
        if previous is not None and (previous != m.kind or m.kind in ("symlink", "hardlink")):
            raise UnsafeArchive(f"archive member {m.name!r} appears twice ({previous}, then "
                                f"{m.kind})", member=m.name)
        kinds[m.name] = m.kind
        # The parent path must stay inside even after following symlinks (l -> .., l/x).
        parent = posixpath.dirname(m.name)
        _resolve(parent, symlinks, m.name)
        if m.kind == "symlink":
            if m.link.startswith("/"):
                raise UnsafeArchive(f"archive member {m.name!r} is a symlink to the absolute "
                                    f"path {m.link!r}", member=m.name)
            _resolve(posixpath.join(parent, m.link), symlinks, m.name)
        elif m.kind == "hardlink":
            if kinds.get(m.link) != "file":
                raise UnsafeArchive(f"archive member {m.name!r} is a hard link to {m.link!r}, "
                                    f"which is not a regular file earlier in the archive",
                                    member=m.name)
            _resolve(m.link, symlinks, m.name)


def _open_archive(archive: Path) -> tuple[str, Any]:
    # By content, not name: artifacts are cached as "<sha256>.artifact".
    try:
        if tarfile.is_tarfile(archive):
            return "tar", tarfile.open(archive, "r:*")
        if zipfile.is_zipfile(archive):
            return "zip", zipfile.ZipFile(archive)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UnsafeArchive(f"{str(archive)!r} is a corrupt archive: {exc}") from exc
    raise UnsafeArchive(f"{str(archive)!r} is neither a tar (plain, gz, bz2, xz) nor a zip "
                        f"archive")


def _extract(kind: str, handle: Any, members: list[_Member], root: Path) -> None:
    for m in members:
        if not m.name:
            continue
        path = root / m.name
        if m.kind == "dir":
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
            continue
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if m.kind == "symlink":
            os.symlink(m.link, path)
            continue
        if m.kind == "hardlink":
            os.link(root / m.link, path, follow_symlinks=False)
            continue
        src = handle.extractfile(m.source) if kind == "tar" else handle.open(m.source)
        # O_NOFOLLOW: never write through a symlink in the final component (repeated names).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK_SIZE)
            dst.flush()
            os.fsync(dst.fileno())  # the marker promises complete content, even after power loss
        # Keep the executable bits; drop setuid/setgid/sticky and group/world write.
        os.chmod(path, (m.mode & 0o755) | 0o600)
        os.utime(path, (m.mtime, m.mtime))


def unpack(archive: Path, target: Path) -> None:
    """Unpack ``archive`` (tar, tar.gz/bz2/xz or zip, detected by content) into ``target``.

    Every member is checked before anything is written; the archive is refused whole
    (:class:`UnsafeArchive`) for an absolute name, a ``..`` component, a symlink that is absolute
    or resolves (following the archive's own symlinks) outside ``target``, a hard link to
    anything but an earlier regular file inside, a device or fifo, the reserved marker name,
    or an unknown/corrupt format.

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
    digest = _sha256_file(archive)
    if installed_sha256(target) == digest:
        log.info("unpack.present", target=str(target), sha256=digest)
        return
    _unpack(archive, target, sha256=digest, version=target.name)


def _unpack(archive: Path, target: Path, *, sha256: str, version: str) -> None:
    if target.exists() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, f"release directory exists and has no marker for "
                              f"sha256 {sha256}; refusing to overwrite it", str(target))
    kind, handle = _open_archive(archive)
    with handle:
        try:
            members = _tar_members(handle) if kind == "tar" else _zip_members(handle)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise UnsafeArchive(f"{str(archive)!r} is a corrupt archive: {exc}") from exc
        try:
            _check_members(members)
        except UnsafeArchive as exc:
            log.error("unpack.rejected", archive=str(archive), member=exc.member,
                      reason=exc.reason)
            raise
        log.info("unpack.start", archive=str(archive), target=str(target), members=len(members))
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _disk_full(target.parent, exc) from exc
            raise
        try:
            try:
                _extract(kind, handle, members, tmp)
                write_marker(tmp, version=version, sha256=sha256)
                os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
                os.rename(tmp, target)
                _fsync_dir(target.parent)
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    raise _disk_full(target.parent, exc) from exc
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.exists():
                    raise FileExistsError(errno.EEXIST, "release directory appeared while "
                                          "unpacking; refusing to overwrite it",
                                          str(target)) from exc
                raise
            except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
                raise UnsafeArchive(f"{str(archive)!r} is a corrupt archive: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("unpack.done", target=str(target), sha256=sha256)


def write_marker(directory: Path, *, version: str, sha256: str) -> None:
    """Write the release marker (last, atomically): a directory without one is not an
    installed release."""
    data = json.dumps({"version": version, "sha256": sha256,
                       "installed_at": datetime.now(UTC).isoformat()}).encode()
    tmp = directory / (MARKER_NAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER_NAME)


def installed_sha256(release_dir: Path) -> str | None:
    """The sha256 recorded in ``release_dir``'s marker; None if absent, unreadable or malformed.
    Never raises for a bad marker: a release without a valid marker is simply not installed."""
    try:
        data = json.loads((Path(release_dir) / MARKER_NAME).read_bytes())
    except (OSError, ValueError):
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
                    cache_dir: Path, *, size: int | None = None,
                    progress: ProgressFn | None = None) -> Path:
    """Make ``releases_dir / version`` hold the release with digest ``sha256``; return it.

    Downloads to ``cache_dir / f"{sha256}.artifact"`` (see :func:`download`), then unpacks it
    (see :func:`unpack`) with a marker ``{"version", "sha256", "installed_at"}`` written inside
    the temporary directory before the rename, so a release dir is installed iff it has a
    valid marker.

    Idempotent: a release dir whose marker has ``sha256`` is returned at once, without touching
    the network or the cache.

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
    artifact = download(urls, sha256, cache_dir / f"{sha256}.artifact", size=size,
                        progress=progress)
    try:
        releases_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(releases_dir, exc) from exc
        raise
    _unpack(artifact, release, sha256=sha256, version=version)
    log.info("install.done", version=version, sha256=sha256, release=str(release))
    return release
