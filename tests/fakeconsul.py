"""An in-process fake of the part of Consul's HTTP API that the Consul store uses.

Written from Consul's HTTP API documentation (KV store endpoint, /v1/txn, sessions, blocking
queries) and, for the failure behaviour, from Consul's source (``agent/consul/session_ttl.go``,
``agent/txn_endpoint.go``, ``agent/consul/state/session.go``, the "Blocking Queries" docs);
never compared with a real server: it is what ``tests/test_store_contract.py`` and
``tests/test_consul_faithful.py`` verify the Consul backend against, so where it is wrong the
backend may be wrong too (see docs/consul.md, "What is verified").

Semantics kept:

* one raft-like ``index`` that every write bumps; entries carry CreateIndex, ModifyIndex,
  LockIndex, Flags, Value (base64 on the wire), Session; a write that changes nothing
  (same Value, Flags, Session, LockIndex) keeps the old ModifyIndex, as recent Consul does;
* ``GET /v1/kv/<key>`` with ``recurse``, ``keys`` + ``separator``, ``consistent``/``stale``
  (accepted, all reads here are fresh), blocking ``index`` + ``wait`` (default 5 min, at
  most 10, plus up to wait/16 of jitter; ``index`` 0 or absent does not block): the read
  is held until its ``X-Consul-Index`` passes ``index``. ``X-Consul-Index`` of a listing
  is the highest ModifyIndex among the matching keys and their tombstones, else the KV
  tables' index (state/kvs.go); of a single key, its ModifyIndex, else the tables' index
  (kvs_endpoint.go Get). :meth:`FakeConsul.bad_index` makes the next answers carry 0 or
  no header (a bug the "Blocking Queries" docs warn of);
* ``PUT`` with ``cas`` (0: only if absent), ``acquire``/``release``, ``flags``; ``DELETE`` with
  ``recurse`` and ``cas``;
* sessions: ``create`` (TTL 10s..86400s, Behavior release|delete, LockDelay, default 15s),
  ``renew`` (404 when gone), ``destroy``, ``info``; invalidation deletes (``delete``) or
  unlocks (``release``) the session's keys and puts their lock-delay in force.
  **TTL timers as Consul runs them** (session_ttl.go): the leader arms a timer of
  ``TTL x SessionTTLMultiplier`` (2) at create and at every renew, so a session that stops
  renewing goes between TTL and 2 x TTL after its last renew as seen by the client
  (here: exactly 2 x TTL after the last renew the fake received); timers run only while
  there is a leader (``clearAllSessionTimers`` on stepping down) and a newly elected leader
  re-arms *every* session's timer from scratch (``initializeSessionTimers``), so each
  election extends every session, also a crashed host's, by up to 2 x TTL;
* the node: sessions belong to the fake agent's node (``fake-node``). A session is tied to
  the node's ``serfHealth`` check unless it is created with ``Checks: []`` (or the newer
  ``NodeChecks``/``ServiceChecks`` lists given; agent/session_endpoint.go defaults both
  ``Checks`` and ``NodeChecks`` to serfHealth and ``fixupEmptySessionChecks`` makes an
  empty ``Checks`` empty both): :meth:`FakeConsul.set_serf_health`
  ``critical`` invalidates the tied sessions; :meth:`FakeConsul.deregister_node`
  invalidates *every* session of the node, checks or not (state/catalog.go deleteNodeTxn
  deletes the node's sessions). Creating a session while the node is not registered is a
  500 ``Missing node registration``; with a critical check, a 500 ``Check 'serfHealth' is
  in critical state``;
* leader elections: :meth:`FakeConsul.lose_leader` / :meth:`FakeConsul.elect_leader`, or
  :meth:`FakeConsul.election` (the next ``n`` requests that need a leader fail, then a
  leader is elected). Without a leader every request except a ``?stale`` read is a 500
  ``No cluster leader`` (structs.ErrNoLeader; nothing was applied);
* lost responses: :meth:`FakeConsul.lose_response` makes the next matching request apply
  (or not, ``applied=False``) and then drops the connection without an answer, as when a
  client times out or a server dies after the raft commit;
* tombstones: deleted keys leave a tombstone carrying the delete's index, so a listing's
  ``X-Consul-Index`` counts deletes; :meth:`FakeConsul.reap_tombstones` drops them as
  Consul's tombstone GC does (``state/tombstone_gc.go``, after ``tombstone_ttl``), after
  which a prefix's index can go *backwards* (the "Blocking Queries" docs: clients must
  reset their index when it does);
* ``PUT /v1/txn``: KV verbs set, cas, lock, unlock, get, get-tree, check-index,
  check-session, check-not-exists, delete, delete-tree, delete-cas; all or nothing; 409 with
  ``Errors[{OpIndex, What}]`` for every failed op (later ops see earlier ops' effects); no
  result entries for deletes and check-not-exists; at most 64 ops before Consul 1.14 and
  128 since (``maxTxnOps`` in agent/txn_endpoint.go; ``FakeConsul(version=...)``), 413
  ``Transaction contains too many operations (N > M)`` beyond.

* ACLs (off until :meth:`FakeConsul.add_token` makes the first token; then the default
  policy is *deny*, as a production Consul is set up): a token is a set of ``key_prefix``
  rules (the longest matching prefix decides: ``read``, ``write`` or ``deny``) and a
  ``session_prefix`` level; requests name it with ``X-Consul-Token`` (or ``?token=``, or
  ``Authorization: Bearer``); no token is the anonymous token. As in Consul's
  ``agent/consul/kvs_endpoint.go`` and ``txn_endpoint.go``: reading a key needs ``read``
  (else 403), listings are filtered to readable keys, writes need ``write`` (403 outside a
  transaction), ``delete-tree`` needs write on the whole prefix; inside ``/v1/txn`` every op
  is checked before any is applied (``get``/``get-tree`` are filtered instead,
  ``check-index``/``check-session`` need read, every other verb write), and the denials come
  back as **409** with ``Errors[{OpIndex, What}]`` where ``What`` is Consul's text
  ``Permission denied: token with AccessorID '<id>' lacks permission 'key:write' on
  "<key>"`` (acl/errors.go), exactly as CAS failures do; results are filtered to readable
  keys. An unknown token is 403 ``ACL not found``. Sessions need ``session:write``.
* TLS: ``FakeConsul(tls=ssl_context)`` serves https (a context with ``CERT_REQUIRED`` asks
  for client certificates, like ``verify_incoming``).

Counting (the traffic tests): ``requests``, ``by_kind`` (read, block, txn, write, renew,
session), ``by_token``, ``log`` (every request: kind, token, path), ``txns`` (every
transaction: token, its (verb, key) pairs) and ``answered`` (every blocking read: key,
index asked, index answered).

Test hooks: :meth:`FakeConsul.expire_session` (as if its TTL ran out), :meth:`down` /
:meth:`up` (stop listening / listen again on the same port: the server is unreachable, its
state and session timers go on), the election, node, lost-response and tombstone hooks
above, and ``FakeConsul(clock=ManualClock())``: session timers and lock-delays then follow
a clock the test advances (:meth:`ManualClock.advance`, then :meth:`FakeConsul.run_timers`),
so TTL behaviour is tested with Consul's real TTLs (10 s minimum) without waiting for them.

Deviations from Consul kept on purpose: one server (no followers, so no stale reads, and
a leaderless cluster answers at once instead of holding the request for up to
``rpc_hold_timeout``); the expiry timer fires at exactly 2 x TTL after the last renew.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
SESSION_TTL_MULTIPLIER = 2  # structs.SessionTTLMultiplier: the leader's timer is 2 x TTL
NO_LEADER = "No cluster leader"  # structs.ErrNoLeader


def max_txn_ops(version: tuple[int, ...]) -> int:
    """agent/txn_endpoint.go maxTxnOps: 64 before Consul 1.14, 128 since."""
    return 64 if version < (1, 14) else 128


class ManualClock:
    """A monotonic clock that moves only when the test says (``FakeConsul(clock=...)``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def duration(text: Any, default: float) -> float:
    """A Go duration ("10s", "1m30s", "0s") or a number of nanoseconds, in seconds."""
    if text is None or text == "":
        return default
    if isinstance(text, (int, float)):
        return float(text) / 1e9
    parts = re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", str(text))
    if not parts:
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * UNITS[u] for n, u in parts)


