"""Builders of hostile release archives (issue 8), shared by the unit tests of fetch.py
(tests/test_unpack_safety.py) and the through-the-agent ones (tests/test_hostile_releases.py)."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

# ("file", name, data[, mode]) | ("dir", name) | ("sym"|"hard", name, target)
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
                                "hard": (tarfile.LNKTYPE, 0o644)}[kind]
            if kind in ("sym", "hard"):
                ti.linkname = rest[0]
            tf.addfile(ti)
    return path


def make_zip(path: Path, entries: list[Entry]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for kind, name, *rest in entries:
            zi = zipfile.ZipInfo(name.rstrip("/") + "/" if kind == "dir" else name)
            zi.compress_type = zipfile.ZIP_DEFLATED
            if kind == "dir":
                zi.external_attr = (stat.S_IFDIR | 0o755) << 16
                zf.writestr(zi, b"")
            elif kind == "sym":
                zi.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(zi, rest[0])
            else:
                zi.external_attr = (stat.S_IFREG | (rest[1] if len(rest) > 1 else 0o644)) << 16
                zf.writestr(zi, rest[0])
    return path


def make(kind: str, path: Path, entries: list[Entry]) -> Path:
    return make_zip(path, entries) if kind == "zip" else make_tar(path, entries)


def tar_entries(path: Path) -> list[Entry]:
    """The regular files and directories of a tar (e.g. the sample release) as entries."""
    out: list[Entry] = []
    with tarfile.open(path) as tf:
        for ti in tf.getmembers():
            if ti.isdir():
                out.append(("dir", ti.name))
            elif ti.isreg():
                out.append(("file", ti.name, tf.extractfile(ti).read(), ti.mode))  # type: ignore[union-attr]
    return out


def aliased_chain(depth: int = 16) -> list[Entry]:
    """The proof of concept of issue 8: every link looks harmless by its literal name.
    ``a16 -> a15 -> ... -> a1 -> d``, then ``a16/l -> ..`` is created *through* 16 symlinks,
    so it really is ``d/l`` (= the release root) while a name-based check files it as
    ``a16/l``. ``b -> d/l/..`` then looks like ``d`` but is the release's parent, and
    ``b/evil`` lands outside."""
    entries: list[Entry] = [("dir", "d"), ("sym", "a1", "d")]
    entries += [("sym", f"a{i}", f"a{i - 1}") for i in range(2, depth + 1)]
    entries += [("sym", f"a{depth}/l", ".."), ("sym", "b", "d/l/.."),
                ("file", "b/evil", b"owned\n")]
    return entries


def merge_tars(first: Path, second: Path) -> bytes:
    """One tar.gz holding the members of ``first`` then those of ``second``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as dst:
        for path in (first, second):
            with tarfile.open(path) as src:
                for ti in src.getmembers():
                    dst.addfile(ti, src.extractfile(ti) if ti.isreg() else None)
    return out.getvalue()


def zip_bomb(path: Path, members: int = 128, member_bytes: int = MiB) -> Path:
    """``members`` files of ``member_bytes`` zeros, deflated at level 9 (~1000:1); each
    member's declared size is small, only the total is large."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for i in range(members):
            zf.writestr(f"z{i:03}.bin", bytes(member_bytes))
    return path


def tar_bomb(path: Path, members: int = 128, member_bytes: int = MiB) -> Path:
    """The same as a tar.gz at level 9: ~1000:1."""
    zeros = bytes(member_bytes)
    with tarfile.open(path, "w:gz", compresslevel=9) as tf:
        for i in range(members):
            ti = tarfile.TarInfo(f"z{i:03}.bin")
            ti.size = member_bytes
            tf.addfile(ti, io.BytesIO(zeros))
    return path
