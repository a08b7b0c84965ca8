"""Build sample releases: a tar.gz holding ``app.py`` and ``release.json``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from ...files import sha256_file

APP = Path(__file__).with_name("app.py")


def build_release(out_dir: Path, service: str, version: str, *, broken: bool = False,
                  padding: int = 0, broken_after: float | None = None) -> tuple[Path, str]:
    """Write ``<out_dir>/<service>-<version>.tar.gz``; return (path, sha256 hex).

    ``broken`` makes the release fail its health check (``broken_after``: from that many
    seconds after start); ``padding`` adds that many bytes of
    incompressible data (for distribution tests)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{service}-{version}{'-broken' if broken else ''}.tar.gz"
    release = {"service": service, "version": version, "broken": broken}
    if broken_after is not None:
        release["broken_after"] = broken_after
    meta = json.dumps(release).encode()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(APP, arcname="app.py")
        info = tarfile.TarInfo("release.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        if padding:
            import os
            blob = os.urandom(padding)
            info = tarfile.TarInfo("padding.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, sha256_file(path)


