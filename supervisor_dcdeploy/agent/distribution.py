"""This host's side of peer-to-peer distribution (docs/design.md §2, docs/distribution.md).

Enabled by ``transmission_rpc`` in ``[agent]`` (the Transmission engine, the default) or by
``swarm_engine = libtorrent`` (the libtorrent engine: this host's ``ltdaemon`` program, reached
over its unix socket ``ltdaemon_socket``, default ``<root>/ltdaemon/control.sock``). The agent
then serves the tracker on loopback (peers registered in ``/dc/peers/<infohash>/<host>``,
same rack first), fetches staged releases that carry a torrent through the engine
(:class:`~..p2p.engine.Engine`), verifies the whole-file sha256 after the engine's piece
checks, installs them like an HTTP download,
keeps seeding until the deploy of that version is done plus ``seed_grace`` seconds, and
removes superseded torrents. Optional page-cache warming (``preload`` in the service spec)
runs after verification, because Transmission's verify evicts the pages.

Keys (all optional but the first): ``transmission_rpc`` (``http://127.0.0.1:9091/transmission/rpc``:
a loopback address, anything else is refused at start), ``transmission_secret`` (the RPC
password file the daemon's settings were written with, mode 0600; default
``<root>/transmission/rpc-secret``), ``address`` (what peers dial: the host's data-network
address; required in practice, the default is the RPC host), ``tracker_port`` (6969),
``swarm_dir`` (the daemon's download dir; default ``<root>/downloads``), ``seed_grace``
(seconds, 60), ``mlock_cap`` (bytes pinned with mlock by preload, 0; the fetch manager
reads it, so it applies on hosts without a swarm engine too), ``kick_secs`` (how
often the kicker looks for peers waiting on Transmission's 10 s choke pass, 1; 0 turns it off),
``swarm_stall_secs`` (a swarm download with no new byte for this long fails, and is
retried from the release's URLs when it has some; 120, 0 waits forever), ``link_mbit``
(this host's link, 1000: with it, a release staged with both a torrent and URLs
small enough that plain HTTP from the origin is faster goes over HTTP; see
:func:`fetch_transport`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import structlog

from ..fetch import (DownloadError, Limits, VerificationError, installed_sha256, is_archive,
                     unpack, write_marker)
from ..model import StagedRelease
from ..store import Store
from .config import AgentConfig, ConfigError

log = structlog.get_logger("dcdeploy.agent.distribution")
PRUNE_EVERY_SECS = 15.0


def install_from(path: Path, target: Path, version: str, sha256: str,
                 limits: Limits | None = None) -> None:
    """Install a verified download at ``target``: an archive is unpacked (with fetch's
    checks), a directory or a plain file is copied; the marker goes last, atomically."""
    if installed_sha256(target) == sha256:
        return
    # Not tarfile.is_tarfile: it reads a first pax record whole (a 10 GB one would OOM us).
    if is_archive(path):
        unpack(path, target, limits=limits)
        if installed_sha256(target) != sha256:  # unpack records the archive's own digest
            raise VerificationError(f"{path}: installed digest differs from the staged "
                                    f"{sha256}", expected=sha256,
                                    actual=installed_sha256(target) or "none")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=target.parent))
    try:
        if path.is_dir():
            shutil.copytree(path, tmp, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(path, tmp / path.name)
        write_marker(tmp, version=version, sha256=sha256)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch_transport(staged: StagedRelease, hosts: int, link_bps: float,
                    swarm_available: bool) -> str:
    """"swarm" or "http" for one staged release on this host. Pure.

    Only a release that has both a torrent and URLs is a choice; then
    :func:`p2p.swarm.choose_transport` weighs ``hosts`` downloads from one origin against
    the swarm's fixed start-up and tail cost. A host without a daemon takes the URLs."""
    from ..p2p.swarm import choose_transport
    if not staged.torrent or not swarm_available:
        return "http"
    if not staged.urls:
        return "swarm"
    # The staged size is required and equals the torrent's length (model.StagedRelease).
    return choose_transport(staged.size, hosts, link_bps, has_urls=True)


def make_engine(cfg: AgentConfig) -> Any:
    """The :class:`~..p2p.engine.Engine` agent.conf asks for; :class:`ConfigError` naming the
    key for a bad engine name or a non-loopback Transmission RPC."""
    download_dir = Path(cfg.extra.get("swarm_dir", str(cfg.root / "downloads")))
    kind = cfg.extra.get("swarm_engine", "").strip() or "transmission"
    if kind == "libtorrent":
        from ..p2p.ltengine import LtEngine
        return LtEngine(Path(cfg.extra.get("ltdaemon_socket",
                                           str(cfg.root / "ltdaemon" / "control.sock"))),
                        download_dir)
    if kind != "transmission":
        raise ConfigError(f"[agent] swarm_engine: {kind!r} is not an engine "
                          "(transmission or libtorrent)")
    from ..p2p.daemon import SECRET_FILE, check_loopback
    from ..p2p.swarm import SwarmFetcher
    rpc = cfg.extra.get("transmission_rpc", "")
    try:
        check_loopback("transmission_rpc host", urlsplit(rpc).hostname or "")
    except ValueError as exc:
        raise ConfigError(f"[agent] {exc}") from None
    secret = Path(cfg.extra.get("transmission_secret",
                                str(cfg.root / "transmission" / SECRET_FILE)))
    return SwarmFetcher(rpc, download_dir, secret_file=secret)


