#!/usr/bin/env python3
"""What a compression bomb costs a host before fetch.unpack refuses it, against the bound.

Builds a zip and a tar.gz of ``--members`` members of 1 MiB of zeros each (~1000:1), unpacks
each with the default limits, and measures the bytes written to disk before the refusal (the
temporary release directory is kept for the measurement, then removed). The bound is
``Limits().budget(archive size)`` = 200 x the archive's size:

    python bench/unpack_bombs.py [--members 1024] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import structlog

from supervisor_dcdeploy import fetch

MiB = 1 << 20


def build(work: Path, members: int) -> list[Path]:
    zeros = bytes(MiB)
    z = work / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for i in range(members):
            zf.writestr(f"z{i}.bin", zeros)
    t = work / "bomb.tar.gz"
    with tarfile.open(t, "w:gz", compresslevel=9) as tf:
        for i in range(members):
            ti = tarfile.TarInfo(f"z{i}.bin")
            ti.size = MiB
            tf.addfile(ti, io.BytesIO(zeros))
    return [z, t]


def measure(archive: Path, work: Path, expands_to: int) -> dict:
    kept: list[Path] = []
    real_rmtree = shutil.rmtree
    fetch.shutil.rmtree = lambda p, **kw: kept.append(Path(p))  # type: ignore[assignment]
    releases = work / f"releases-{archive.name}"
    releases.mkdir()
    error = None
    try:
        fetch.unpack(archive, releases / "1")
    except fetch.UnsafeArchive as exc:
        error = exc.reason
    finally:
        fetch.shutil.rmtree = real_rmtree  # type: ignore[assignment]
    written = sum((Path(d) / f).lstat().st_size
                  for p in kept for d, _, files in os.walk(p) for f in files)
    size = archive.stat().st_size
    budget = fetch.Limits().budget(size)
    return {"archive": archive.name, "archive_bytes": size,
            "expands_to": expands_to,
            "written_bytes": written, "budget_bytes": budget,
            "written_over_budget": round(written / budget, 3), "refused": error is not None,
            "reason": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    work = Path(tempfile.mkdtemp(prefix="dcdeploy-unpack-bench-"))
    try:
        results = []
        for archive in build(work, args.members):
            results.append(measure(archive, work, args.members * MiB))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"members": args.members, "results": results}))
    else:
        for r in results:
            print(f"{r['archive']}: {r['expands_to']} bytes in {r['archive_bytes']} "
                  f"({r['expands_to'] / r['archive_bytes']:.0f}:1); refused={r['refused']} "
                  f"after {r['written_bytes']} bytes written = {r['written_over_budget']} x "
                  f"the bound {r['budget_bytes']} (200 x archive)")
    return 0 if all(r["refused"] and r["written_bytes"] <= r["budget_bytes"]
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
