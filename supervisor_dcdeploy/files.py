"""File helpers used everywhere: the one atomic write, the one sha256 of a file, and the
directory fsync that makes a rename durable.

``atomic_write`` is for small files that readers must see whole (status.json, the release
marker, the trust counters, the swarm's node files). Release directories are made durable
by :mod:`.fetch` (unpack into a temporary directory, fsync, rename, :func:`fsync_dir`);
the local state's slot file by :mod:`.localstate` (in-place slot writes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, hex (what ``sha256sum FILE`` prints), read in 1 MiB
    blocks. Raises OSError when the file cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new bytes, never a mix,
    and (``durable``) the new bytes survive power loss once this returns; a report
    rewritten every cycle (status.json) does without the two fsyncs, a crash then loses
    only its last version. The file is made mode 0600 (``mkstemp``). Makes the parent
    directory if needed; raises OSError (a full disk, ...) with nothing left behind."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except FileNotFoundError:  # the directory first (looked for only then: status.json
        path.parent.mkdir(parents=True, exist_ok=True)  # is written every cycle)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation in ``directory`` durable across power loss, not only
    across a kill -9."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["atomic_write", "fsync_dir", "sha256_file"]
