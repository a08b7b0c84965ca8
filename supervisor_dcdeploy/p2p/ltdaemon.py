"""The libtorrent engine's daemon: one libtorrent session in its own process, per host.

Run it as a supervisord program beside the agent (``conf/ltdaemon.conf.example``)::

    python -m supervisor_dcdeploy.p2p.ltdaemon --state-dir /var/lib/dcdeploy/ltdaemon \\
        --data-root /var/lib/dcdeploy/downloads --address 10.0.0.5 --port 51413

The agent (``engine = libtorrent`` in agent.conf) talks to it through
:class:`.ltengine.LtEngine` over a unix socket, ``<state-dir>/control.sock``:

- the socket is made mode 0600 inside a 0700 directory, and every connection's peer uid
  (``SO_PEERCRED``) must be the daemon's own or root's: nothing on the network reaches it;
- one JSON object per line in, one per line out; the operations are a fixed set (``ping``,
  ``add``, ``state``, ``states``, ``detail``, ``start``, ``verify``, ``reannounce``,
  ``flush``, ``remove``), each with checked arguments (an infohash is 40 hex digits, a
  metainfo passes
  :func:`.torrent.check_metainfo`); nothing in a request or in a torrent names a command;
- a download directory must resolve (symlinks followed) inside one of the ``--data-root``
  directories (default: ``<state-dir>/releases``); anything else is refused.

What it uses that Transmission 3.00 lacks (docs/distribution.md, "Engines"): super-seeding
(BEP 16) for a torrent added as the origin (``--super-seed``; off by default), HAVE messages sent when a piece passes its
check (libtorrent does not batch them), a 5 s unchoke interval instead of 10-15 s, a
request queue sized from the measured rate with a cap above the default, and fast
reconnects after a peer or the daemon restarts; and each downloading host asks first for its
own 1/N of the pieces (:func:`share_of`; on by default, ``--no-share-pieces`` turns it off). Peers
still come only from the host's own tracker (the torrents are private; DHT, LSD, UPnP,
NAT-PMP, uTP are off).

Torrents are recorded under ``<state-dir>/torrents/<infohash>.json`` and added again when
the daemon restarts; libtorrent then checks what is on disk, nothing intact is downloaded
again.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import json
import os
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from ..files import atomic_write
from .torrent import check_metainfo, infohash

log = structlog.get_logger("dcdeploy.p2p.ltdaemon")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 8 * 1024 * 1024  # one request line (a metainfo of a 4 GiB release is ~30 kB)
FLUSH_WAIT_SECS = 10.0  # below the client's 15 s socket timeout (ltengine.LtEngine.timeout)
INFOHASH = re.compile(r"\A[0-9a-f]{40}\Z")
ERROR_LOCAL = 3  # as engine.ERROR_LOCAL: the torrent stopped on a local (I/O) error

# Session settings, each explained in docs/distribution.md ("libtorrent settings").
LT_SETTINGS: dict[str, Any] = {
    # Closed swarm: peers only from our own tracker.
    "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
    "enable_ip_notifier": False,
    # TCP only on our LAN (uTP yields to TCP and costs CPU); clear text (obfuscation only).
    "enable_outgoing_utp": False, "enable_incoming_utp": False,
    "out_enc_policy": 2, "in_enc_policy": 1, "prefer_rc4": False,
    # Never queue: every release starts at once (torrents are added not auto-managed too).
    "active_downloads": -1, "active_seeds": -1, "active_limit": -1, "active_checking": 4,
    # Choking: a fixed number of upload slots, re-evaluated every 5 s (default 15 s). Note:
    # libtorrent's "local" peer class (private and loopback addresses) ignores unchoke slots,
    # so on a data-center network every interested peer is unchoked whatever these say
    # (seen in the timelines; making LAN peers obey 4 slots at the origin measured no
    # better, docs/distribution.md). They matter for peers on public addresses only.
    "choking_algorithm": 0, "unchoke_slots_limit": 8, "unchoke_interval": 5,
    "optimistic_unchoke_interval": 10,
    # Request pipeline: one second of data per peer (libtorrent: 3 s), at most 16 blocks
    # (256 KiB; libtorrent: 500). Measured (docs/distribution.md, "libtorrent tuning"): with
    # the 3 s default a host kept 50-110 blocks queued at the origin, 4-9 s of its share of
    # the origin's link; the pieces it had asked for stayed invisible to the other hosts all
    # that time, so they asked the origin for the same ones. 16 blocks still fill a LAN link
    # from one peer (256 KiB per round trip). A lost request is re-asked after 10 s, not 60.
    "request_queue_time": 1, "max_out_request_queue": 16,
    "request_timeout": 10, "piece_timeout": 10,
    # Our tracker answers every 5 s during a deploy: let libtorrent announce that often
    # (its default floor is 300 s), and reconnect to a peer that went away after 2 s, not 60.
    "min_announce_interval": 5, "min_reconnect_time": 2, "peer_connect_timeout": 5,
    "connection_speed": 50, "max_failcount": 10,
    # Keep the listen port fixed (peers and our tracker know it) and the peer count large.
    "listen_system_port_fallback": False, "connections_limit": 500,
    "alert_mask": 0x1 | 0x8 | 0x40 | 0x10,  # error, storage, status, tracker
}


def settings(address: str, port: int, tuning: dict[str, Any] | None = None,
             share_pieces: bool = False) -> dict[str, Any]:
    """The session's settings: :data:`LT_SETTINGS`, the listen address, then ``tuning``
    (names of libtorrent's settings_pack; none of them runs a command). ``share_pieces``
    (see :func:`share_of`) also turns off libtorrent's whole-piece runs, without which the
    priorities it sets are not followed (``tuning`` may still set it). Pure."""
    out = dict(LT_SETTINGS)
    if share_pieces:
        # libtorrent (request_a_block) asks a peer that could send a piece within
        # whole_pieces_threshold seconds (default 20) for a run of up to rate x 20 s of
        # contiguous pieces around the piece it picked (piece_picker::expand_piece), and
        # expand_piece looks only at whether a piece is free, not at its priority. At
        # ~300 kB/s from the origin and 64 KiB pieces that is a run of ~90 pieces, all
        # queued for that peer at once: a host's share (every N-th piece) was then 1 in N
        # of what it got from the origin, as by chance (measured on loopback: 0.24-0.28
        # own with 4 hosts; 0.74-0.97 with 0, docs/distribution.md).
        out["whole_pieces_threshold"] = 0
    # libtorrent announces from each listen socket, bound to its address; our tracker is
    # on loopback, which a socket bound to the data address cannot reach (measured: every
    # announce timed out). So it also listens on 127.0.0.1, and the data address is marked
    # local-network ("l"): used for peers, never to announce to a tracker outside its net.
    if ipaddress.ip_address(address).is_loopback:
        out["listen_interfaces"] = f"{address}:{port}"
    else:
        out["listen_interfaces"] = f"{address}:{port}l,127.0.0.1:{port}"
    for key in (tuning or {}):
        if key in ("listen_interfaces", "enable_dht", "enable_lsd"):
            raise ValueError(f"tuning may not set {key}")
    out.update(tuning or {})
    return out


# Piece priorities (libtorrent: 1..7, 4 the default; 7 "top" is picked before any other,
# regardless of how many peers have it).
PRIO_DEFAULT = 4
PRIO_SHARE = 7


def _addr_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def share_of(own: str, downloading: Any) -> tuple[int, int] | None:
    """This host's share of a torrent's pieces: ``(rank, n)`` where ``n`` is the number of
    hosts downloading it (this one and the ``downloading`` peer addresses it is connected
    to, seeds excluded) and ``rank`` this host's place among them by address. Every host
    that sees the same set of downloaders computes disjoint shares that cover every piece
    (:func:`share_priorities`). None when no other host downloads it (nothing to share).
    Addresses that do not parse are ignored. Pure."""
    hosts = {_addr_key(own)}
    for a in downloading:
        try:
            hosts.add(_addr_key(a))
        except ValueError:
            continue
    if len(hosts) < 2:
        return None
    ranked = sorted(hosts)
    return ranked.index(_addr_key(own)), len(ranked)


def share_priorities(rank: int, n: int, num_pieces: int) -> list[int]:
    """Piece priorities for share ``(rank, n)``: every n-th piece from ``rank`` on at the
    top priority, the rest at the default. Nothing is excluded (no priority 0): a share
    only orders what a host asks for first; whatever a missing or late host would have
    fetched, the others still fetch. Pure."""
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is not in 0..{n - 1}")
    return [PRIO_SHARE if p % n == rank else PRIO_DEFAULT for p in range(num_pieces)]


def inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path`` (resolved) is one of ``roots`` or below one. Pure but for resolve."""
    real = Path(os.path.realpath(path))
    for root in roots:
        r = Path(os.path.realpath(root))
        if real == r or r in real.parents:
            return True
    return False


class RequestError(ValueError):
    """A request the daemon refuses; its text goes back to the client."""


class LtDaemon:
    def __init__(self, state_dir: Path, roots: list[Path], address: str, port: int,
                 tuning: dict[str, Any] | None = None, super_seed: bool = False,
                 share_pieces: bool = True) -> None:
        import libtorrent as lt
        self.lt = lt
        self.address = address
        # Sharing the pieces among the downloading hosts (share_of): on by default, the
        # measured difference between meeting the 8-host targets and missing them
        # (docs/distribution.md, "Why the share prototype failed").
        self.share_pieces = share_pieces
        self._shares: dict[str, tuple[int, int] | None] = {}  # infohash -> share applied
        # Super-seeding the origin's torrents (BEP 16) is a switch, off by default: measured
        # on 2 hosts x 8 MiB it took 11 s against 0.4 s without (the origin hands each host
        # one piece at a time and waits to see it elsewhere); see docs/distribution.md.
        self.super_seed = super_seed
        self.state_dir = Path(state_dir)
        self.roots = [Path(r) for r in roots]
        self.records = self.state_dir / "torrents"
        self.ses = lt.session(settings(address, port, tuning, share_pieces))
        self._lock = threading.Lock()  # add/remove and the records stay consistent
        # The last file error per torrent (from file_error_alert). A full disk does not set a
        # torrent's error in libtorrent: it switches the torrent to upload mode and retries
        # much later, so the error is reported from here (cleared by start and remove).
        self._file_errors: dict[str, str] = {}
        # flush(): callers waiting for a torrent's cache_flushed_alert (set by pump_alerts).
        self._flush_waiters: dict[str, list[threading.Event]] = {}
        self.stopping = threading.Event()

    # -- torrents -------------------------------------------------------------------------
    def _handle(self, ih: str) -> Any:
        h = self.ses.find_torrent(self.lt.sha1_hash(bytes.fromhex(ih)))
        return h if h.is_valid() else None

    def add(self, metainfo: bytes, save_path: Path, origin: bool, *, record: bool = True) -> str:
        lt = self.lt
        ih = infohash(metainfo)
        with self._lock:
            h = self._handle(ih)
            if h is None:
                atp = lt.add_torrent_params()
                atp.ti = lt.torrent_info(lt.bdecode(metainfo))
                atp.save_path = str(save_path)
                flags = atp.flags
                flags &= ~lt.torrent_flags.auto_managed
                flags &= ~lt.torrent_flags.paused
                if origin and self.super_seed:  # BEP 16 (off by default: see __init__)
                    flags |= lt.torrent_flags.super_seeding
                atp.flags = flags
                h = self.ses.add_torrent(atp)
                self._shares.pop(ih, None)  # a new handle has default priorities
                log.info("ltdaemon.added", infohash=ih, save_path=str(save_path), origin=origin)
            else:
                h.resume()
            if record:
                self.records.mkdir(parents=True, exist_ok=True)
                atomic_write(self.records / f"{ih}.json", json.dumps(
                    {"metainfo": base64.b64encode(metainfo).decode(),
                     "save_path": str(save_path), "origin": origin}).encode())
        return ih

    def remove(self, ih: str, delete_data: bool) -> None:
        with self._lock:
            self._file_errors.pop(ih, None)
            self._shares.pop(ih, None)
            (self.records / f"{ih}.json").unlink(missing_ok=True)
            h = self._handle(ih)
            if h is not None:
                self.ses.remove_torrent(h, self.lt.session.delete_files if delete_data else 0)
                log.info("ltdaemon.removed", infohash=ih, delete_data=delete_data)

    def state(self, ih: str) -> dict[str, Any] | None:
        h = self._handle(ih)
        return None if h is None else self._describe(h.status())

    def states(self) -> list[dict[str, Any]]:
        return [self._describe(s) for s in self.ses.get_torrent_status(lambda s: True)]

    def _describe(self, s: Any) -> dict[str, Any]:
        lt = self.lt
        st = lt.torrent_status.states
        paused = bool(s.flags & lt.torrent_flags.paused)
        if s.state in (st.checking_files, st.allocating):
            status = "checking"
        elif s.state in (st.queued_for_checking, st.checking_resume_data):
            status = "check pending"
        elif paused:
            status = "stopped"
        elif s.state in (st.finished, st.seeding):
            status = "seeding"
        else:
            status = "downloading"
        ih = str(s.info_hashes.v1) if hasattr(s, "info_hashes") else str(s.info_hash)
        error, text = 0, ""
        if s.errc.value() != 0:
            error, text = ERROR_LOCAL, s.errc.message()
        elif ih in self._file_errors and s.flags & (lt.torrent_flags.upload_mode
                                                    | lt.torrent_flags.paused):
            error, text = ERROR_LOCAL, self._file_errors[ih]
        return {"infohash": ih, "name": s.name, "status": status,
                "done_bytes": int(s.total_wanted_done), "total_bytes": int(s.total_wanted),
                "error": error, "error_string": text,
                "download_dir": s.save_path, "peers": int(s.num_peers),
                "rate_down": int(s.download_payload_rate),
                "rate_up": int(s.upload_payload_rate), "uploaded": int(s.all_time_upload),
                "corrupt": int(s.total_failed_bytes), "super_seeding":
                bool(s.flags & lt.torrent_flags.super_seeding)}

    def detail(self, ih: str) -> dict[str, Any] | None:
        """Read-only diagnostics for one torrent: the pieces held (a string of 0/1), the
        peers with their flags, rates, request queues and the piece each is sending us, the
        bytes uploaded and received twice (for the benchmark's timeline and a look at a
        slow fetch; docs/distribution.md). None when the daemon does not have it."""
        h = self._handle(ih)
        if h is None:
            return None
        lt = self.lt
        s = h.status(lt.status_flags_t.query_pieces)
        pi = lt.peer_info
        peers = []
        for p in h.get_peer_info():
            f = p.flags
            peers.append({
                "address": p.ip[0], "seed": bool(f & pi.seed),
                # i: we want its pieces, c: we choke it, I: it wants ours, C: it chokes us,
                # S: snubbed (slow to answer), E: end game
                "flags": "".join(ch for ch, bit in (("i", pi.interesting), ("c", pi.choked),
                                                    ("I", pi.remote_interested),
                                                    ("C", pi.remote_choked),
                                                    ("O", pi.optimistic_unchoke),
                                                    ("o", pi.outgoing_connection),
                                                    ("S", pi.snubbed),
                                                    ("E", pi.endgame_mode)) if f & bit),
                "down": int(p.payload_down_speed), "up": int(p.payload_up_speed),
                "progress": round(float(p.progress), 4),
                "total_down": int(p.total_download), "total_up": int(p.total_upload),
                "queue_down": int(p.download_queue_length),
                "queue_up": int(p.upload_queue_length),
                "piece": int(p.downloading_piece_index)})
        share = self._shares.get(ih)
        return {"pieces": "".join("1" if b else "0" for b in s.pieces), "peers": peers,
                "uploaded": int(s.total_payload_upload), "done_bytes": int(s.total_wanted_done),
                "redundant": int(s.total_redundant_bytes),
                "share": list(share) if share else None}

    def share_tick(self) -> None:
        """With ``share_pieces``: give each torrent this host is downloading the piece
        priorities of its share among the hosts downloading it (:func:`share_of`), again
        whenever that set changes (a host joins, finishes or goes away). Peers still in
        their handshake are left out until their bitfield says whether they are seeds."""
        if not self.share_pieces:
            return
        lt = self.lt
        pi = lt.peer_info
        for h in self.ses.get_torrents():
            try:
                s = h.status()
                if not s.has_metadata or s.is_seeding or s.is_finished:
                    continue
                ih = str(s.info_hashes.v1)
                peers = [p.ip[0] for p in h.get_peer_info()
                         if not p.flags & (pi.seed | pi.connecting | pi.handshake)]
                share = share_of(self.address, peers)
                if share == self._shares.get(ih, None):
                    continue
                n = h.torrent_file().num_pieces()
                h.prioritize_pieces(share_priorities(*share, n) if share
                                    else [PRIO_DEFAULT] * n)
                self._shares[ih] = share
                log.info("ltdaemon.share", infohash=ih, rank=share and share[0],
                         hosts=share and share[1])
            except Exception as exc:  # noqa: BLE001 - e.g. the torrent went away meanwhile;
                # ordering pieces is an optimisation and must never stop the alert loop
                log.warning("ltdaemon.share_failed", error=f"{type(exc).__name__}: {exc}")

    def start(self, ih: str) -> None:
        h = self._handle(ih)
        if h is not None:
            self._file_errors.pop(ih, None)
            h.clear_error()
            h.unset_flags(self.lt.torrent_flags.auto_managed | self.lt.torrent_flags.upload_mode)
            h.resume()

    def verify(self, ih: str) -> None:
        """Re-check every piece on disk: the torrent is removed (files kept) and added again
        from its record, which makes libtorrent check the files from scratch. Not
        force_recheck(): on a torrent that had been complete, libtorrent then kept treating
        the other complete hosts as seeds it need not connect to, and the repair got no peer
        (measured: 0 peers for 120 s while 2 pieces were missing)."""
        with self._lock:
            h = self._handle(ih)
            rec = self.records / f"{ih}.json"
            if h is None:
                return
            if not rec.exists():
                h.force_recheck()
                return
            data = json.loads(rec.read_text())
            self.ses.remove_torrent(h)
        self._wait_removed(ih)
        self.add(base64.b64decode(data["metainfo"]), Path(data["save_path"]),
                 bool(data.get("origin")), record=False)

    def _wait_removed(self, ih: str, timeout: float = 10.0) -> None:
        """remove_torrent is asynchronous; adding the same infohash before it is gone fails."""
        deadline = time.monotonic() + timeout
        while self._handle(ih) is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def flush(self, ih: str, timeout: float = FLUSH_WAIT_SECS) -> bool:
        """Block until the data libtorrent holds for ``ih`` in its disk cache is written to
        the files; True once it is, False after ``timeout`` or for an unknown torrent.

        Needed before anyone reads a file libtorrent reports complete: libtorrent 2.x
        counts a piece as had once its hash passed, and the hash is computed from the
        blocks in memory, while their writes are still queued (measured with a web seed on
        loopback: 6 of 8 downloads reported complete with the file's bytes not all
        written; once, in CI, with the file not created yet). flush_cache() writes what
        was cached when it was called and posts cache_flushed_alert after. (The alert
        carries no request id: a concurrent flush of the same torrent may wake this one
        early; one fetch per torrent at a time is the engine's use.)"""
        h = self._handle(ih)
        if h is None:
            return False
        done = threading.Event()
        with self._lock:
            self._flush_waiters.setdefault(ih, []).append(done)
        try:
            h.flush_cache()
            return done.wait(timeout)
        finally:
            with self._lock:
                waiters = self._flush_waiters.get(ih, [])
                if done in waiters:
                    waiters.remove(done)
                if not waiters:
                    self._flush_waiters.pop(ih, None)

    def _flushed(self, ih: str) -> None:
        with self._lock:
            for done in self._flush_waiters.get(ih, []):
                done.set()

    def reannounce(self, ih: str) -> None:
        h = self._handle(ih)
        if h is not None:
            h.force_reannounce(0, -1, self.lt.reannounce_flags_t.ignore_min_interval)

    def restore(self) -> None:
        """Add back every recorded torrent (after a restart); bad records are skipped."""
        for path in sorted(self.records.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                meta = base64.b64decode(rec["metainfo"], validate=True)
                check_metainfo(meta)
                save = Path(rec["save_path"])
                if not inside(save, self.roots):
                    raise ValueError(f"save path {save} outside the data roots")
                self.add(meta, save, bool(rec.get("origin")), record=False)
            except (OSError, ValueError, KeyError, TypeError, binascii.Error,
                    RuntimeError) as exc:
                log.warning("ltdaemon.bad_record", path=str(path), error=str(exc))

    # -- requests -------------------------------------------------------------------------
    def handle(self, req: Any) -> Any:
        """Answer one decoded request; :class:`RequestError` for anything refused."""
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise RequestError("a request is a JSON object with an 'op'")
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "states":
            return self.states()
        if op == "add":
            try:
                meta = base64.b64decode(str(req.get("metainfo", "")), validate=True)
                check_metainfo(meta)
            except (binascii.Error, ValueError, TypeError) as exc:
                raise RequestError(f"metainfo: {exc}") from None
            save = req.get("save_path")
            if not isinstance(save, str) or not os.path.isabs(save):
                raise RequestError("save_path: an absolute path is required")
            if not inside(Path(save), self.roots):
                raise RequestError(f"save_path {save} is outside the data roots "
                                   f"{[str(r) for r in self.roots]}")
            return self.add(meta, Path(save), bool(req.get("origin", False)))
        ih = req.get("infohash")
        if not isinstance(ih, str) or not INFOHASH.match(ih):
            raise RequestError("infohash: 40 lowercase hex digits required")
        if op == "state":
            return self.state(ih)
        if op == "detail":
            return self.detail(ih)
        if op == "start":
            return self.start(ih)
        if op == "verify":
            return self.verify(ih)
        if op == "reannounce":
            return self.reannounce(ih)
        if op == "flush":
            return self.flush(ih)
        if op == "remove":
            return self.remove(ih, bool(req.get("delete_data", False)))
        raise RequestError(f"unknown op {op!r}")

    def pump_alerts(self) -> None:
        """Drain libtorrent's alerts (it keeps them until popped); log the errors. Also
        updates the piece shares about once a second (:meth:`share_tick`)."""
        next_share = 0.0
        while not self.stopping.is_set():
            if self.share_pieces and time.monotonic() >= next_share:
                next_share = time.monotonic() + 1.0
                self.share_tick()
            if self.ses.wait_for_alert(500) is None:
                continue
            for a in self.ses.pop_alerts():
                kind = type(a).__name__
                if kind == "file_error_alert":
                    try:
                        ih = str(a.handle.info_hashes().v1)
                        self._file_errors[ih] = f"{a.error.message()} ({a.filename()})"
                    except (AttributeError, RuntimeError):
                        pass
                elif kind == "cache_flushed_alert":
                    try:
                        self._flushed(str(a.handle.info_hashes().v1))
                    except (AttributeError, RuntimeError):
                        pass
                if a.category() & 0x1:  # error_notification
                    log.warning("ltdaemon.alert", kind=kind, message=a.message())
                elif kind in ("tracker_reply_alert", "torrent_finished_alert",
                              "torrent_checked_alert", "hash_failed_alert"):
                    log.info("ltdaemon.event", kind=kind, message=a.message())


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def serve(daemon: LtDaemon, sock_path: Path) -> socketserver.UnixStreamServer:
    """Listen on ``sock_path`` (0600) and answer requests on threads."""
    me = os.getuid()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            if peer_uid(self.request) not in (me, 0):
                return  # another local user: no answer at all
            while True:
                line = self.rfile.readline(MAX_REQUEST + 1)
                if not line:
                    return
                try:
                    if len(line) > MAX_REQUEST:
                        raise RequestError(f"request longer than {MAX_REQUEST} bytes")
                    req = json.loads(line)
                    out = {"ok": True, "result": daemon.handle(req)}
                except (RequestError, ValueError) as exc:
                    out = {"ok": False, "error": str(exc)}
                except Exception as exc:  # noqa: BLE001 - a bad request never kills the daemon
                    log.exception("ltdaemon.request_failed")
                    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                self.wfile.write(json.dumps(out).encode() + b"\n")
                if len(line) > MAX_REQUEST:
                    return

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

    sock_path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        server = Server(str(sock_path), Handler)
    finally:
        os.umask(old)
    os.chmod(sock_path, 0o600)
    return server


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m supervisor_dcdeploy.p2p.ltdaemon",
                                description="libtorrent session for dcdeploy (one per host)")
    p.add_argument("--state-dir", required=True, type=Path,
                   help="state (0700): control.sock, torrents/")
    p.add_argument("--data-root", action="append", type=Path, default=[],
                   help="a directory torrents may be saved in (repeatable; default "
                        "<state-dir>/releases)")
    p.add_argument("--address", required=True, help="the address peers dial (data network)")
    p.add_argument("--port", type=int, default=51413)
    p.add_argument("--socket", type=Path, help="default <state-dir>/control.sock")
    p.add_argument("--tuning", default="", help="JSON object of extra libtorrent settings")
    p.add_argument("--super-seed", action="store_true",
                   help="super-seed (BEP 16) the torrents added as the release's origin")
    p.add_argument("--share-pieces", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for this host's share of the pieces first (1/N of them, N the "
                        "hosts downloading; on by default, docs/distribution.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    roots = [r.resolve() for r in args.data_root] or [state_dir / "releases"]
    for r in roots:
        r.mkdir(parents=True, exist_ok=True)
    try:
        tuning = json.loads(args.tuning) if args.tuning else {}
        if not isinstance(tuning, dict):
            raise ValueError("--tuning must be a JSON object")
        daemon = LtDaemon(state_dir, roots, args.address, args.port, tuning, args.super_seed,
                          args.share_pieces)
    except (ValueError, RuntimeError) as exc:
        print(f"dcdeploy ltdaemon: {exc}", file=sys.stderr)
        return 2
    daemon.restore()
    sock_path = args.socket or state_dir / SOCKET_NAME
    server = serve(daemon, sock_path)
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()

    def on_signal(signum: int, _frame: object) -> None:
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("ltdaemon.ready", socket=str(sock_path), roots=[str(r) for r in roots],
             listen=f"{args.address}:{args.port}", pid=os.getpid())
    try:
        daemon.pump_alerts()
    finally:
        server.shutdown()
        sock_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
