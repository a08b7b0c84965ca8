"""Page-cache warming for releases (``preload`` per service).

Run *after* verification: Transmission's verify (and our sha256 read, if the file was not
cached) leaves the pages evictable, and Transmission explicitly drops checked files from the
cache (POSIX_FADV_DONTNEED). :func:`warm` reads every file so its pages are resident,
optionally pins up to ``mlock_cap`` bytes with ``mlock(2)`` and measures the result with
``mincore(2)``. Pinned mappings are held by *this process* until :func:`unlock` (or exit):
the agent, a long-lived process, owns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("dcdeploy.p2p.warm")

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value

_locked: dict[str, list[tuple[int, int, int]]] = {}  # path -> [(address, mapped, locked)]
_locked_lock = threading.Lock()


@dataclass(frozen=True)
class WarmResult:
    bytes_total: int
    bytes_resident: int
    bytes_locked: int
    mlock_error: str | None

    @property
    def resident_ratio(self) -> float:
        return self.bytes_resident / self.bytes_total if self.bytes_total else 1.0

    def to_status(self) -> dict[str, object]:
        """Flat dict for the agent's status."""
        return {"preload_total": self.bytes_total, "preload_resident": self.bytes_resident,
                "preload_locked": self.bytes_locked, "preload_error": self.mlock_error}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _map(fd: int, length: int) -> int:
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(addr)


def _mincore(addr: int, length: int) -> int:
    pages = (length + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(addr), length, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    resident = sum(1 for b in vec if b & 1)
    # The last page is partial: count only the file's bytes.
    if pages and vec[pages - 1] & 1:
        return (resident - 1) * PAGE + (length - (pages - 1) * PAGE)
    return resident * PAGE


def file_residency(path: Path) -> tuple[int, int]:
    """(resident, total) bytes of one file in the page cache."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _map(fd, size)
        try:
            return _mincore(addr, size), size
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def residency(path: Path) -> tuple[int, int]:
    """(resident, total) bytes of a file, or of every file under a directory, via mincore.
    Does not change what is cached."""
    resident = total = 0
    for f in _files(Path(path)):
        r, t = file_residency(f)
        resident += r
        total += t
    return resident, total


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (-1: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else soft


def warm(path: Path, *, mlock_cap: int = 0, chunk: int = 8 << 20) -> WarmResult:
    """Read ``path`` (file or directory) into the page cache; pin up to ``mlock_cap`` bytes.

    Reads every byte (``POSIX_FADV_WILLNEED`` alone is only a hint). With ``mlock_cap > 0``
    the files are mapped and locked, file by file, until the cap; a refusal (RLIMIT_MEMLOCK
    without CAP_IPC_LOCK, or no memory) stops locking and is reported in ``mlock_error``,
    never raised. Calling it again re-warms; locks taken before for ``path`` are released
    first. Raises :class:`OSError` only when the files cannot be read."""
    path = Path(path)
    unlock(path)
    files = _files(path)
    buf = bytearray(chunk)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size:
                os.posix_fadvise(fh.fileno(), 0, size, os.POSIX_FADV_WILLNEED)
            while fh.readinto(buf):
                pass
    locked, error = (_lock_files(path, files, mlock_cap) if mlock_cap > 0 else (0, None))
    resident, total = residency(path)
    result = WarmResult(total, resident, locked, error)
    log.info("warm.done", path=str(path), total=total, resident=resident, locked=locked,
             mlock_error=error)
    return result


def _lock_files(path: Path, files: list[Path], cap: int) -> tuple[int, str | None]:
    maps: list[tuple[int, int, int]] = []
    locked = 0
    error = None
    for f in files:
        if locked >= cap:
            break
        size = f.stat().st_size
        want = min(size, cap - locked)
        want -= want % PAGE if want < size else 0  # whole pages unless the whole file
        if want <= 0:
            break
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _map(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the file referenced
        if _libc.mlock(ctypes.c_void_p(addr), want) != 0:
            err = ctypes.get_errno()
            _libc.munmap(ctypes.c_void_p(addr), size)
            limit = memlock_limit()
            why = ("RLIMIT_MEMLOCK" if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN)
                   else "mlock")
            error = (f"mlock refused after {locked} of {cap} bytes: {os.strerror(err)} "
                     f"({why}={'unlimited' if limit < 0 else limit} bytes; raise it with "
                     "LimitMEMLOCK= / 'ulimit -l' or grant CAP_IPC_LOCK, or lower the cap)")
            break
        maps.append((addr, size, want))
        locked += want
    with _locked_lock:
        _locked[str(path)] = maps
    return locked, error


def unlock(path: Path) -> int:
    """Release the locks and mappings :func:`warm` holds for ``path``; return how many
    mappings were released. Idempotent."""
    with _locked_lock:
        maps = _locked.pop(str(Path(path)), [])
    for addr, size, locked in maps:
        _libc.munlock(ctypes.c_void_p(addr), locked)
        _libc.munmap(ctypes.c_void_p(addr), size)
    return len(maps)


def locked_bytes() -> int:
    """Bytes currently locked by this process through :func:`warm` (all paths)."""
    with _locked_lock:
        return sum(locked for maps in _locked.values() for _, _, locked in maps)


def drop_cache(path: Path) -> None:
    """Ask the kernel to evict ``path``'s pages (tests, benchmarks; what Transmission's
    verify does). Dirty pages are written first."""
    for f in _files(Path(path)):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
