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
from .engine import Engine
from .ltengine import LtEngine
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
    engine: str = "transmission"  # or "libtorrent" (docs/distribution.md, "Engines")
    data_roots: tuple[str, ...] = ()  # libtorrent: where else it may save (besides releases/)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "supervisor_dcdeploy.p2p.node", "--store", self.store_url,
               "--host", self.host, "--address", self.address, "--rack", self.rack,
               "--dir", str(self.dir), "--rpc-port", str(self.rpc_port),
               "--peer-port", str(self.peer_port), "--tracker-port", str(self.tracker_port),
               "--tracker-bind", self.tracker_bind, "--seed-check", "--rpc-bind", self.rpc_bind,
               "--engine", self.engine]
        for root in self.data_roots:
            cmd += ["--data-root", str(root)]
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


def node_engine(node_dir: Path, rpc_url: str = "", *,
                runner: Callable[[Callable[[], Any]], Any] | None = None,
                download_dir: Path | None = None) -> Engine:
    """The engine of the seeder running in ``node_dir`` (its ``node.json`` says which): the
    libtorrent engine over its control socket, else Transmission at ``rpc_url`` (default:
    the one ``node.json`` names) with the node's password file."""
    info = status(node_dir) or {}
    where = download_dir or Path(node_dir) / "releases"
    if info.get("engine") == "libtorrent":
        return LtEngine(Path(info["control"]), where)
    return SwarmFetcher(rpc_url or info["rpc_url"], where, secret_file=secret_file(node_dir),
                        runner=runner)


def _seed_data_dir(node_dir: Path, staged: Staged, engine: Engine) -> Path:
    """Where the seed's data is read from. Transmission: the file's own directory. The
    libtorrent daemon saves only under its data root (``<node_dir>/releases``), so the
    artifact is hard-linked (copied across file systems) to ``releases/<infohash>/``."""
    if not isinstance(engine, LtEngine):
        return staged.path.parent
    import shutil
    where = Path(node_dir).resolve() / "releases" / staged.infohash
    where.mkdir(parents=True, exist_ok=True)
    dest = where / staged.path.name
    if dest.exists():
        return where

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    if staged.path.is_dir():
        shutil.copytree(staged.path, dest, copy_function=link, symlinks=True)
    else:
        link(str(staged.path), str(dest))
    return where


def add_seed(node_dir: Path, rpc_url: str, staged: Staged, *, wait: float = 600.0,
             runner: Callable[[Callable[[], Any]], Any] | None = None) -> str:
    """Seed ``staged`` from its original location: recorded under ``node_dir/seeds`` (re-added
    after daemon restarts; the node's tracker answers for it from then on), added to the
    daemon as the release's origin (super-seeding with libtorrent), and waited for until
    the daemon has checked the data and is seeding. Returns the infohash. Raises
    :class:`~.errors.DownloadError` when the daemon does not get there. The daemon's
    control is on the seeder's host: call this on the build host (``runner``: see
    :class:`SwarmFetcher`)."""
    engine = node_engine(node_dir, rpc_url, runner=runner, download_dir=staged.path.parent)
    data_dir = _seed_data_dir(node_dir, staged, engine)
    entry = SeedEntry(staged.infohash, staged.metainfo, data_dir)
    record_seed(node_dir, entry)
    engine.ensure_seeding(staged.metainfo, data_dir, origin=True)
    engine.wait_seeding(staged.infohash, timeout=wait)
    log.info("seed.seeding", infohash=staged.infohash, path=str(staged.path),
             engine=engine.name)
    return staged.infohash


def remove_seed(node_dir: Path, rpc_url: str, infohash: str, *,
                runner: Callable[[Callable[[], Any]], Any] | None = None) -> None:
    """Stop seeding (the original file is kept)."""
    forget_seed(node_dir, infohash)
    node_engine(node_dir, rpc_url, runner=runner).remove(infohash, delete_data=False)
