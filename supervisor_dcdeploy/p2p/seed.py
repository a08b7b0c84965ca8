"""Build-host side: stage an artifact as a torrent and seed it.

``dcdeploy stage NAME VERSION --path FILE_OR_DIR [--webseed URL]`` calls :func:`stage` (hash,
sha256), writes the staged release with ``torrent=staged.metainfo_b64``, then :func:`add_seed`
so the build host's daemon seeds it from the original file (checked, never re-downloaded).
``dcdeploy seed start|stop|status`` call :func:`start`, :func:`stop`, :func:`status`; the
seeder can instead be a supervisord program running ``python -m supervisor_dcdeploy.p2p.node``
(docs/distribution.md).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import structlog

from .daemon import SECRET_FILE
from .node import SeedEntry, forget_seed, record_seed
from .swarm import SwarmFetcher
from .torrent import DEFAULT_ANNOUNCE, artifact_sha256, artifact_size, make_torrent

log = structlog.get_logger("dcdeploy.p2p.seed")


@dataclass(frozen=True)
class Staged:
    """What staging an artifact produced; the fields of ``StagedRelease`` it fills."""

    path: Path
    metainfo: bytes
    infohash: str
    sha256: str
    size: int

    @property
    def metainfo_b64(self) -> str:
        return base64.b64encode(self.metainfo).decode("ascii")


def stage(path: Path, *, announce: str = DEFAULT_ANNOUNCE, webseeds: Sequence[str] = (),
          progress: Callable[[int, int], None] | None = None, threads: int = 2) -> Staged:
    """Hash ``path`` into a private torrent and compute its sha256 (see
    :func:`~.torrent.artifact_sha256` for directories). Blocks for about size / disk speed;
    ``progress(pieces_done, pieces_total)``. Raises :class:`FileNotFoundError`,
    :class:`ValueError` (empty)."""
    path = Path(path).resolve()
    metainfo, ih = make_torrent(path, announce=announce, webseeds=webseeds, progress=progress,
                                threads=threads)
    sha = artifact_sha256(path)
    staged = Staged(path, metainfo, ih, sha, artifact_size(path))
    log.info("seed.staged", path=str(path), infohash=ih, sha256=sha, size=staged.size,
             webseeds=list(webseeds))
    return staged


@dataclass(frozen=True)
class SeedConfig:
    """Where and how the build host's seeder runs."""

    dir: Path
    store_url: str
    host: str
    address: str
    rack: str = "build"
    rpc_port: int = 9091
    peer_port: int = 51413
    tracker_port: int = 6969
    tracker_bind: str = "127.0.0.1"
    rpc_bind: str = "127.0.0.1"  # loopback only: the node refuses anything else
    tuning: dict | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "supervisor_dcdeploy.p2p.node", "--store", self.store_url,
               "--host", self.host, "--address", self.address, "--rack", self.rack,
               "--dir", str(self.dir), "--rpc-port", str(self.rpc_port),
               "--peer-port", str(self.peer_port), "--tracker-port", str(self.tracker_port),
               "--tracker-bind", self.tracker_bind, "--seed-check", "--rpc-bind", self.rpc_bind]
        if self.tuning:
            cmd += ["--tuning", json.dumps(self.tuning)]
        return cmd


def status(node_dir: Path) -> dict | None:
    """The running seeder's ``node.json`` (pid, rpc_url, ...), or None when not running."""
    info_path = Path(node_dir) / "node.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None
    try:
        pid = int(info["pid"])
    except (KeyError, ValueError):
        return None
    return info if pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie, killed but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def start(cfg: SeedConfig, *, wait: float = 60.0, prefix: Sequence[str] = ()) -> dict:
    """Start the seeder in the background (idempotent: returns the running one's info).

    ``prefix`` wraps the command (``["ip", "netns", "exec", NS]`` in tests). Blocks until
    the node wrote ``node.json``; raises :class:`RuntimeError` with the log's tail if it
    exits first, :class:`TimeoutError` after ``wait``."""
    running = status(cfg.dir)
    if running:
        return running
    cfg.dir.mkdir(parents=True, exist_ok=True)
    (cfg.dir / "node.json").unlink(missing_ok=True)
    logf = open(cfg.dir / "node.log", "ab")
    proc = subprocess.Popen([*prefix, *cfg.command()], stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    logf.close()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        info = status(cfg.dir)
        if info:
            log.info("seed.started", **info)
            return info
        if proc.poll() is not None:
            tail = (cfg.dir / "node.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"seeder exited with {proc.returncode}:\n{tail}")
        time.sleep(0.1)
    raise TimeoutError(f"seeder in {cfg.dir} not ready after {wait}s (see node.log)")


def stop(node_dir: Path, *, timeout: float = 30.0) -> bool:
    """SIGTERM the seeder and wait; returns False when none was running. Idempotent."""
    info = status(node_dir)
    if not info:
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            log.info("seed.stopped", pid=pid)
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    if info.get("daemon_pid"):
        try:
            os.kill(int(info["daemon_pid"]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def secret_file(node_dir: Path) -> Path:
    """The seeder daemon's RPC password file (made by the node at its first start)."""
    return Path(node_dir) / "transmission" / SECRET_FILE


def add_seed(node_dir: Path, rpc_url: str, staged: Staged, *, wait: float = 600.0,
             runner: Callable[[Callable[[], Any]], Any] | None = None) -> str:
    """Seed ``staged`` from its original location: recorded under ``node_dir/seeds`` (re-added
    after daemon restarts; the node's tracker answers for it from then on), added to the
    daemon with the file's directory as download dir, and waited for until the daemon has
    checked the data and is seeding. Returns the infohash. Raises
    :class:`~.errors.DownloadError` when the daemon does not get there. The RPC is on the
    seeder's loopback: call this on the build host (``runner``: see :class:`SwarmFetcher`)."""
    entry = SeedEntry(staged.infohash, staged.metainfo, staged.path.parent)
    record_seed(node_dir, entry)
    fetcher = SwarmFetcher(rpc_url, staged.path.parent, secret_file=secret_file(node_dir),
                           runner=runner)
    fetcher.ensure_seeding(staged.metainfo, staged.path.parent)
    fetcher.wait_seeding(staged.infohash, timeout=wait)
    log.info("seed.seeding", infohash=staged.infohash, path=str(staged.path))
    return staged.infohash


def remove_seed(node_dir: Path, rpc_url: str, infohash: str, *,
                runner: Callable[[Callable[[], Any]], Any] | None = None) -> None:
    """Stop seeding (the original file is kept)."""
    forget_seed(node_dir, infohash)
    SwarmFetcher(rpc_url, Path(node_dir), secret_file=secret_file(node_dir),
                 runner=runner).remove(infohash, delete_data=False)
