"""Fetch releases through the host's own transmission-daemon (RPC), verify, seed, prune.

One :class:`SwarmFetcher` per agent. Every RPC goes through :meth:`SwarmFetcher._rpc`, which
retries connection errors with tenacity (jitter, a deadline) so a daemon restarted by
supervisord is waited for, not failed on. Transmission keeps its torrents across restarts in
its config dir; when it has forgotten one (config dir lost), :meth:`fetch` adds it again and
Transmission re-checks what is already on disk instead of downloading it again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
from tenacity import (Retrying, retry_if_exception_type, stop_after_delay,
                      wait_random_exponential)
from transmission_rpc import Client, TransmissionError
from transmission_rpc.error import TransmissionAuthError, TransmissionConnectError

from .errors import Cancelled, DiskFull, DownloadError, FetchError, VerificationError
from .torrent import (artifact_sha256, check_metainfo, free_bytes, infohash, torrent_name,
                      torrent_size, web_seeds)

log = structlog.get_logger("dcdeploy.p2p.swarm")

T = TypeVar("T")

FIELDS = ["hashString", "name", "status", "percentDone", "leftUntilDone", "sizeWhenDone",
          "haveValid", "error", "errorString", "downloadDir", "recheckProgress", "corruptEver",
          "peersConnected", "rateDownload", "rateUpload", "uploadedEver", "doneDate"]
# tr_torrent_activity as the RPC reports it (an int in RPC version 16).
STATUS_NAMES = {0: "stopped", 1: "check pending", 2: "checking", 3: "download pending",
                4: "downloading", 5: "seed pending", 6: "seeding"}
ERROR_LOCAL = 3  # tr_stat.error: TR_STAT_LOCAL_ERROR (I/O); 1 and 2 are tracker trouble
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

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> "TorrentState":
        total = int(f.get("sizeWhenDone", 0))
        return cls(infohash=f["hashString"].lower(), name=f.get("name", ""),
                   status=status_name(f.get("status")),
                   done_bytes=total - int(f.get("leftUntilDone", total)), total_bytes=total,
                   error=int(f.get("error", 0)), error_string=f.get("errorString", ""),
                   download_dir=f.get("downloadDir", ""), peers=int(f.get("peersConnected", 0)),
                   rate_down=int(f.get("rateDownload", 0)), rate_up=int(f.get("rateUpload", 0)),
                   uploaded=int(f.get("uploadedEver", 0)), corrupt=int(f.get("corruptEver", 0)))


def status_name(raw: Any) -> str:
    """The status name for the RPC's int (or an already-named value)."""
    if isinstance(raw, int):
        return STATUS_NAMES.get(raw, f"unknown({raw})")
    return str(getattr(raw, "value", raw))


def error_for(state: TorrentState, directory: Path) -> FetchError | None:
    """The fetch error a daemon-reported error means, or None when it is not fatal. Pure.

    Only local (I/O) errors are fatal; tracker warnings and errors are not (the swarm may
    still deliver, and the tracker is our own agent)."""
    if state.error != ERROR_LOCAL:
        return None
    text = state.error_string.lower()
    reason = (f"transmission: {state.error_string} while downloading {state.name} into "
              f"{state.download_dir or directory} (the running version is untouched)")
    if "no space" in text or "disk full" in text or "quota" in text:
        return DiskFull(reason + "; free space or prune old releases", directory=directory)
    return DownloadError(reason)


def kick_reasons(fields: dict[str, Any]) -> int:
    """How many peer connections of one torrent (``torrent-get`` fields ``peers`` and
    ``leftUntilDone``) wait for a choke/interest pass. Pure."""
    downloading = int(fields.get("leftUntilDone", 0)) > 0
    n = 0
    for p in fields.get("peers", []):
        if p.get("peerIsInterested") and p.get("peerIsChoked"):
            n += 1
        elif downloading and not p.get("clientIsInterested") and p.get("progress", 0) > 0:
            n += 1
    return n


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


