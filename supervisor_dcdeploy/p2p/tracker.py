"""The per-agent BitTorrent tracker (BEP 3 announce, BEP 23 compact peers), backed by the store.

Each agent serves ``GET /announce`` on loopback for its own transmission-daemon only. An
announce registers this host under ``peers/<infohash>/<host>`` (ephemeral JSON
``{"address","port","rack","complete"}``, with the host's *routable* address, never the
127.0.0.1 the announce came from) and answers with the other hosts registered for that
infohash: same rack first, then the rest, capped at ``numwant``. There is no central tracker:
the store is the peer list, and a host whose agent dies vanishes from it with its session.

``GET /status`` answers JSON (registrations and the hosts of the last answer per infohash) for
``supervisorctl dcdeploy status``, tests and debugging.

Trust (docs/distribution.md, "Security"): the tracker answers only infohashes of releases
staged in the store (``staging/<svc>``, re-read every few seconds and on a miss) or named
by ``local_torrents`` (the build host's own seeds, until they are superseded: seen staged
and then replaced, or their peers node pruned by ``dcdeploy stage``); anything else gets a
bencoded failure reason and writes nothing. Announces are parsed with bounds and
rate-limited per client address (:func:`take_token`). ``dcdeploy stage`` removes ``peers/<infohash>`` of releases
no longer staged (:func:`prune_unstaged_peers`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import structlog

from ..model import InvalidData, _get, _load, check_name, dumps
from ..store import NodeExists, NoNode, SessionState, Store, StoreError, layout
from . import bencode

log = structlog.get_logger("dcdeploy.p2p.tracker")

PEERS = layout.PEERS
INTERVAL_ACTIVE = 5  # seconds between announces while a deploy is active
INTERVAL_IDLE = 60
INTRO_WINDOW = 6.0  # seconds an empty host is shown only seeders (see seeders_first)
INTERVAL_INTRO = 2  # its announce interval meanwhile, so it meets the others soon after
DEFAULT_NUMWANT = 50  # BEP 3: "defaults to 50 peers"
MAX_NUMWANT = 200
PEER_CACHE_SECS = 1.0  # an announce storm costs at most one store listing per second per torrent
MAX_QUERY = 2048  # bytes of query string; a real announce is ~300
PEER_ID_LEN = 20  # BEP 3: "A string of length 20"
MAX_COUNTER = 2**63 - 1  # left/downloaded/uploaded: what a 64-bit client can send
STAGED_REFRESH_SECS = 5.0  # re-read staging/* this often while announces come in
STAGED_MISS_SECS = 0.5  # an unknown infohash re-reads staging/* at most this often
# Per client address: a daemon announces each torrent every 5 s while a deploy is active
# (more right after a start): 10/s with bursts of 50 is far above that, far below a flood.
RATE_PER_SEC = 10.0
RATE_BURST = 50.0
MAX_BUCKETS = 4096


class AnnounceError(ValueError):
    """The announce request is malformed; the message is sent back as ``failure reason``."""


@dataclass(frozen=True)
class PeerInfo:
    """``peers/<infohash>/<host>``: a host in the swarm of one torrent."""

    host: str
    address: str
    port: int
    rack: str = ""
    complete: bool = False

    @classmethod
    def parse(cls, infohash: str, host: str, raw: bytes | str | None) -> "PeerInfo":
        """Validate a store node; raise :class:`InvalidData` naming the field."""
        where = f"{PEERS}/{infohash}/{host}"
        check_name(where, "(name)", host)
        data = _load(where, raw)
        address = _get(where, data, "address", str)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise InvalidData(where, "address", f"{address!r} is not an IP address") from None
        port = _get(where, data, "port", int)
        if not 0 < port < 65536:
            raise InvalidData(where, "port", f"{port} is not a TCP port")
        return cls(host, address, port, _get(where, data, "rack", str, ""),
                   _get(where, data, "complete", bool, False))

    def to_json(self) -> bytes:
        return dumps({"address": self.address, "port": self.port, "rack": self.rack,
                      "complete": self.complete})


@dataclass(frozen=True)
class Announce:
    """A parsed ``/announce`` query."""

    infohash: str  # 40 lowercase hex digits
    peer_id: bytes
    port: int
    left: int | None
    event: str  # "", "started", "completed", "stopped"
    numwant: int
    compact: bool
    downloaded: int | None = None


def parse_announce(query: str) -> Announce:
    """Parse the raw query string of an announce (binary ``info_hash`` percent-encoded).

    Bounds: the query at most :data:`MAX_QUERY` bytes, ``info_hash`` exactly 20 bytes,
    ``peer_id`` exactly 20 bytes, ``port`` 1-65535, ``left``/``downloaded`` 0 to 2^63-1,
    ``numwant`` capped to :data:`MAX_NUMWANT` (negative: 0).

    Raises :class:`AnnounceError` naming the bad parameter. Pure."""
    if len(query) > MAX_QUERY:
        raise AnnounceError(f"query of {len(query)} bytes is longer than {MAX_QUERY}")
    # latin-1 maps every byte to one code point, so the 20 raw bytes survive unquoting.
    try:
        params = parse_qs(query, keep_blank_values=True, encoding="latin-1",
                          max_num_fields=64)
    except ValueError as exc:
        raise AnnounceError(f"bad query: {exc}") from None

    def one(name: str, default: str | None = None) -> str:
        values = params.get(name)
        if not values:
            if default is None:
                raise AnnounceError(f"missing parameter {name!r}")
            return default
        return values[0]

    raw_hash = one("info_hash").encode("latin-1")
    if len(raw_hash) != 20:
        raise AnnounceError(f"info_hash must be 20 bytes, got {len(raw_hash)}")
    peer_id = one("peer_id").encode("latin-1")
    if len(peer_id) != PEER_ID_LEN:
        raise AnnounceError(f"peer_id must be {PEER_ID_LEN} bytes, got {len(peer_id)}")

    def number(name: str, text: str, low: int, high: int) -> int:
        # int() alone takes "+1", " 1", "1_0" and 4,300 digits: digits only, bounded length.
        if not re.fullmatch(r"-?[0-9]{1,20}", text):
            raise AnnounceError(f"{name} {text[:30]!r} is not a number")
        value = int(text)
        if not low <= value <= high:
            raise AnnounceError(f"{name} {value} is out of range {low}-{high}")
        return value

    port = number("port", one("port"), 1, 65535)
    left_text = one("left", "")
    downloaded_text = one("downloaded", "")
    left = number("left", left_text, 0, MAX_COUNTER) if left_text else None
    downloaded = number("downloaded", downloaded_text, 0, MAX_COUNTER) \
        if downloaded_text else None
    numwant = number("numwant", one("numwant", str(DEFAULT_NUMWANT)), -MAX_COUNTER,
                     MAX_COUNTER)
    event = one("event", "")
    if event not in ("", "started", "completed", "stopped", "paused"):
        raise AnnounceError(f"unknown event {event[:30]!r}")
    return Announce(infohash=raw_hash.hex(), peer_id=peer_id,
                    port=port, left=left, event=event,
                    numwant=max(0, min(numwant, MAX_NUMWANT)),
                    compact=one("compact", "1") != "0", downloaded=downloaded)


@dataclass(frozen=True)
class Bucket:
    """A token bucket: ``tokens`` left at monotonic time ``at``."""

    tokens: float
    at: float


def take_token(bucket: Bucket | None, now: float, rate: float = RATE_PER_SEC,
               burst: float = RATE_BURST) -> tuple[bool, Bucket]:
    """(allowed, the bucket after this request). Pure.

    A new client starts with a full bucket of ``burst`` tokens; tokens come back at ``rate``
    per second up to ``burst``; a request takes one, or is refused (and takes none) when
    less than one is left. A clock that went backwards refills nothing."""
    if bucket is None:
        bucket = Bucket(burst, now)
    tokens = min(burst, bucket.tokens + max(0.0, now - bucket.at) * rate)
    if tokens >= 1.0:
        return True, Bucket(tokens - 1.0, now)
    return False, Bucket(tokens, now)


def staged_infohashes(staging: dict[str, bytes | str | None]) -> tuple[set[str], list[str]]:
    """(infohashes of the torrents in ``staging/<svc>`` values, problems in words). Pure.

    A value that is not a valid staged release, or whose torrent does not decode, adds a
    problem and no infohash; a release staged with URLs only adds nothing."""
    from ..model import StagedRelease
    from .torrent import infohash
    found: set[str] = set()
    problems: list[str] = []
    for svc, raw in sorted(staging.items()):
        if not raw:
            continue
        try:
            release = StagedRelease.parse(svc, raw)
        except InvalidData as exc:
            problems.append(str(exc))
            continue
        except (RecursionError, ValueError, OverflowError) as exc:  # until model.py bounds it
            problems.append(f"{layout.staged(svc)}: {type(exc).__name__}")
            continue
        if not release.torrent:
            continue
        try:
            found.add(infohash(base64.b64decode(release.torrent, validate=True)))
        except (binascii.Error, ValueError, TypeError, RecursionError) as exc:
            problems.append(f"{layout.staged(svc)}: torrent: {type(exc).__name__}: {exc}")
    return found, problems


def read_staging_values(store: Store) -> dict[str, bytes | None]:
    """``staging/<svc>`` values (raises :class:`StoreError`)."""
    out: dict[str, bytes | None] = {}
    try:
        services = store.children(layout.STAGING)
    except NoNode:
        return out
    for svc in services:
        try:
            out[svc] = store.get(layout.staged(svc))[0]
        except NoNode:
            continue
    return out


def prune_unstaged_peers(store: Store) -> list[str]:
    """Delete ``peers/<infohash>`` (with every host under it) for each infohash that no
    staged release carries any more; return those infohashes. ``dcdeploy stage`` calls
    this after publishing a release, so superseded swarms do not stay in the store forever.

    Hosts still seeding a superseded torrent lose their registration; their trackers
    refuse to register it again (no longer staged). Raises :class:`StoreError`."""
    staged, _ = staged_infohashes(read_staging_values(store))
    try:
        present = store.children(PEERS)
    except NoNode:
        return []
    removed = []
    for ih in present:
        if ih in staged:
            continue
        try:
            store.delete(f"{PEERS}/{ih}", recursive=True)
        except NoNode:
            continue
        removed.append(ih)
    if removed:
        log.info("tracker.pruned_peers", infohashes=removed)
    return removed


def _spread_key(self_host: str, peer: PeerInfo) -> bytes:
    # Stable per asker, different across askers: hosts of one rack don't all pick the same
    # first peers when numwant caps the answer, and answers don't churn between announces.
    return hashlib.sha1(f"{self_host}\0{peer.host}".encode()).digest()


def order_peers(self_host: str, self_rack: str, peers: Iterable[PeerInfo],
                numwant: int) -> list[PeerInfo]:
    """The peers to answer, best first. Pure.

    Excludes ``self_host``; same-rack peers first, then the others, each group in a
    per-asker stable pseudo-random order; at most ``numwant``. One exception keeps a rack
    from starving: when the capped answer holds no complete peer (seeder) but one exists,
    the last slot goes to the first complete peer in the same order."""
    if numwant <= 0:
        return []
    others = [p for p in peers if p.host != self_host]
    same = sorted((p for p in others if self_rack and p.rack == self_rack),
                  key=lambda p: _spread_key(self_host, p))
    rest = sorted((p for p in others if not (self_rack and p.rack == self_rack)),
                  key=lambda p: _spread_key(self_host, p))
    ordered = same + rest
    answer = ordered[:numwant]
    if answer and not any(p.complete for p in answer):
        seeder = next((p for p in ordered[numwant:] if p.complete), None)
        if seeder is not None:
            answer[-1] = seeder
    return answer


def intro_window(engine: str) -> float:
    """The seeders-first window for the hosts' engine. Pure. Transmission: :data:`INTRO_WINDOW`
    (its HAVE batching, see :func:`seeders_first`). libtorrent sends HAVEs at once, and the
    origin super-seeds: it hands a new piece to a host only once it has seen the previous
    one on another host, so hosts that cannot see each other stall (measured: nothing for
    ~10 s on 2 hosts). 0: everyone learns of everyone at once."""
    return 0.0 if engine == "libtorrent" else INTRO_WINDOW


def seeders_first(ann: Announce, peers: list[PeerInfo], waited: float,
                  window: float) -> list[PeerInfo]:
    """The peers an announcing host should learn about now. Pure.

    A host that has nothing yet (``left > 0``, ``downloaded == 0``) is given only the
    complete peers for its first ``window`` seconds, when there are some. Transmission 3.00
    tells connected peers about new pieces in HAVE messages batched for up to 10 s, but sends
    its whole bitfield at once on connecting: hosts that meet once they hold pieces start
    trading at once, where hosts that met empty ignore each other for ~10 s
    (docs/distribution.md, "Downloaders ignore each other"). Everyone else, and anyone
    after the window (seeders that do not unchoke it) or with no seeder around, gets all."""
    empty = bool(ann.left) and not ann.downloaded
    if not empty or waited >= window:
        return peers
    seeders = [p for p in peers if p.complete]
    return seeders or peers


def compact_peers(peers: Sequence[PeerInfo]) -> tuple[bytes, bytes]:
    """(BEP 23 ``peers``, BEP 7 ``peers6``): 6 bytes per IPv4 peer, 18 per IPv6 peer."""
    v4, v6 = bytearray(), bytearray()
    for p in peers:
        addr = ipaddress.ip_address(p.address)
        target = v4 if addr.version == 4 else v6
        target += addr.packed + p.port.to_bytes(2, "big")
    return bytes(v4), bytes(v6)


def announce_response(peers: Sequence[PeerInfo], *, interval: int, compact: bool = True,
                      complete: int | None = None, incomplete: int | None = None) -> bytes:
    """The bencoded answer to an announce. Pure."""
    body: dict[str, Any] = {"interval": interval, "min interval": interval,
                            "complete": sum(p.complete for p in peers) if complete is None
                            else complete,
                            "incomplete": sum(not p.complete for p in peers) if incomplete is None
                            else incomplete}
    if compact:
        v4, v6 = compact_peers(peers)
        body["peers"] = v4
        if v6:
            body["peers6"] = v6
    else:
        body["peers"] = [{"ip": p.address, "port": p.port} for p in peers]
    return bencode.encode(body)


def failure_response(reason: str, interval: int = INTERVAL_ACTIVE) -> bytes:
    return bencode.encode({"failure reason": reason, "interval": interval,
                           "min interval": interval})


class Tracker:
    """One per agent: an HTTP announce endpoint on ``bind``:``port``, in a thread.

    ``address`` is what other hosts must dial (the host's address on the data network);
    ``active()`` says whether a deploy is in progress (short announce interval). Store
    writes are idempotent; after a session loss every registration is re-created by the
    maintenance thread, which also drops registrations not refreshed by an announce within
    ``expire_after`` seconds (the daemon died without saying ``stopped``).

    Only staged infohashes (and those ``local_torrents()`` names) are answered; each client
    address gets ``rate`` announces per second with bursts of ``burst``.
    """

    def __init__(self, store: Store, host: str, address: str, rack: str, port: int = 6969,
                 active: Callable[[], bool] = lambda: False, *, bind: str = "127.0.0.1",
                 interval_active: int = INTERVAL_ACTIVE, interval_idle: int = INTERVAL_IDLE,
                 expire_after: float | None = None, intro_window: float = INTRO_WINDOW,
                 local_torrents: Callable[[], Iterable[str]] = lambda: (),
                 rate: float = RATE_PER_SEC, burst: float = RATE_BURST,
                 staged_miss_secs: float = STAGED_MISS_SECS) -> None:
        check_name("tracker", "host", host)
        ipaddress.ip_address(address)
        self.store = store
        self.host = host
        self.address = address
        self.rack = rack
        self.port = port
        self.bind = bind
        self.active = active
        self.interval_active = interval_active
        self.interval_idle = interval_idle
        self.expire_after = expire_after or 3 * interval_idle + 20
        self.intro_window = intro_window
        self.local_torrents = local_torrents
        self.rate = rate
        self.burst = burst
        self.staged_miss_secs = staged_miss_secs
        self._buckets: dict[str, Bucket] = {}
        self._staged: set[str] = set()
        self._staged_at = -1e9  # monotonic time of the last staging read
        self._staged_lock = threading.Lock()  # one staging read at a time
        self.refused: dict[str, int] = {"unstaged": 0, "rate": 0, "malformed": 0}
        self._first_seen: dict[str, float] = {}  # infohash -> first announce (monotonic)
        self._lock = threading.Lock()
        self._registered: dict[str, tuple[PeerInfo, float]] = {}  # infohash -> (info, last seen)
        self._written: dict[str, PeerInfo] = {}  # what this session wrote
        # Local seeds no longer staged (see refresh_staged, _maintain): neither answered nor
        # registered, so a build host that still seeds an old release does not put its
        # swarm back into the store after `dcdeploy stage` removed it.
        self._superseded: set[str] = set()
        self._cache: dict[str, tuple[float, list[PeerInfo]]] = {}
        self._answers: dict[str, list[str]] = {}
        self._resync = threading.Event()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        store.add_listener(self._on_session)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve in background threads; returns once the socket is listening
        (``self.port`` is then the real port, also when 0 was asked)."""
        tracker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path, _, query = self.path.partition("?")
                if path == "/announce":
                    code, ctype = 200, "text/plain"
                    body = tracker.handle_announce(query, self.client_address[0])
                elif path == "/status":
                    code, ctype = 200, "application/json"
                    body = json.dumps(tracker.status()).encode()
                else:
                    code, ctype, body = 404, "text/plain", b"not found\n"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.2}, name="tracker-http", daemon=True),
            threading.Thread(target=self._maintain, name="tracker-maint", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("tracker.started", host=self.host, bind=self.bind, port=self.port,
                 address=self.address, rack=self.rack)

    def stop(self) -> None:
        """Stop serving and delete this host's registrations (best effort). Idempotent."""
        self._stopping.set()
        self._resync.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        with self._lock:
            infohashes = list(self._written)
            self._registered.clear()
        for ih in infohashes:
            self._unregister(ih)
        log.info("tracker.stopped", host=self.host)

    # -- announce -------------------------------------------------------------------------
    def interval(self) -> int:
        try:
            return self.interval_active if self.active() else self.interval_idle
        except Exception:  # the callback is the agent's; never fail an announce on it
            return self.interval_active

    def handle_announce(self, query: str, client: str = "127.0.0.1") -> bytes:
        """Answer one announce query (the part after ``?``) from ``client`` (its address);
        never raises. Refused (a failure reason, nothing written): over the client's rate,
        malformed, or an infohash that is not staged."""
        interval = self.interval()
        if not self._allow(client):
            self._count("rate")
            return failure_response("too many announces from this address; slow down",
                                    max(interval, INTERVAL_ACTIVE))
        try:
            ann = parse_announce(query)
        except AnnounceError as exc:
            self._count("malformed")
            log.warning("tracker.bad_announce", host=self.host, error=str(exc))
            return failure_response(str(exc), interval)
        if not self.is_staged(ann.infohash):
            self._count("unstaged")
            log.warning("tracker.unstaged", host=self.host, infohash=ann.infohash,
                        client=client)
            with self._lock:
                known = ann.infohash in self._registered or ann.infohash in self._written
                self._registered.pop(ann.infohash, None)
                self._first_seen.pop(ann.infohash, None)
            if known:
                self._unregister(ann.infohash)
            return failure_response(f"infohash {ann.infohash} is not a staged release",
                                    interval)
        if ann.event in ("stopped", "paused"):
            with self._lock:
                self._registered.pop(ann.infohash, None)
                self._first_seen.pop(ann.infohash, None)
            self._unregister(ann.infohash)
            return announce_response([], interval=interval, compact=ann.compact)
        me = PeerInfo(self.host, self.address, ann.port, self.rack, complete=ann.left == 0)
        now = time.monotonic()
        with self._lock:
            self._registered[ann.infohash] = (me, now)
            first = self._first_seen.setdefault(ann.infohash, now)
        self._register(ann.infohash, me)
        known = self._peers(ann.infohash)
        offered = seeders_first(ann, known, now - first, self.intro_window)
        if len(offered) < len([p for p in known if p.host != self.host]):
            interval = min(interval, INTERVAL_INTRO)  # come back soon for the others
        peers = order_peers(self.host, self.rack, offered, ann.numwant)
        with self._lock:
            self._answers[ann.infohash] = [p.host for p in peers]
        log.debug("tracker.announce", host=self.host, infohash=ann.infohash, ann_event=ann.event,
                  left=ann.left, answered=[p.host for p in peers], interval=interval)
        return announce_response(peers, interval=interval, compact=ann.compact)

    def _count(self, why: str) -> None:
        with self._lock:
            self.refused[why] += 1

    def _allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) >= MAX_BUCKETS and client not in self._buckets:
                # Drop the clients whose bucket has refilled: they lose nothing.
                full_after = self.burst / self.rate if self.rate > 0 else 0.0
                self._buckets = {a: b for a, b in self._buckets.items()
                                 if now - b.at < full_after}
                if len(self._buckets) >= MAX_BUCKETS:
                    return False
            allowed, self._buckets[client] = take_token(self._buckets.get(client), now,
                                                        self.rate, self.burst)
        return allowed

    def is_staged(self, infohash: str) -> bool:
        """Whether ``infohash`` may be announced: one of this host's ``local_torrents`` or
        of the staged releases (re-read every :data:`STAGED_REFRESH_SECS`, and on a miss at
        most every ``staged_miss_secs``; the last good read is kept while the store is
        unreachable)."""
        now = time.monotonic()
        with self._lock:
            staged, age = self._staged, now - self._staged_at
        fresh = age < STAGED_REFRESH_SECS
        if fresh and infohash in staged:
            return True
        if infohash in self._local():
            with self._lock:
                if infohash not in self._superseded:
                    return True
            # A superseded seed is answered again only once it is staged again.
        if fresh and age < self.staged_miss_secs:
            return False
        return infohash in self.refresh_staged(sync=infohash not in staged)

    def _local(self) -> set[str]:
        try:
            return set(self.local_torrents())
        except Exception as exc:  # noqa: BLE001 - the callback reads local files
            log.warning("tracker.local_torrents_failed", error=str(exc))
            return set()

    def refresh_staged(self, *, sync: bool = False) -> set[str]:
        """Re-read the staged infohashes now (``sync``: as fresh as the latest write by any
        client, for a release staged a moment ago); drop this host's registrations of
        infohashes no longer staged. Returns the set; on a store error, the last one."""
        with self._staged_lock:
            with self._lock:
                if time.monotonic() - self._staged_at < self.staged_miss_secs:
                    return set(self._staged)  # another thread has just read it
            try:
                if sync:
                    self.store.sync(layout.STAGING)
                staged, problems = staged_infohashes(read_staging_values(self.store))
            except StoreError as exc:
                log.warning("tracker.staging_unavailable", host=self.host,
                            error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self._staged_at = time.monotonic()  # retry after the refresh period
                    return set(self._staged)
            for problem in problems:
                log.warning("tracker.bad_staging", host=self.host, problem=problem)
            local = self._local()
            with self._lock:
                # A local seed staged at the last read and not now was superseded; one
                # staged again is not any more.
                self._superseded = ((self._superseded | self._staged) - staged) & local
                self._staged, self._staged_at = staged, time.monotonic()
                gone = [ih for ih in set(self._registered) | set(self._written)
                        if ih not in staged and (ih not in local or ih in self._superseded)]
                for ih in gone:
                    self._registered.pop(ih, None)
                    self._first_seen.pop(ih, None)
        for ih in gone:
            log.info("tracker.unstaged_dropped", host=self.host, infohash=ih)
            self._unregister(ih)
            try:  # the last host out removes the swarm's node; others still in: NotEmpty
                self.store.delete(f"{PEERS}/{ih}")
            except StoreError:
                pass
        return staged

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"host": self.host, "rack": self.rack, "address": self.address,
                    "refused": dict(self.refused),
                    "registered": {ih: {"port": info.port, "complete": info.complete}
                                   for ih, (info, _) in self._registered.items()},
                    "answers": {ih: list(hosts) for ih, hosts in self._answers.items()}}

    def last_answer(self, infohash: str) -> list[str] | None:
        """Hosts of the last answer for ``infohash``, in order; None before any."""
        with self._lock:
            hosts = self._answers.get(infohash)
            return None if hosts is None else list(hosts)

    # -- store ----------------------------------------------------------------------------
    def _path(self, infohash: str) -> str:
        return f"{PEERS}/{infohash}/{self.host}"

    def _register(self, infohash: str, me: PeerInfo) -> None:
        with self._lock:
            if self._written.get(infohash) == me:
                return
            first = infohash not in self._written
        try:
            if first:
                # A node left by our previous session (agent restarted within the session
                # timeout) would vanish when that session expires: replace it with ours.
                try:
                    self.store.delete(self._path(infohash))
                except NoNode:
                    pass
                try:
                    self.store.create(self._path(infohash), me.to_json(), ephemeral=True)
                except NodeExists:
                    self.store.set(self._path(infohash), me.to_json())
            else:
                try:
                    self.store.set(self._path(infohash), me.to_json())
                except NoNode:
                    self.store.create(self._path(infohash), me.to_json(), ephemeral=True)
        except StoreError as exc:
            log.warning("tracker.register_failed", host=self.host, infohash=infohash,
                        error=f"{type(exc).__name__}: {exc}")
            self._resync.set()
            return
        with self._lock:
            self._written[infohash] = me
        log.info("tracker.registered", host=self.host, infohash=infohash, port=me.port,
                 complete=me.complete)

    def _unregister(self, infohash: str) -> None:
        with self._lock:
            self._written.pop(infohash, None)
        try:
            self.store.delete(self._path(infohash))
        except NoNode:
            pass
        except StoreError as exc:  # the ephemeral goes with the session anyway
            log.warning("tracker.unregister_failed", host=self.host, infohash=infohash,
                        error=f"{type(exc).__name__}: {exc}")
            return
        log.info("tracker.unregistered", host=self.host, infohash=infohash)

    def _peers(self, infohash: str) -> list[PeerInfo]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(infohash)
        if cached and now - cached[0] < PEER_CACHE_SECS:
            return cached[1]
        base = f"{PEERS}/{infohash}"
        try:
            peers = []
            for host in self.store.children(base):
                try:
                    raw, _ = self.store.get(f"{base}/{host}")
                    peers.append(PeerInfo.parse(infohash, host, raw))
                except NoNode:
                    continue  # left between listing and reading
                except InvalidData as exc:
                    log.warning("tracker.bad_peer", infohash=infohash, peer=host, error=str(exc))
        except StoreError as exc:
            # Self-sufficiency: keep answering from the last list we saw.
            log.warning("tracker.store_unavailable", host=self.host, infohash=infohash,
                        error=f"{type(exc).__name__}: {exc}", cached=bool(cached))
            return cached[1] if cached else []
        with self._lock:
            self._cache[infohash] = (now, peers)
        return peers

    def _on_session(self, state: SessionState) -> None:
        # Runs on the store's thread: never block here.
        if state is SessionState.LOST:
            with self._lock:
                self._written.clear()  # our ephemerals are gone
        if state in (SessionState.LOST, SessionState.CONNECTED):
            self._resync.set()

    def _maintain(self) -> None:
        failed = False
        while not self._stopping.is_set():
            # After a store error retry every second, not in a tight loop.
            if failed:
                self._stopping.wait(1.0)
            else:
                self._resync.wait(timeout=10.0)
            if self._stopping.is_set():
                return
            self._resync.clear()
            failed = False
            now = time.monotonic()
            with self._lock:
                expired = [ih for ih, (_, seen) in self._registered.items()
                           if now - seen > self.expire_after]
                for ih in expired:
                    del self._registered[ih]
                wanted = {ih: info for ih, (info, _) in self._registered.items()}
            for ih in expired:
                log.info("tracker.expired", host=self.host, infohash=ih)
                self._unregister(ih)
            missing = []
            for ih, info in wanted.items():
                try:
                    present = self.store.exists(self._path(ih)) is not None
                except StoreError:
                    failed = True
                    break
                if not present:
                    missing.append((ih, info))
            if missing:
                # Gone from the store: our session was lost, or `dcdeploy stage` pruned a
                # superseded release's node. Read staging first: a local seed that is not
                # staged is then taken as superseded and not written back (wrongly so only
                # for a seed not staged yet, until it is: refresh_staged forgets it then).
                staged, local = self.refresh_staged(sync=True), self._local()
            for ih, info in missing:
                with self._lock:
                    self._written.pop(ih, None)
                    if ih not in staged and ih in local:
                        self._superseded.add(ih)
                        self._registered.pop(ih, None)
                        self._first_seen.pop(ih, None)
                    wanted_still = ih in self._registered
                if not wanted_still:
                    log.info("tracker.superseded_seed", host=self.host, infohash=ih)
                    continue
                log.info("tracker.reregister", host=self.host, infohash=ih)
                self._register(ih, info)
                with self._lock:
                    failed = failed or ih not in self._written
