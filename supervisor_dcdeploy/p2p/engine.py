"""The distribution-engine interface: what the agent and the build-host commands need from a
BitTorrent engine, and the fetch logic every engine shares (docs/distribution.md, "Engines").

An :class:`Engine` drives one host's BitTorrent daemon: add or seed a release from its
metainfo, report per-torrent state, re-check pieces, stop seeding, prune. The daemon itself
(its peer and tracker settings, its process) is the engine's business; the fetch loop built
on these primitives -- wait, verify the whole artifact's sha256, repair, detect stalls,
re-announce when alone, refuse when the disk is too small -- is written once here, so the
failure handling is the same whichever engine runs. Engines:

- ``transmission`` (:class:`.swarm.SwarmFetcher`): transmission-daemon over its RPC, the
  default.
- ``libtorrent`` (:class:`.ltengine.LtEngine`): ``python -m supervisor_dcdeploy.p2p.ltdaemon``,
  a libtorrent session in its own process, over a unix socket.
"""

from __future__ import annotations

import abc
import base64
import binascii
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .errors import Cancelled, DiskFull, DownloadError, FetchError, VerificationError
from .torrent import (artifact_sha256, check_metainfo, free_bytes, infohash, torrent_name,
                      torrent_size)

log = structlog.get_logger("dcdeploy.p2p.engine")

ENGINES = ("transmission", "libtorrent")
ERROR_LOCAL = 3  # TorrentState.error: a local (I/O) error; 1 and 2 are tracker trouble
DISK_RESERVE = 16 * 1024 * 1024  # keep this much free beyond the artifact
REPAIR_ATTEMPTS = 2
LONELY_SECS = 10.0  # an incomplete torrent with no peer for this long re-announces


@dataclass(frozen=True)
class TorrentState:
    """What the daemon says about one torrent (a snapshot, for status and decisions)."""

    infohash: str
    name: str
    status: str  # stopped | check pending | checking | download pending | downloading | ...
    done_bytes: int
    total_bytes: int
    error: int
    error_string: str
    download_dir: str
    peers: int
    rate_down: int
    rate_up: int
    uploaded: int
    corrupt: int

    @property
    def complete(self) -> bool:
        return self.total_bytes > 0 and self.done_bytes >= self.total_bytes \
            and self.status not in ("checking", "check pending")


def error_for(state: TorrentState, directory: Path) -> FetchError | None:
    """The fetch error a daemon-reported error means, or None when it is not fatal. Pure.

    Only local (I/O) errors are fatal; tracker warnings and errors are not (the swarm may
    still deliver, and the tracker is our own agent)."""
    if state.error != ERROR_LOCAL:
        return None
    text = state.error_string.lower()
    reason = (f"the daemon: {state.error_string} while downloading {state.name} into "
              f"{state.download_dir or directory} (the running version is untouched)")
    if "no space" in text or "disk full" in text or "quota" in text:
        return DiskFull(reason + "; free space or prune old releases", directory=directory)
    return DownloadError(reason)


def decode_metainfo(metainfo_b64: str) -> bytes:
    """Base64 -> metainfo bytes; :class:`DownloadError` naming the problem."""
    try:
        meta = base64.b64decode(metainfo_b64, validate=True)
        check_metainfo(meta)  # bounded: depth, size, shape (bencode.py, torrent.py)
        return meta
    except (binascii.Error, ValueError, TypeError) as exc:
        raise DownloadError(f"the staged torrent is not a valid base64 metainfo: {exc}") from None


SWARM_OVERHEAD_S = 25.0  # measured fixed cost of a Transmission 3.00 swarm (docs/distribution.md)


def choose_transport(size_bytes: int, hosts: int, bandwidth_bps: float, *,
                     has_urls: bool = True, overhead_s: float = SWARM_OVERHEAD_S) -> str:
    """"swarm" or "http" for one release. Pure.

    HTTP from one origin takes about ``hosts * S / B``; the swarm about ``S / B`` plus a fixed
    start-up and tail cost (``overhead_s``, ~15-25 s measured with Transmission 3.00 whatever
    the size). Without an HTTP URL the answer is always "swarm". Ties go to the swarm (it
    also spares the origin's link)."""
    if not has_urls or hosts <= 0 or bandwidth_bps <= 0:
        return "swarm"
    one_copy = size_bytes * 8 / bandwidth_bps
    return "http" if hosts * one_copy < one_copy + overhead_s else "swarm"