class TxnError(Exception):
    pass


class _ServerError(Exception):
    """An RPC error the HTTP layer answers with 500 and the text."""


ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"  # Consul's anonymous token
FAKE_NODE = "fake-node"  # the node this fake agent runs on (sessions are made for it)
READ_VERBS = ("get", "get-tree")  # filtered on output, not checked before
CHECK_VERBS = ("check-index", "check-session")  # need key:read


class Denied(Exception):
    """An ACL refusal; ``str()`` is Consul's error text."""


@dataclass
class FakeToken:
    """An ACL token: ``keys`` maps a key prefix to read | write | deny (Consul's
    ``key_prefix`` rules; the longest matching prefix wins, no match is deny)."""

    secret: str
    accessor: str
    keys: dict[str, str] = field(default_factory=dict)
    session: str = "write"  # session_prefix "" level: write | read | deny

    def level(self, key: str) -> str:
        best = max((p for p in self.keys if key.startswith(p)), key=len, default=None)
        return "deny" if best is None else self.keys[best]

    def _denied(self, resource: str, level: str, name: str) -> Denied:
        # acl/errors.go, PermissionDeniedError.Error()
        if self.accessor == ANONYMOUS_ACCESSOR:
            return Denied(f"Permission denied: anonymous token lacks permission "
                          f"'{resource}:{level}' on \"{name}\". The anonymous token is used "
                          "implicitly when a request does not specify a token.")
        return Denied(f"Permission denied: token with AccessorID '{self.accessor}' lacks "
                      f"permission '{resource}:{level}' on \"{name}\"")

    def can_read(self, key: str) -> bool:
        return self.level(key) in ("read", "write")

    def need_read(self, key: str) -> None:
        if not self.can_read(key):
            raise self._denied("key", "read", key)

    def need_write(self, key: str) -> None:
        if self.level(key) != "write":
            raise self._denied("key", "write", key)

    def need_write_prefix(self, prefix: str) -> None:
        # KeyWritePrefix: write on the prefix and no narrower rule under it taking it away.
        if self.level(prefix) != "write" or any(
                p.startswith(prefix) and lvl != "write" for p, lvl in self.keys.items()):
            raise self._denied("key", "write", prefix)

    def need_session_write(self) -> None:
        if self.session != "write":
            raise self._denied("session", "write", FAKE_NODE)


