"""Private torrents for releases: creation (torf), infohash, whole-artifact sha256.

The announce URL points at the agent's own loopback tracker (``http://127.0.0.1:6969/announce``
by default), so every host's Transmission asks its own agent, which answers from the store:
there is no central tracker. The torrent is private (BEP 27): Transmission then never uses
DHT, PEX or LPD for it, whatever the session settings say.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import structlog

from ..files import sha256_file
from .bencode import BencodeError, decode, info_span

log = structlog.get_logger("dcdeploy.p2p.torrent")

DEFAULT_ANNOUNCE = "http://127.0.0.1:6969/announce"
KiB = 1024
MiB = 1024 * KiB

# Piece size bounds. Small pieces let a host re-share data sooner (a piece is served only once
# it is complete and hash-checked) and spread one artifact over more peers; very small pieces
# cost per-piece overhead (HAVE messages to every peer, bitfield size, SHA-1 per piece).
PIECE_MIN = 64 * KiB
PIECE_MAX = 16 * MiB
TARGET_PIECES = 1024


def piece_size_for(size: int, *, target_pieces: int = TARGET_PIECES,
                   minimum: int = PIECE_MIN, maximum: int = PIECE_MAX) -> int:
    """The piece size for an artifact of ``size`` bytes: the smallest power of two that
    gives at most ``target_pieces`` pieces, clamped to [minimum, maximum].

    256 MiB -> 256 KiB (1024 pieces); 4 GiB -> 4 MiB; 1 MiB -> 64 KiB. Pure."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    piece = minimum
    while piece < maximum and piece * target_pieces < size:
        piece *= 2
    return piece