class SwarmFetcher:
    """Drive one transmission-daemon over RPC. Thread-safe for distinct infohashes.

    ``rpc_url`` is ``http://HOST:PORT/transmission/rpc``; ``download_dir`` is where releases
    land (the daemon must see the same path: it runs on the same host). ``secret_file``
    holds the RPC password (:func:`.daemon.ensure_secret` made it; read again on every
    reconnect); None sends no credentials. ``runner(fn)`` runs each RPC exchange and returns
    its result: the default calls it here; the namespace lab runs it on a thread inside the
    daemon's network namespace, whose loopback is where the RPC listens."""

    def __init__(self, rpc_url: str, download_dir: Path, *, rpc_retry_secs: float = 60.0,
                 poll: float = 0.5, kick_while_fetching: bool = True,
                 secret_file: Path | None = None,
                 runner: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        parts = urlsplit(rpc_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"rpc_url {rpc_url!r}: expected http://HOST:PORT/transmission/rpc")
        self.rpc_url = rpc_url
        self._conn = dict(protocol=parts.scheme, host=parts.hostname, port=parts.port or 9091,
                          path=parts.path or "/transmission/rpc")
        self.secret_file = Path(secret_file) if secret_file else None
        self._runner = runner
        self.download_dir = Path(download_dir)
        self.rpc_retry_secs = rpc_retry_secs
        self.poll = poll
        self.kick_while_fetching = kick_while_fetching
        self._client: Client | None = None
        self._lock = threading.Lock()

    # -- RPC boundary ---------------------------------------------------------------------
    def _rpc(self, call: Callable[[Client], T], *, retry_secs: float | None = None) -> T:
        """Run ``call(client)``; reconnect and retry connection errors for up to
        ``retry_secs`` (default ``rpc_retry_secs``), then raise :class:`DownloadError`."""
        def exchange() -> T:
            with self._lock:
                if self._client is None:
                    auth = {}
                    if self.secret_file is not None:
                        from .daemon import RPC_USER, read_secret
                        try:
                            auth = {"username": RPC_USER,
                                    "password": read_secret(self.secret_file)}
                        except (OSError, ValueError) as exc:
                            raise TransmissionError(f"cannot read the RPC password: "
                                                    f"{exc}") from None
                    self._client = Client(timeout=15.0, **self._conn,  # type: ignore[arg-type]
                                          **auth)
                client = self._client
            try:
                return call(client)
            except TransmissionConnectError:
                with self._lock:
                    self._client = None
                raise

        def attempt() -> T:
            return exchange() if self._runner is None else self._runner(exchange)

        try:
            for try_ in Retrying(retry=retry_if_exception_type(TransmissionConnectError),
                                 stop=stop_after_delay(self.rpc_retry_secs if retry_secs is None
                                                       else retry_secs),
                                 wait=wait_random_exponential(multiplier=0.2, max=2.0),
                                 reraise=True):
                with try_:
                    return attempt()
        except TransmissionConnectError as exc:
            raise DownloadError(f"transmission-daemon at {self.rpc_url} unreachable: {exc} "
                                "(is the transmission program running?)") from None
        except TransmissionAuthError:
            raise DownloadError(f"transmission-daemon at {self.rpc_url} refused the RPC "
                                f"password from {self.secret_file} (HTTP 401): it must be the "
                                "one in the daemon's config dir (rpc-secret)") from None
        except TransmissionError as exc:
            raise DownloadError(f"transmission-daemon at {self.rpc_url}: {exc}") from None
        raise AssertionError("unreachable")

    def state(self, infohash_: str) -> TorrentState | None:
        """The daemon's view of one torrent, or None when it does not have it."""
        def call(c: Client) -> TorrentState | None:
            try:
                return TorrentState.from_fields(c.get_torrent(infohash_, arguments=FIELDS).fields)
            except KeyError:
                return None
        return self._rpc(call)

    def states(self) -> list[TorrentState]:
        return self._rpc(lambda c: [TorrentState.from_fields(t.fields)
                                    for t in c.get_torrents(arguments=FIELDS)])

    def add(self, metainfo: bytes, *, download_dir: Path | None = None) -> str:
        """Add (idempotent: an existing torrent is left as it is) and start it now, high
        bandwidth priority, bypassing the queue. Returns the infohash. Data already in
        ``download_dir`` is checked by the daemon, not downloaded again."""
        ih = infohash(metainfo)
        where = str(download_dir or self.download_dir)

        def call(c: Client) -> None:
            c.add_torrent(metainfo, download_dir=where, paused=False, bandwidth_priority=1)
            if web_seeds(metainfo):
                # Debian's Transmission 3.00 arms a torrent's web seeds only when the torrent
                # is started after being stopped: one added running never asks them
                # (measured: 0 requests in 120 s; after a stop and a start, Range requests).
                c.stop_torrent(ih)
            c.start_torrent_now(ih)
        self._rpc(call)
        log.info("swarm.added", infohash=ih, download_dir=where)
        return ih

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
        Transmission's per-piece SHA-1 checks the whole artifact's sha256 is compared; on a
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
            # A torrent added earlier with another directory (a seed) is verified where it is.
            target = Path(final.download_dir or self.download_dir) / target.name
            actual = artifact_sha256(target)
            if actual == sha256.lower():
                bound.info("swarm.verified", sha256=actual,
                           secs=round(time.monotonic() - started, 2), repairs=attempt)
                return target
            if attempt == REPAIR_ATTEMPTS:
                break
            # Transmission trusts pieces it once checked; make it look again, so the
            # corrupted pieces are marked missing and fetched from peers.
            bound.warning("swarm.sha256_mismatch", expected=sha256, actual=actual,
                          action="recheck", attempt=attempt + 1)
            self._rpc(lambda c: c.verify_torrent(ih))
            self._wait_checked(ih, cancel, deadline)
            self._rpc(lambda c: c.start_torrent_now(ih))
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
                self._rpc(lambda c: c.start_torrent_now(ih))
            # No peer at all (a restarted daemon, a network blip): ask the tracker again now
            # rather than at the daemon's next scheduled announce or reconnect attempt.
            lonely_since = (lonely_since or now) if st.peers == 0 else None
            if lonely_since is not None and now - lonely_since > LONELY_SECS and \
                    now - last_announce > LONELY_SECS:
                last_announce = now
                bound.info("swarm.reannounce", reason=f"no peer for {LONELY_SECS:.0f} s")
                try:
                    self._rpc(lambda c: c.reannounce_torrent(ih), retry_secs=5.0)
                except FetchError:
                    pass
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

    # -- rechoke kick ---------------------------------------------------------------------
    def kick(self) -> None:
        """Make the daemon re-run its choke/interest pass now instead of at its next 10 s
        tick (Transmission 3.00 only re-evaluates choking and interest every 10 s; starting
        any stopped torrent runs the pass at once, for the whole session). Uses a one-piece
        tracker-less dummy torrent that stays stopped; costs 2-3 RPCs."""
        meta = _kick_metainfo()
        ih = infohash(meta)
        def call(c: Client) -> None:
            try:
                c.get_torrent(ih, arguments=["id"])
            except KeyError:
                c.add_torrent(meta, download_dir=str(self.download_dir / ".kick"), paused=True)
            c.start_torrent(ih)
            c.stop_torrent(ih)
        self._rpc(call, retry_secs=5.0)

    def waiting_peers(self) -> int:
        """Peer connections, over all torrents, that a choke/interest pass would change now:
        peers that want data from us but are choked by us, and, for torrents we still
        download, peers that have data (progress > 0) we are not interested in yet. One RPC."""
        def call(c: Client) -> int:
            return sum(kick_reasons(t.fields) for t in
                       c.get_torrents(arguments=["peers", "leftUntilDone"]))
        return self._rpc(call, retry_secs=5.0)

    def kick_if_waiting(self) -> bool:
        """:meth:`kick` when :meth:`waiting_peers` is not zero; returns whether it kicked."""
        if self.waiting_peers():
            self.kick()
            return True
        return False

    # -- seeding and cleanup ----------------------------------------------------------------
    def ensure_seeding(self, metainfo: bytes, data_dir: Path) -> str:
        """Make the daemon seed ``metainfo`` from data already in ``data_dir`` (after a
        daemon restart that lost its state, or on the build host). Idempotent; returns the
        infohash. The daemon checks the data first; nothing is downloaded if it is intact."""
        ih = infohash(metainfo)
        st = self.state(ih)
        if st is None:
            return self.add(metainfo, download_dir=data_dir)
        if st.status == "stopped":
            self._rpc(lambda c: c.start_torrent_now(ih))
        return ih

    def seeding(self) -> list[str]:
        """Infohashes of the torrents the daemon holds complete (seeding or about to)."""
        return sorted(s.infohash for s in self.states() if s.complete)

    def remove(self, infohash_: str, delete_data: bool) -> None:
        """Drop a torrent (and, with ``delete_data``, its files). Idempotent."""
        self._rpc(lambda c: c.remove_torrent(infohash_, delete_data=delete_data))
        log.info("swarm.removed", infohash=infohash_, delete_data=delete_data)

    def prune(self, keep: set[str], *, delete_data: bool = True) -> list[str]:
        """Remove every torrent whose infohash is not in ``keep`` (except the internal kick
        torrent); return those removed. Use :func:`retained` to compute ``keep``."""
        keep = {k.lower() for k in keep} | {infohash(_kick_metainfo())}
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


class Kicker:
    """A thread that calls :meth:`SwarmFetcher.kick_if_waiting` every ``period`` seconds, so
    a new peer is unchoked within about a second instead of up to ten. Run one per daemon
    for as long as it seeds (the node runs one; the agent should too). Errors are logged and
    the thread keeps going."""

    def __init__(self, fetcher: SwarmFetcher, period: float = 1.0) -> None:
        self.fetcher = fetcher
        self.period = period
        self.kicks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Kicker":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="swarm-kicker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                if self.fetcher.kick_if_waiting():
                    self.kicks += 1
            except Exception as exc:  # noqa: BLE001 - keep kicking; the daemon may be restarting
                log.debug("swarm.kick_failed", error=f"{type(exc).__name__}: {exc}")


_KICK: bytes | None = None


def _kick_metainfo() -> bytes:
    """A constant, tracker-less, private metainfo for a 1-byte file (never downloaded)."""
    global _KICK
    if _KICK is None:
        from . import bencode
        data = b"\0"
        _KICK = bencode.encode({"info": {"name": "dcdeploy-kick", "length": len(data),
                                         "piece length": 16384, "private": 1,
                                         "pieces": hashlib.sha1(data).digest()}})
    return _KICK


def allocated_bytes(path: Path) -> int:
    """Bytes actually allocated on disk for a (possibly sparse) file."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