class Distribution:
    def __init__(self, cfg: AgentConfig, store: Store) -> None:
        from ..p2p.swarm import Kicker, SwarmFetcher
        from ..p2p.tracker import Tracker, intro_window
        self.fetcher = make_engine(cfg)
        rpc = cfg.extra.get("transmission_rpc", "")
        self.address = cfg.extra.get("address") or urlsplit(rpc).hostname or "127.0.0.1"
        self.seed_grace = float(cfg.extra.get("seed_grace", "60"))
        self.mlock_cap = int(cfg.extra.get("mlock_cap", "0"))
        self.link_bps = float(cfg.extra.get("link_mbit", "1000")) * 1e6
        self.stall_secs = float(cfg.extra.get("swarm_stall_secs", "120")) or None
        self.active = False
        self.limits = Limits.from_config(cfg.extra)
        self.tracker = Tracker(store, cfg.host, self.address, cfg.rack,
                               port=int(cfg.extra.get("tracker_port", "6969")),
                               active=lambda: self.active,
                               intro_window=intro_window(self.fetcher.name))
        # While this host seeds, peers asking it for data must not wait up to 10 s for the
        # daemon's choke pass (docs/distribution.md, "The first ~10 s").
        # (Transmission only: libtorrent's choke pass runs every 5 s by its own settings.)
        kick_secs = float(cfg.extra.get("kick_secs", "1"))
        self.kicker = Kicker(self.fetcher, kick_secs) \
            if kick_secs > 0 and isinstance(self.fetcher, SwarmFetcher) else None
        self._released_at: dict[str, float] = {}  # infohash -> when its deploy was done
        self._last_prune = 0.0

    @staticmethod
    def enabled(cfg: AgentConfig) -> bool:
        # Any swarm_engine turns it on, so that a misspelt one fails at start (make_engine).
        return bool(cfg.extra.get("transmission_rpc")) or \
            bool(cfg.extra.get("swarm_engine", "").strip())

    def start(self) -> None:
        self.tracker.start()
        log.info("swarm.tracker_started", port=self.tracker.port, address=self.address)
        if self.kicker is not None:
            self.kicker.start()

    def stop(self) -> None:
        if self.kicker is not None:
            self.kicker.stop()
        self.tracker.stop()

    def status(self) -> dict[str, Any]:
        """For ``status.json``: where peers reach us and what the kicker did."""
        return {"engine": self.fetcher.name, "address": self.address,
                "tracker_port": self.tracker.port,
                "kicker_running": bool(self.kicker and self.kicker.running),
                "kicks": self.kicker.kicks if self.kicker else 0}

    def fetch(self, staged: StagedRelease, target: Path,
              progress: Callable[[int, int | None], None]) -> None:
        """Download through the swarm, verify, install at ``target``. Blocks."""
        if not staged.torrent:
            raise DownloadError("the staged release has no torrent")
        path = self.fetcher.fetch(staged.torrent, staged.sha256,
                                  progress=lambda done, total: progress(done, total),
                                  stall_timeout=self.stall_secs)
        install_from(path, target, staged.version, staged.sha256, self.limits)

    def warm(self, release: Path) -> dict[str, Any]:
        """Read a verified release into the page cache (and pin up to ``mlock_cap``)."""
        from ..p2p.warm import warm
        result = warm(release, mlock_cap=self.mlock_cap)
        return {"bytes": result.bytes_total, "resident": result.bytes_resident,
                "locked": result.bytes_locked, "mlock_error": result.mlock_error}

    def maintain(self, staged: dict[str, StagedRelease | None],
                 released: dict[str, str | None], deploying: bool) -> None:
        """Keep seeding what is staged until its deploy is done plus the grace period;
        remove every other torrent (superseded releases; the unpacked release dirs stay,
        pruned by the agent's ``keep_releases``). Rate-limited: one RPC every 15 s."""
        from ..p2p.torrent import infohash
        from ..p2p.swarm import decode_metainfo
        self.active = deploying
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_SECS:
            return
        self._last_prune = now
        keep: set[str] = set()
        for svc, release in staged.items():
            if release is None or not release.torrent:
                continue
            try:
                ih = infohash(decode_metainfo(release.torrent))
            except (DownloadError, ValueError):
                continue
            if released.get(svc) == release.version:
                done_at = self._released_at.setdefault(ih, now)
                if now - done_at >= self.seed_grace:
                    continue  # done and past the grace period: stop seeding it
            keep.add(ih)
        removed = self.fetcher.prune(keep)
        if removed:
            log.info("swarm.pruned", infohashes=removed)
