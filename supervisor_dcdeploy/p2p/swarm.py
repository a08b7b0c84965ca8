"""The Transmission engine: releases through the host's own transmission-daemon (RPC).

:class:`SwarmFetcher` is the :class:`~.engine.Engine` for Transmission (the default engine;
the fetch, verify, repair and prune logic is the engine interface's, in ``engine.py``). One
per agent. Every RPC goes through :meth:`SwarmFetcher._rpc`, which
retries connection errors with tenacity (jitter, a deadline) so a daemon restarted by
supervisord is waited for, not failed on. Transmission keeps its torrents across restarts in
its config dir; when it has forgotten one (config dir lost), :meth:`fetch` adds it again and
Transmission re-checks what is already on disk instead of downloading it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
from tenacity import (Retrying, retry_if_exception_type, stop_after_delay,
                      wait_random_exponential)
from transmission_rpc import Client, TransmissionError
from transmission_rpc.error import TransmissionAuthError, TransmissionConnectError

# Re-exported: they lived here before the engine interface (tests and callers import them).
from .engine import (DISK_RESERVE, ERROR_LOCAL, LONELY_SECS, REPAIR_ATTEMPTS,  # noqa: F401
                     SWARM_OVERHEAD_S, Engine, TorrentState, allocated_bytes, choose_transport,
                     decode_metainfo, error_for, retained)
from .errors import DownloadError
from .torrent import infohash, web_seeds

log = structlog.get_logger("dcdeploy.p2p.swarm")

T = TypeVar("T")

FIELDS = ["hashString", "name", "status", "percentDone", "leftUntilDone", "sizeWhenDone",
          "haveValid", "error", "errorString", "downloadDir", "recheckProgress", "corruptEver",
          "peersConnected", "rateDownload", "rateUpload", "uploadedEver", "doneDate"]
# tr_torrent_activity as the RPC reports it (an int in RPC version 16).
STATUS_NAMES = {0: "stopped", 1: "check pending", 2: "checking", 3: "download pending",
                4: "downloading", 5: "seed pending", 6: "seeding"}


def status_name(raw: Any) -> str:
    """The status name for the RPC's int (or an already-named value)."""
    if isinstance(raw, int):
        return STATUS_NAMES.get(raw, f"unknown({raw})")
    return str(getattr(raw, "value", raw))


def state_from_fields(f: dict[str, Any]) -> TorrentState:
    """A :class:`TorrentState` from Transmission's ``torrent-get`` fields (``FIELDS``)."""
    total = int(f.get("sizeWhenDone", 0))
    return TorrentState(infohash=f["hashString"].lower(), name=f.get("name", ""),
                        status=status_name(f.get("status")),
                        done_bytes=total - int(f.get("leftUntilDone", total)),
                        total_bytes=total, error=int(f.get("error", 0)),
                        error_string=f.get("errorString", ""),
                        download_dir=f.get("downloadDir", ""),
                        peers=int(f.get("peersConnected", 0)),
                        rate_down=int(f.get("rateDownload", 0)),
                        rate_up=int(f.get("rateUpload", 0)),
                        uploaded=int(f.get("uploadedEver", 0)),
                        corrupt=int(f.get("corruptEver", 0)))


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


class SwarmFetcher(Engine):
    """The Transmission engine: drive one transmission-daemon over RPC. Thread-safe for distinct infohashes.

    ``rpc_url`` is ``http://HOST:PORT/transmission/rpc``; ``download_dir`` is where releases
    land (the daemon must see the same path: it runs on the same host). ``secret_file``
    holds the RPC password (:func:`.daemon.ensure_secret` made it; read again on every
    reconnect); None sends no credentials. ``runner(fn)`` runs each RPC exchange and returns
    its result: the default calls it here; the namespace lab runs it on a thread inside the
    daemon's network namespace, whose loopback is where the RPC listens."""

    name = "transmission"

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
                return state_from_fields(c.get_torrent(infohash_, arguments=FIELDS).fields)
            except KeyError:
                return None
        return self._rpc(call)

    def states(self) -> list[TorrentState]:
        return self._rpc(lambda c: [state_from_fields(t.fields)
                                    for t in c.get_torrents(arguments=FIELDS)])

    def add(self, metainfo: bytes, *, download_dir: Path | None = None,
            origin: bool = False) -> str:
        """Add (idempotent: an existing torrent is left as it is) and start it now, high
        bandwidth priority, bypassing the queue. Returns the infohash. Data already in
        ``download_dir`` is checked by the daemon, not downloaded again. ``origin`` changes
        nothing: Transmission 3.00 has no super-seeding."""
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

    def start(self, infohash_: str) -> None:
        self._rpc(lambda c: c.start_torrent_now(infohash_))

    def verify(self, infohash_: str) -> None:
        self._rpc(lambda c: c.verify_torrent(infohash_))

    def reannounce(self, infohash_: str) -> None:
        """Ask the tracker for peers now. For a torrent with no peer at all (the only case
        the fetch asks for), the torrent is stopped and started rather than sent
        ``torrent-reannounce``: Transmission drops a manual announce silently until
        ``manualAnnounceAllowedAt``, which every tracker response sets to now + the tier's
        min interval, and a tier that has never had a good answer (a restarted daemon's)
        uses the default, 120 s; a failed announce is retried after 20 s, then 5-6 min.
        That is how a restarted daemon sat with 0 peers for 120 s (issue #12). Starting a
        stopped torrent queues a "started" announce for now, whatever the tier's timers
        say; with no peer, no connection is lost. (The RPC's ``manualAnnounceTime`` does
        not tell: it reads -1 while no announce of the tier has succeeded.)"""
        def call(c: Client) -> str:
            try:
                peers = c.get_torrent(infohash_, arguments=["peersConnected"]).fields.get(
                    "peersConnected", 0)
            except KeyError:
                return "missing"  # the fetch loop adds it again
            if peers:
                c.reannounce_torrent(infohash_)
                return "reannounce"
            c.stop_torrent(infohash_)
            c.start_torrent_now(infohash_)
            return "restart"
        how = self._rpc(call, retry_secs=5.0)
        if how == "restart":
            log.info("swarm.reannounce_by_restart", infohash=infohash_,
                     reason="no peer; transmission may drop a manual announce for 120 s")

    def remove(self, infohash_: str, delete_data: bool) -> None:
        """Drop a torrent (and, with ``delete_data``, its files). Idempotent."""
        self._rpc(lambda c: c.remove_torrent(infohash_, delete_data=delete_data))
        log.info("swarm.removed", infohash=infohash_, delete_data=delete_data)

    def internal_infohashes(self) -> set[str]:
        return {infohash(_kick_metainfo())}

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