def retained(releases: Iterable[str], keep_last: int, protected: Iterable[str] = ()) -> set[str]:
    """Infohashes to keep on disk: the ``keep_last`` newest of ``releases`` (given oldest
    first) plus every ``protected`` one (the running version, the one being staged, the
    ones still inside their seeding grace period). Pure; feed it to :meth:`prune`."""
    ordered = list(releases)
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    return keep | set(protected)


class Engine(abc.ABC):
    """One host's BitTorrent engine. Thread-safe for distinct infohashes.

    Subclasses implement the primitives (``state``, ``states``, ``add``, ``start``,
    ``verify``, ``reannounce``, ``remove``); each raises :class:`DownloadError` when the
    daemon cannot be reached for longer than the engine's retry deadline. ``download_dir``
    is where releases land; ``poll`` how often a fetch looks at the daemon."""

    name = "engine"
    download_dir: Path
    poll: float = 0.5
    kick_while_fetching = False

    # -- primitives -----------------------------------------------------------------------
    @abc.abstractmethod
    def state(self, infohash_: str) -> TorrentState | None:
        """The daemon's view of one torrent, or None when it does not have it."""

    @abc.abstractmethod
    def states(self) -> list[TorrentState]:
        """Every torrent the daemon holds."""

    @abc.abstractmethod
    def add(self, metainfo: bytes, *, download_dir: Path | None = None,
            origin: bool = False) -> str:
        """Add (idempotent) and start at once; data already in ``download_dir`` is checked,
        not downloaded again. ``origin``: seed it as the release's origin. Returns the
        infohash."""

    @abc.abstractmethod
    def start(self, infohash_: str) -> None:
        """Resume a stopped torrent now (clearing an error it stopped on)."""

    @abc.abstractmethod
    def verify(self, infohash_: str) -> None:
        """Have the daemon re-check every piece on disk (bad ones become missing)."""

    @abc.abstractmethod
    def reannounce(self, infohash_: str) -> None:
        """Ask the tracker for peers now instead of at the next scheduled announce."""

    @abc.abstractmethod
    def remove(self, infohash_: str, delete_data: bool) -> None:
        """Stop seeding and forget a torrent (with ``delete_data``, its files). Idempotent."""

    def settle(self, infohash_: str) -> None:
        """Make sure the data of a torrent the daemon reports complete is in its files
        before they are read. Engines that count a piece as had before its write reached
        the file override this (libtorrent); Transmission writes first."""

    def kick_if_waiting(self) -> bool:
        """Engines whose choke pass runs on a slow timer override this (Transmission)."""
        return False

    def internal_infohashes(self) -> set[str]:
        """Torrents the engine keeps for itself; :meth:`prune` never removes them."""
        return set()

    def _reannounce_quietly(self, ih: str) -> None:
        try:
            self.reannounce(ih)
        except FetchError:
            pass

    # -- the fetch ------------------------------------------------------------------------
    def fetch(self, metainfo_b64: str, sha256: str, *,
              progress: Callable[[int, int], None] | None = None,
              cancel: threading.Event | None = None, timeout: float | None = None,
              stall_timeout: float | None = None) -> Path:
        """Download through the swarm and return the verified path (``download_dir/<name>``,
        a file, or a directory for a multi-file torrent: see :func:`artifact_sha256`; for a
        torrent the daemon already holds elsewhere, e.g. a seed, the path where it is).

        Blocks until complete. Idempotent: an already complete, intact copy returns after a
        sha256 read. Survives daemon restarts (re-adds a forgotten torrent). After
        the engine's per-piece SHA-1 checks the whole artifact's sha256 is compared; on a
        mismatch (a copy corrupted on disk) the daemon re-checks every piece and fetches the
        bad ones again from peers, up to ``REPAIR_ATTEMPTS`` times. The torrent stays in the
        daemon, seeding, whatever happens: remove it with :meth:`remove` or :meth:`prune`.

        Raises :class:`DiskFull` (not enough free space, or ENOSPC while writing),
        :class:`VerificationError` (sha256 still wrong after repair), :class:`Cancelled`,
        :class:`DownloadError` (timeout, no new byte for ``stall_timeout`` seconds, daemon
        I/O error, bad metainfo, daemon unreachable for longer than ``rpc_retry_secs``)."""
        meta = decode_metainfo(metainfo_b64)
        ih = infohash(meta)
        target = self.download_dir / torrent_name(meta)
        size = torrent_size(meta)
        deadline = None if timeout is None else time.monotonic() + timeout
        bound = log.bind(infohash=ih, name=target.name, size=size)
        started = time.monotonic()

        if self.state(ih) is None:
            self._check_space(target, size)
            self.add(meta)
            bound.info("swarm.fetch_started")
        for attempt in range(REPAIR_ATTEMPTS + 1):
            final = self._wait_complete(meta, ih, bound, progress, cancel, deadline,
                                        stall_timeout)
            self.settle(ih)
            # A torrent added earlier with another directory (a seed) is verified where it is.
            target = Path(final.download_dir or self.download_dir) / target.name
            try:
                actual = artifact_sha256(target)
            except FileNotFoundError:  # reported complete, yet not on disk: check it again
                actual = "none (no such file)"
            if actual == sha256.lower():
                bound.info("swarm.verified", sha256=actual,
                           secs=round(time.monotonic() - started, 2), repairs=attempt)
                return target
            if attempt == REPAIR_ATTEMPTS:
                break
            # The engine trusts pieces it once checked; make it look again, so the
            # corrupted pieces are marked missing and fetched from peers.
            bound.warning("swarm.sha256_mismatch", expected=sha256, actual=actual,
                          action="recheck", attempt=attempt + 1)
            self.verify(ih)
            self._wait_checked(ih, cancel, deadline)
            self.start(ih)
        raise VerificationError(
            f"{target}: sha256 {actual} does not match the staged {sha256} after "
            f"{REPAIR_ATTEMPTS} re-checks (the staged sha256 or the torrent is wrong: "
            "re-stage the release)", expected=sha256, actual=actual)

    def _check_space(self, target: Path, size: int) -> None:
        have = min(size, allocated_bytes(target)) if target.is_file() else 0
        need = size - have + DISK_RESERVE
        self.download_dir.mkdir(parents=True, exist_ok=True)
        free = free_bytes(self.download_dir)
        if free < need:
            raise DiskFull(f"{self.download_dir}: {free} bytes free, {need} needed for "
                           f"{target.name} ({size} bytes + {DISK_RESERVE} reserve); "
                           "free space or prune old releases (the running version is untouched)",
                           directory=self.download_dir)

    def _wait_complete(self, meta: bytes, ih: str, bound: Any,
                       progress: Callable[[int, int], None] | None,
                       cancel: threading.Event | None, deadline: float | None,
                       stall_timeout: float | None = None) -> TorrentState:
        last_log = last_kick = last_announce = 0.0
        last_done, moved_at = -1, time.monotonic()
        lonely_since: float | None = None
        while True:
            self._check_stop(ih, cancel, deadline)
            st = self.state(ih)
            if st is None:
                bound.warning("swarm.readd", reason="daemon does not know the torrent")
                self._check_space(self.download_dir / torrent_name(meta), torrent_size(meta))
                self.add(meta)
                continue
            fatal = error_for(st, self.download_dir)
            if fatal is not None:
                raise fatal
            if progress is not None:
                progress(st.done_bytes, st.total_bytes)
            if st.complete:
                return st
            now = time.monotonic()
            if st.done_bytes != last_done or st.status in ("checking", "check pending"):
                last_done, moved_at = st.done_bytes, now
            elif stall_timeout is not None and now - moved_at > stall_timeout:
                raise DownloadError(
                    f"fetch of {ih} stalled: no new data for {stall_timeout:.0f} s at "
                    f"{st.done_bytes}/{st.total_bytes} bytes, {st.peers} peers connected "
                    "(is any host or the build host seeding it?)")
            if st.status == "stopped":  # paused by someone, or stopped after an error
                self.start(ih)
            # No peer at all (a restarted daemon, a network blip): ask the tracker again now
            # rather than at the daemon's next scheduled announce or reconnect attempt.
            lonely_since = (lonely_since or now) if st.peers == 0 else None
            if lonely_since is not None and now - lonely_since > LONELY_SECS and \
                    now - last_announce > LONELY_SECS:
                last_announce = now
                bound.info("swarm.reannounce", reason=f"no peer for {LONELY_SECS:.0f} s")
                self._reannounce_quietly(ih)
            if self.kick_while_fetching and st.peers and now - last_kick > 1.0:
                last_kick = now
                try:
                    self.kick_if_waiting()
                except FetchError:
                    pass
            if now - last_log > 10:
                last_log = now
                bound.info("swarm.progress", done=st.done_bytes, total=st.total_bytes,
                           peers=st.peers, rate_down=st.rate_down, status=st.status)
            self._sleep(cancel)

    def _wait_checked(self, ih: str, cancel: threading.Event | None,
                      deadline: float | None) -> None:
        # verify_torrent only queues the check: first wait to see it start (or finish).
        seen = False
        start = time.monotonic()
        while True:
            self._check_stop(ih, cancel, deadline)
            st = self.state(ih)
            checking = st is not None and st.status in ("checking", "check pending")
            if checking:
                seen = True
            elif seen or time.monotonic() - start > 5:
                return
            self._sleep(cancel)

    def _check_stop(self, ih: str, cancel: threading.Event | None,
                    deadline: float | None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"fetch of {ih} cancelled")
        if deadline is not None and time.monotonic() > deadline:
            st = self.state(ih)
            raise DownloadError(f"fetch of {ih} timed out: "
                                f"{st.done_bytes if st else 0}/{st.total_bytes if st else '?'} "
                                f"bytes, {st.peers if st else 0} peers connected")

    def _sleep(self, cancel: threading.Event | None) -> None:
        if cancel is not None:
            cancel.wait(self.poll)
        else:
            time.sleep(self.poll)

    # -- seeding and cleanup ----------------------------------------------------------------
    def ensure_seeding(self, metainfo: bytes, data_dir: Path, *, origin: bool = False) -> str:
        """Make the daemon seed ``metainfo`` from data already in ``data_dir`` (after a
        daemon restart that lost its state, or on the build host). Idempotent; returns the
        infohash. The daemon checks the data first; nothing is downloaded if it is intact.
        ``origin``: this copy is the release's origin (the build host's seed); an engine
        that can super-seed (BEP 16) does so for it."""
        ih = infohash(metainfo)
        st = self.state(ih)
        if st is None:
            return self.add(metainfo, download_dir=data_dir, origin=origin)
        if st.status == "stopped":
            self.start(ih)
        return ih

    def seeding(self) -> list[str]:
        """Infohashes of the torrents the daemon holds complete (seeding or about to)."""
        return sorted(s.infohash for s in self.states() if s.complete)

    def prune(self, keep: set[str], *, delete_data: bool = True) -> list[str]:
        """Remove every torrent whose infohash is not in ``keep`` (except the engine's
        internal ones); return those removed. Use :func:`retained` to compute ``keep``."""
        keep = {k.lower() for k in keep} | self.internal_infohashes()
        removed = [s.infohash for s in self.states() if s.infohash not in keep]
        for ih in removed:
            self.remove(ih, delete_data)
        return removed

    def wait_seeding(self, infohash_: str, timeout: float = 60.0) -> TorrentState:
        """Block until the daemon holds ``infohash_`` complete (checked) and seeding."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(infohash_)
            if st is not None:
                fatal = error_for(st, Path(st.download_dir or self.download_dir))
                if fatal is not None:
                    raise fatal
                if st.complete and st.status in ("seeding", "seed pending"):
                    return st
            if time.monotonic() > deadline:
                raise DownloadError(f"{infohash_} not seeding after {timeout}s: {st}")
            time.sleep(self.poll)


def allocated_bytes(path: Path) -> int:
    """Bytes actually allocated on disk for a (possibly sparse) file."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