def make_torrent(path: Path, *, announce: str = DEFAULT_ANNOUNCE,
                 webseeds: Sequence[str] = (),
                 progress: Callable[[int, int], None] | None = None,
                 threads: int = 2, piece_size: int | None = None) -> tuple[bytes, str]:
    """Hash ``path`` (a file or a directory) into a private torrent.

    Returns (metainfo bytes, infohash as 40 lowercase hex digits). ``webseeds`` become the
    BEP 19 ``url-list`` (for a single file: the URL of the file itself). ``progress`` is
    called with (pieces hashed, pieces total) at most about 4 times a second. ``piece_size``
    overrides :func:`piece_size_for` (benchmarks). Deterministic for the same content and
    arguments (no creation date), so staging the same file twice gives the same infohash.
    Raises :class:`FileNotFoundError` when ``path`` does not exist and :class:`ValueError`
    when it holds no data."""
    import torf  # imported here: torf is only needed on the build host

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    size = artifact_size(path)
    if size == 0:
        raise ValueError(f"{path}: empty (a release needs at least one non-empty file)")
    chosen = piece_size or piece_size_for(size)
    t = torf.Torrent(path=str(path), trackers=[announce], webseeds=list(webseeds) or None,
                     private=True, created_by="supervisor-dcdeploy", creation_date=None,
                     piece_size_min=min(PIECE_MIN, chosen), piece_size_max=max(PIECE_MAX, chosen))
    t.piece_size = chosen

    def callback(_t: object, _path: str, done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)

    log.info("torrent.hashing", path=str(path), size=size, piece_size=chosen,
             pieces=-(-size // chosen), threads=threads)
    if not t.generate(threads=threads, callback=callback, interval=0.25):
        raise RuntimeError(f"{path}: hashing was interrupted")
    if progress is not None:
        progress(t.pieces, t.pieces)
    metainfo = t.dump()
    return metainfo, infohash(metainfo)


def infohash(metainfo: bytes) -> str:
    """SHA-1 of the bencoded ``info`` dictionary, as 40 lowercase hex digits.

    Raises :class:`ValueError` (a :class:`BencodeError`) for bytes that are not a metainfo."""
    start, end = info_span(metainfo)
    return hashlib.sha1(metainfo[start:end]).hexdigest()


def check_metainfo(metainfo: bytes) -> None:
    """Raise :class:`BencodeError` naming the problem unless ``metainfo`` is a single- or
    multi-file metainfo (BEP 3) that the functions below can read: bounded bencoding
    (depth, size, integer digits; see :mod:`.bencode`), an ``info`` dictionary with a valid
    ``name``, a positive ``piece length``, ``pieces`` in 20-byte hashes, and either a
    ``length`` or a list of ``files`` with lengths and paths."""
    data = decode(metainfo)
    info_span(metainfo)
    if not isinstance(data, dict) or not isinstance(data.get(b"info"), dict):
        raise BencodeError("metainfo has no 'info' dictionary")
    info = data[b"info"]
    torrent_name(metainfo)
    piece_length = info.get(b"piece length")
    if not isinstance(piece_length, int) or piece_length <= 0:
        raise BencodeError(f"metainfo has a bad 'piece length' {piece_length!r}")
    pieces = info.get(b"pieces")
    if not isinstance(pieces, bytes) or len(pieces) % 20:
        raise BencodeError("metainfo 'pieces' is not a string of 20-byte hashes")
    if b"length" in info:
        if not isinstance(info[b"length"], int) or info[b"length"] < 0:
            raise BencodeError(f"metainfo has a bad 'length' {info[b'length']!r}")
        return
    files = info.get(b"files")
    if not isinstance(files, list) or not files:
        raise BencodeError("metainfo has neither 'length' nor a list of 'files'")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get(b"length"), int) \
                or entry[b"length"] < 0:
            raise BencodeError(f"metainfo 'files'[{i}] has no valid 'length'")
        path = entry.get(b"path")
        if not isinstance(path, list) or not path or \
                not all(isinstance(p, bytes) and p not in (b"", b".", b"..") and b"/" not in p
                        for p in path):
            raise BencodeError(f"metainfo 'files'[{i}] has no valid 'path'")


def torrent_name(metainfo: bytes) -> str:
    """The ``info.name`` of a metainfo: the file name (single file) or top directory."""
    data = decode(metainfo)
    if not isinstance(data, dict) or not isinstance(data.get(b"info"), dict):
        raise BencodeError("metainfo has no 'info' dictionary")
    name = data[b"info"].get(b"name")
    if not isinstance(name, bytes) or not name or b"/" in name or name in (b".", b".."):
        raise BencodeError(f"metainfo has a bad name {name!r:.80}")
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise BencodeError(f"metainfo name {name!r:.80} is not UTF-8") from None


def torrent_size(metainfo: bytes) -> int:
    """Total payload bytes described by a metainfo."""
    info = decode(metainfo)[b"info"]  # type: ignore[index]
    if b"length" in info:
        return int(info[b"length"])
    return sum(int(f[b"length"]) for f in info[b"files"])


def web_seeds(metainfo: bytes) -> list[str]:
    """The BEP 19 ``url-list`` of a metainfo (one URL or a list; empty when absent)."""
    data = decode(metainfo)
    raw = data.get(b"url-list") if isinstance(data, dict) else None
    if isinstance(raw, bytes):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    return [u.decode("utf-8", "replace") for u in raw if isinstance(u, bytes) and u]


def piece_count(metainfo: bytes) -> int:
    """Number of pieces of a metainfo (20 bytes of SHA-1 each in ``info.pieces``)."""
    info = decode(metainfo)[b"info"]  # type: ignore[index]
    return len(info[b"pieces"]) // 20


def artifact_size(path: Path) -> int:
    """Bytes in a file, or in every regular file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in _files(path))


def _files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
                  key=lambda p: p.relative_to(root).as_posix())


def artifact_sha256(path: Path) -> str:
    """The sha256 staged for an artifact and checked after download.

    A single file: the sha256 of its bytes (what ``sha256sum FILE`` prints). A directory
    (multi-file torrent): the sha256 of its manifest, the UTF-8 text of one line
    ``"<sha256 of file>  <path relative to the directory, '/'-separated>\\n"`` per regular
    file, sorted by that path, i.e. what ``(cd DIR && find . -type f | sed 's|^./||' | sort |
    xargs sha256sum) | sha256sum`` prints (for names without spaces). Empty files count;
    symlinks are ignored (torf does not follow them into the torrent either)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(path).as_posix()}\n"
                    for p in _files(path))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def free_bytes(directory: Path) -> int:
    """Bytes available to an unprivileged writer in ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