class _AllowAll(FakeToken):
    """ACLs disabled: everything is allowed (the fake's default, like a dev agent)."""

    def level(self, key: str) -> str:
        return "write"

    def need_session_write(self) -> None:
        pass


class FakeConsul:
    """State plus an HTTP server on 127.0.0.1 (``port`` 0: pick one)."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None, *,
                 version: str = "1.17.0", clock: Callable[[], float] | None = None) -> None:
        self.port = port
        self.tls = tls
        self.version = tuple(int(p) for p in version.split("."))
        self.max_txn_ops = max_txn_ops(self.version)
        self.clock: Callable[[], float] = clock or time.monotonic
        self.leader = True
        self._leaderless_left: int | None = None  # election(): requests until a leader
        self.node_registered = True
        self.serf_health = "passing"
        self._bad_index: list[str] = []  # bad_index(): what the next answers carry
        self._lost: list[tuple[str, str, bool]] = []  # lose_response(): (method, path, applied)
        self.table_index = 1  # the KV + tombstones tables' index (never goes back)
        self.tokens: dict[str, FakeToken] = {}  # secret -> token; empty: ACLs disabled
        self.anonymous = FakeToken("", ANONYMOUS_ACCESSOR)  # no rules: denied everything
        self.cond = threading.Condition()
        self.index = 1
        self.kv: dict[str, dict[str, Any]] = {}
        self.tombstones: dict[str, int] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.lock_delay: dict[str, float] = {}  # key -> monotonic time the delay ends
        self.requests = 0
        # Requests by kind (read, block, txn, write, renew, session) and by the token
        # presented ("" for none): what the traffic tests count per host.
        self.by_kind: Counter[str] = Counter()
        self.by_token: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # every request: (kind, token, path)
        # every /v1/txn: (token, [(verb, key), ...]) in the order received (the traffic
        # tests tell its purpose from its operations)
        self.txns: list[tuple[str, list[tuple[str, str]]]] = []
        self.answered: list[tuple[str, int, int]] = []  # blocking reads: (key, index, answer)
        self._connections: set[Any] = set()  # open client sockets, cut by down()
        self._server: _Server | None = None
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="fakeconsul-ttl", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeConsul:
        self.up()
        self._reaper.start()
        return self

    def up(self) -> None:
        """(Re)start listening on ``self.port``."""
        fake = self

        class Handler(_Handler):
            pass
        Handler.fake = fake
        server = _Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls is not None:
            # The handshake runs in the request's thread (first read), not in accept().
            server.socket = self.tls.wrap_socket(server.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fakeconsul-http", daemon=True).start()

    def down(self) -> None:
        """Stop listening: clients get 'connection refused'; state and TTLs go on."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        for conn in list(self._connections):  # keep-alive connections would still answer
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.cond:
            self.cond.notify_all()  # held blocking queries answer now

    def close(self) -> None:
        self._closed.set()
        self.down()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- ACLs -----------------------------------------------------------------------------
    def add_token(self, keys: dict[str, str], session: str = "write") -> str:
        """Make a token with these ``key_prefix`` rules (turns ACLs on); returns its secret."""
        secret = str(uuid.uuid4())
        self.tokens[secret] = FakeToken(secret, str(uuid.uuid4()), dict(keys), session)
        return secret

    def token(self, secret: str | None) -> FakeToken:
        """The token a request presents; raises :class:`Denied` ("ACL not found")."""
        if not self.tokens:
            return _AllowAll("", "")
        if not secret:
            return self.anonymous
        if secret not in self.tokens:
            raise Denied("ACL not found")
        return self.tokens[secret]

    # -- sessions ----------------------------------------------------------------------
    def _reap(self) -> None:
        while not self._closed.wait(0.1):
            self.run_timers()

    def run_timers(self) -> None:
        """Fire the session timers that are due (the leader's ``invalidateSession``).
        Timers run only while there is a leader."""
        with self.cond:
            if not self.leader:
                return
            now = self.clock()
            for sid in [s for s, v in self.sessions.items()
                        if v["ttl"] and now >= v["expires"]]:
                self._invalidate(sid)

    def _arm(self, session: dict[str, Any]) -> None:
        # createSessionTimer: ttl * structs.SessionTTLMultiplier
        session["expires"] = self.clock() + session["ttl"] * SESSION_TTL_MULTIPLIER

    def expire_session(self, sid: str) -> None:
        """Invalidate ``sid`` as Consul does when its TTL runs out."""
        with self.cond:
            self._invalidate(sid)

    def _invalidate(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        self.index += 1
        for key, entry in list(self.kv.items()):
            if entry.get("Session") != sid:
                continue
            if session["lock_delay"] > 0:
                self.lock_delay[key] = self.clock() + session["lock_delay"]
            if session["behavior"] == "delete":
                del self.kv[key]
                self.tombstones[key] = self.index
            else:
                entry = dict(entry, ModifyIndex=self.index)
                entry.pop("Session")
                self.kv[key] = entry
            self.table_index = self.index
        self.cond.notify_all()

    # -- leader elections, the node, lost answers, tombstones (test hooks) ----------------
    def lose_leader(self) -> None:
        """The leader steps down; until :meth:`elect_leader` every request that needs a
        leader is a 500 ``No cluster leader`` and no session timer runs."""
        with self.cond:
            self.leader = False
            self._leaderless_left = None

    def elect_leader(self) -> None:
        """A new leader: ``initializeSessionTimers`` re-arms every session's timer, so every
        session (a crashed host's too) lives another 2 x TTL from now."""
        with self.cond:
            self.leader = True
            self._leaderless_left = None
            for session in self.sessions.values():
                if session["ttl"]:
                    self._arm(session)
            self.cond.notify_all()

    def election(self, requests: int = 1) -> None:
        """Lose the leader for the next ``requests`` requests that need one, then elect."""
        self.lose_leader()
        with self.cond:
            self._leaderless_left = requests

    def _leader_for(self, method: str, params: dict[str, str]) -> bool:
        """False (and count the request) when this request needs a leader and there is
        none. Only ``?stale`` reads are served by any server."""
        if method == "GET" and "stale" in params:
            return True
        with self.cond:
            if self.leader:
                return True
            if self._leaderless_left is not None:
                self._leaderless_left -= 1
                if self._leaderless_left <= 0:
                    self.elect_leader()
            return False

    def deregister_node(self) -> None:
        """The node leaves the catalog (``consul leave``, force-leave, reaped): every
        session on it is invalidated, whatever its checks; new sessions are refused."""
        with self.cond:
            self.node_registered = False
            for sid in list(self.sessions):
                self._invalidate(sid)

    def register_node(self) -> None:
        """The agent's anti-entropy registers its node again."""
        with self.cond:
            self.node_registered = True

    def set_serf_health(self, status: str) -> None:
        """``passing`` | ``critical``: critical invalidates the sessions tied to serfHealth."""
        with self.cond:
            self.serf_health = status
            if status == "critical":
                for sid in [s for s, v in self.sessions.items()
                            if "serfHealth" in v["Checks"]]:
                    self._invalidate(sid)

    def lose_response(self, method: str, path: str, applied: bool = True) -> None:
        """The next ``method`` request whose path starts with ``path`` is applied (or not,
        ``applied=False``), then its connection is dropped with no answer."""
        with self.cond:
            self._lost.append((method, path, applied))

    def _take_lost(self, method: str, path: str) -> bool | None:
        with self.cond:
            for i, (m, p, applied) in enumerate(self._lost):
                if m == method and path.startswith(p):
                    del self._lost[i]
                    return applied
        return None

    def bad_index(self, value: str = "0", times: int = 1) -> None:
        """The next ``times`` answers that carry an X-Consul-Index carry ``value`` instead
        ("0", or "missing": no header). The "Blocking Queries" docs: an index of 0 is a
        Consul bug that happened in some versions; clients must not block on it (they
        would busy-loop) and use 1."""
        with self.cond:
            self._bad_index += [value] * times

    def _take_bad_index(self) -> str | None:
        with self.cond:
            return self._bad_index.pop(0) if self._bad_index else None

    def reap_tombstones(self) -> None:
        """Consul's tombstone GC: the tombstones go, so a prefix whose newest change was
        a delete reports an older X-Consul-Index than before (it goes backwards)."""
        with self.cond:
            self.tombstones.clear()

    def create_session(self, body: dict[str, Any]) -> str:
        body = {k.lower(): v for k, v in body.items()}
        ttl = duration(body.get("ttl"), 0.0)
        if ttl and not 10 <= ttl <= 86400:
            raise ValueError(f"Invalid Session TTL '{body.get('ttl')}', must be between "
                             f"[10s=24h0m0s]")
        behavior = body.get("behavior") or "release"
        if behavior not in ("release", "delete"):
            raise ValueError(f"Invalid Behavior setting '{behavior}'")
        lists = [body.get(k) for k in ("checks", "nodechecks", "servicechecks")]
        if all(v is None for v in lists):
            checks = ["serfHealth"]  # Consul's default: tied to the node's serfHealth
        else:
            checks = [c for v in lists if v for c in v]
        with self.cond:
            if not self.node_registered:
                raise _ServerError("Missing node registration")
            if "serfHealth" in checks and self.serf_health == "critical":
                raise _ServerError("Check 'serfHealth' is in critical state")
            sid = str(uuid.uuid4())
            self.index += 1
            self.sessions[sid] = {
                "ID": sid, "Name": body.get("name", ""), "Behavior": behavior, "ttl": ttl,
                "behavior": behavior, "lock_delay": duration(body.get("lockdelay"), 15.0),
                "CreateIndex": self.index, "Node": FAKE_NODE, "Checks": checks}
            self._arm(self.sessions[sid])
        return sid

    def renew_session(self, sid: str) -> dict[str, Any] | None:
        with self.cond:
            session = self.sessions.get(sid)
            if session is None:
                return None
            self._arm(session)
            return self._session_json(session)

    @staticmethod
    def _session_json(session: dict[str, Any]) -> dict[str, Any]:
        return {"ID": session["ID"], "Name": session["Name"], "Behavior": session["Behavior"],
                "TTL": f"{session['ttl']:g}s" if session["ttl"] else "",
                "LockDelay": int(session["lock_delay"] * 1e9), "Checks": session["Checks"],
                "CreateIndex": session["CreateIndex"]}

    # -- KV reads -----------------------------------------------------------------------
    def query_index(self, prefix: str, exact: bool) -> int:
        """X-Consul-Index of a read. A single key: its ModifyIndex, or the KV tables'
        index when it is missing. A listing (``recurse``/``keys``): the newest change among
        the matching keys and their tombstones (state/kvs.go kvsListTxn), else the KV
        tables' index."""
        if exact:
            # kvs_endpoint.go Get: the key's ModifyIndex when it exists, else the KV
            # tables' index (kvsMaxIndex, tombstones included).
            entry = self.kv.get(prefix)
            return entry["ModifyIndex"] if entry is not None else self.table_index
        match = (lambda k: k == prefix) if exact else (lambda k: k.startswith(prefix))
        best = max([e["ModifyIndex"] for k, e in self.kv.items() if match(k)]
                   + [i for k, i in self.tombstones.items() if match(k)], default=0)
        if best:
            return best
        return self.table_index  # nothing matches: the tables' own index (kvs, tombstones)

    def read(self, key: str, params: dict[str, str],
             readable: Callable[[str], bool] = lambda _k: True) -> tuple[int, Any]:
        """A KV GET; listings hold only the keys ``readable`` allows (Consul filters them
        by the token's read rules; FilterDirEnt)."""
        recurse, keys = "recurse" in params, "keys" in params
        exact = not (recurse or keys)
        with self.cond:
            if "index" in params:
                wanted = int(params["index"] or 0)
                wait = min(duration(params.get("wait"), 300.0), 600.0)
                wait += random.uniform(0, wait / 16)  # Consul's documented jitter
                end = time.monotonic() + wait
                while self.query_index(key, exact) <= wanted and self._server is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            index = self.query_index(key, exact)
            if "index" in params:
                self.answered.append((key, int(params["index"] or 0), index))
            if exact:
                entry = self.kv.get(key)
                return index, None if entry is None else [self._entry_json(entry)]
            found = sorted(k for k in self.kv if k.startswith(key) and readable(k))
            if keys:
                sep = params.get("separator", "")
                out: list[str] = []
                for k in found:
                    cut = k.find(sep, len(key)) if sep else -1
                    name = k if cut < 0 else k[:cut + len(sep)]
                    if not out or out[-1] != name:
                        out.append(name)
                return index, out or None
            return index, [self._entry_json(self.kv[k]) for k in found] or None

    @staticmethod
    def _entry_json(entry: dict[str, Any], value: bool = True) -> dict[str, Any]:
        out = {k: entry[k] for k in ("Key", "CreateIndex", "ModifyIndex", "LockIndex", "Flags")}
        out["Value"] = base64.b64encode(entry["Value"]).decode() \
            if value and entry["Value"] else None
        if entry.get("Session"):
            out["Session"] = entry["Session"]
        return out

    # -- KV writes (one engine for PUT/DELETE and /v1/txn) --------------------------------
    def apply(self, ops: list[dict[str, Any]],
              token: FakeToken | None = None) -> tuple[list[dict], list[dict]]:
        """Run KV ops all-or-nothing. Returns (results, errors); errors empty = applied.

        With a ``token``, every op is checked against its rules first, as Consul's
        Txn.preCheck does: each denied op is an error ``{OpIndex, What: "Permission
        denied: ..."}`` and nothing is applied; results are then filtered to keys the
        token may read (FilterTxnResults)."""
        if token is not None:
            denied = []
            for i, op in enumerate(ops):
                verb, key = op.get("Verb", ""), op.get("Key", "")
                try:
                    if verb == "delete-tree":
                        token.need_write_prefix(key)
                    elif verb in CHECK_VERBS:
                        token.need_read(key)
                    elif verb not in READ_VERBS:
                        token.need_write(key)
                except Denied as exc:
                    denied.append({"OpIndex": i, "What": str(exc)})
            if denied:
                return [], denied
            results, errors = self.apply(ops)
            return [r for r in results if token.can_read(r["KV"]["Key"])], errors
        with self.cond:
            kv = copy.deepcopy(self.kv)
            tomb: dict[str, int] = {}
            idx = self.index + 1
            results: list[dict] = []
            errors: list[dict] = []
            for i, op in enumerate(ops):
                try:
                    results.extend(self._op(kv, tomb, idx, op))
                except TxnError as exc:
                    errors.append({"OpIndex": i, "What": str(exc)})
            if errors:
                return [], errors
            if kv != self.kv or tomb:
                self.index = self.table_index = idx
                self.kv = kv
                self.tombstones.update(tomb)
                self.cond.notify_all()
            return results, []

    def _op(self, kv: dict, tomb: dict, idx: int, op: dict[str, Any]) -> list[dict]:
        verb, key = op.get("Verb", ""), op.get("Key", "")
        index = int(op.get("Index") or 0)
        value = base64.b64decode(op.get("Value") or "")
        flags = int(op.get("Flags") or 0)
        session = op.get("Session") or ""
        entry = kv.get(key)

        def put(sess: str | None = None, lock: bool = False) -> list[dict]:
            new = {"Key": key, "Value": value, "Flags": flags, "ModifyIndex": idx,
                   "CreateIndex": entry["CreateIndex"] if entry else idx,
                   "LockIndex": (entry["LockIndex"] if entry else 0) + (1 if lock else 0)}
            keep = sess if sess is not None else (entry or {}).get("Session")
            if keep:
                new["Session"] = keep
            same = ("Value", "Flags", "LockIndex", "Session")
            if entry is not None and all(entry.get(f) == new.get(f) for f in same):
                # Consul skips a write that changes nothing: the ModifyIndex stays.
                return [{"KV": self._entry_json(entry, value=False)}]
            kv[key] = new
            return [{"KV": self._entry_json(new, value=False)}]

        def remove(k: str) -> None:
            kv.pop(k)
            tomb[k] = idx

        if verb == "set":
            return put()
        if verb == "cas":
            if index == 0 and entry is not None:
                raise TxnError(f"failed to set key {key!r}: it exists (cas index 0)")
            if index != 0 and (entry is None or entry["ModifyIndex"] != index):
                raise TxnError(f"failed to set key {key!r}: modify index is not {index}")
            return put()
        if verb == "lock":
            if session not in self.sessions:
                raise TxnError(f"failed to lock key {key!r}: invalid session {session!r}")
            if entry is not None and entry.get("Session") not in (None, session):
                raise TxnError(f"failed to lock key {key!r}: held by another session")
            if self.clock() < self.lock_delay.get(key, 0.0) and \
                    (entry is None or entry.get("Session") != session):
                raise TxnError(f"failed to lock key {key!r}: lock-delay in force")
            already = entry is not None and entry.get("Session") == session
            return put(session, lock=not already)
        if verb == "unlock":
            if entry is None or entry.get("Session") != session:
                raise TxnError(f"failed to unlock key {key!r}: not held by {session!r}")
            put()
            kv[key].pop("Session", None)
            return [{"KV": self._entry_json(kv[key], value=False)}]
        if verb == "get":
            if entry is None:
                raise TxnError(f"key {key!r} doesn't exist")
            return [{"KV": self._entry_json(entry)}]
        if verb == "get-tree":
            return [{"KV": self._entry_json(kv[k])} for k in sorted(kv) if k.startswith(key)]
        if verb == "check-index":
            if entry is None:
                raise TxnError(f"failed to check index of key {key!r}: it doesn't exist")
            if entry["ModifyIndex"] != index:
                raise TxnError(f"failed index check for key {key!r}: modify index "
                               f"{entry['ModifyIndex']} is not {index}")
            return [{"KV": self._entry_json(entry, value=False)}]
        if verb == "check-session":
            if entry is None:
                raise TxnError(f"failed session check of key {key!r}: it doesn't exist")
            if entry.get("Session", "") != session:
                raise TxnError(f"failed session check for key {key!r}")
            return [{"KV": self._entry_json(entry, value=False)}]
        if verb == "check-not-exists":
            if entry is not None:
                raise TxnError(f"key {key!r} exists")
            return []
        if verb == "delete":
            if entry is not None:
                remove(key)
            return []
        if verb == "delete-tree":
            for k in [k for k in kv if k.startswith(key)]:
                remove(k)
            return []
        if verb == "delete-cas":
            if entry is None or entry["ModifyIndex"] != index:
                raise TxnError(f"failed to delete key {key!r}: modify index is not {index}")
            remove(key)
            return []
        raise TxnError(f"unknown KV verb {verb!r}")


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (down(), a stopped store) is not news


class _Handler(BaseHTTPRequestHandler):
    fake: FakeConsul
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    def log_message(self, *_args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.fake._connections.add(self.connection)

    def finish(self) -> None:
        self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    _drop = False  # lose_response(): the answer is never sent

    def _hangup(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _gate(self, method: str, path: str, params: dict[str, str]) -> bool:
        """The checks every request goes through first: a leader (else 500), and a lost
        answer set up by the test. False: the request is answered (or dropped) already."""
        self._drop = False
        if not self.fake._leader_for(method, params):
            self._send(500, NO_LEADER)
            return False
        lost = self.fake._take_lost(method, path)
        if lost is False:  # dropped before it did anything
            self._hangup()
            return False
        self._drop = lost is True
        return True

    def _send(self, code: int, body: Any, index: int | None = None) -> None:
        if self._drop:  # applied, but the client never hears of it
            self._hangup()
            return
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str)
                         else "text/plain")
        self.send_header("Content-Length", str(len(raw)))
        bad = self.fake._take_bad_index() if index is not None else None
        if bad == "missing":
            index = None
        elif bad is not None:
            index = int(bad)
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        self.end_headers()
        self.wfile.write(raw)

    def _token(self, params: dict[str, str]) -> FakeToken:
        secret = self.headers.get("X-Consul-Token") or params.get("token")
        auth = self.headers.get("Authorization") or ""
        if not secret and auth.startswith("Bearer "):
            secret = auth[len("Bearer "):]
        return self.fake.token(secret)

    def setup_tls(self) -> bool:
        """Finish the TLS handshake (https fake); False when the client failed it."""
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                return False
        return True

    def handle(self) -> None:
        if self.setup_tls():
            super().handle()

    def _parse(self) -> tuple[str, dict[str, str], bytes]:
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        return unquote(parts.path), params, self.rfile.read(length) if length else b""

    def _count(self, method: str, path: str, params: dict[str, str]) -> None:
        fake = self.fake
        fake.requests += 1
        if path.startswith("/v1/kv/") and method == "GET":
            kind = "block" if int(params.get("index") or 0) > 0 else "read"
        elif path == "/v1/txn":
            kind = "txn"
        elif path.startswith("/v1/session/renew/"):
            kind = "renew"
        elif path.startswith("/v1/session/"):
            kind = "session"
        else:
            kind = "write" if path.startswith("/v1/kv/") else "other"
        token = self.headers.get("X-Consul-Token") or params.get("token") or ""
        with fake.cond:
            fake.by_kind[kind] += 1
            fake.by_token[token] += 1
            fake.log.append((kind, token, path))

    def do_GET(self) -> None:
        path, params, _ = self._parse()
        self._count("GET", path, params)
        if not self._gate("GET", path, params):
            return
        try:
            token = self._token(params)
            if path.startswith("/v1/kv/") and not ("recurse" in params or "keys" in params):
                token.need_read(path[len("/v1/kv/"):])
        except Denied as exc:
            return self._send(403, str(exc))
        if path.startswith("/v1/kv/"):
            index, data = self.fake.read(path[len("/v1/kv/"):], params, token.can_read)
            self._send(404 if data is None else 200, "" if data is None else data, index)
        elif path.startswith("/v1/session/info/"):
            with self.fake.cond:
                session = self.fake.sessions.get(path.rsplit("/", 1)[1])
                out = [self.fake._session_json(session)] if session else None
                self._send(200, out, self.fake.index)
        else:
            self._send(404, f"no fake for GET {path}")

    def do_PUT(self) -> None:
        path, params, body = self._parse()
        fake = self.fake
        self._count("PUT", path, params)
        if not self._gate("PUT", path, params):
            return
        try:
            token = self._token(params)
            if path.startswith("/v1/kv/"):
                token.need_write(path[len("/v1/kv/"):])
            elif path.startswith("/v1/session/"):
                token.need_session_write()
        except Denied as exc:
            return self._send(403, str(exc))
        if path.startswith("/v1/kv/"):
            key = path[len("/v1/kv/"):]
            op: dict[str, Any] = {"Key": key, "Value": base64.b64encode(body).decode(),
                                  "Flags": int(params.get("flags") or 0)}
            if "acquire" in params:
                op.update(Verb="lock", Session=params["acquire"])
            elif "release" in params:
                op.update(Verb="unlock", Session=params["release"])
            elif "cas" in params:
                op.update(Verb="cas", Index=int(params["cas"]))
            else:
                op["Verb"] = "set"
            _, errors = fake.apply([op])
            self._send(200, not errors)
        elif path == "/v1/txn":
            try:
                ops = json.loads(body or b"[]")
            except ValueError:
                return self._send(400, "Failed to parse body")
            if len(ops) > fake.max_txn_ops:
                return self._send(413, f"Transaction contains too many operations "
                                       f"({len(ops)} > {fake.max_txn_ops})")
            if not all(isinstance(o, dict) and "KV" in o for o in ops):
                return self._send(400, "only KV operations are faked")
            with fake.cond:
                fake.txns.append((self.headers.get("X-Consul-Token") or "",
                                  [(str(o["KV"].get("Verb")), str(o["KV"].get("Key")))
                                   for o in ops]))
            results, errors = fake.apply([o["KV"] for o in ops],
                                         None if isinstance(token, _AllowAll) else token)
            if errors:
                return self._send(409, {"Results": None, "Errors": errors})
            self._send(200, {"Results": results, "Errors": None})
        elif path == "/v1/session/create":
            try:
                sid = fake.create_session(json.loads(body) if body else {})
            except ValueError as exc:
                return self._send(400, str(exc))
            except _ServerError as exc:
                return self._send(500, str(exc))
            self._send(200, {"ID": sid})
        elif path.startswith("/v1/session/renew/"):
            sid = path.rsplit("/", 1)[1]
            session = fake.renew_session(sid)
            if session is None:
                return self._send(404, f"Session id '{sid}' not found")
            self._send(200, [session])
        elif path.startswith("/v1/session/destroy/"):
            fake.expire_session(path.rsplit("/", 1)[1])
            self._send(200, True)
        else:
            self._send(404, f"no fake for PUT {path}")

    def do_DELETE(self) -> None:
        path, params, _ = self._parse()
        self._count("DELETE", path, params)
        if not self._gate("DELETE", path, params):
            return
        if not path.startswith("/v1/kv/"):
            return self._send(404, f"no fake for DELETE {path}")
        key = path[len("/v1/kv/"):]
        try:
            token = self._token(params)
            if "recurse" in params:
                token.need_write_prefix(key)
            else:
                token.need_write(key)
        except Denied as exc:
            return self._send(403, str(exc))
        op: dict[str, Any]
        if "recurse" in params:
            op = {"Verb": "delete-tree", "Key": key}
        elif "cas" in params:
            op = {"Verb": "delete-cas", "Key": key, "Index": int(params["cas"])}
        else:
            op = {"Verb": "delete", "Key": key}
        _, errors = self.fake.apply([op])
        self._send(200, not errors)
