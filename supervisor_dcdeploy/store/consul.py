"""Consul backend on py-consul: the :class:`~.base.Store` contract over Consul's HTTP API.

Verified only against ``tests/fakeconsul.py`` (an in-process fake written from Consul's HTTP
API documentation), never against a real Consul server: see ``docs/consul.md``.

How the ZooKeeper model maps onto Consul's flat KV store (root ``/dc`` -> key prefix ``dc``):

* **Nodes** are keys: ``"current/api/web-01"`` is ``dc/current/api/web-01``; the root node is
  the key ``dc``. Consul has no tree, so this module keeps ZooKeeper's: ``create`` makes the
  parent keys, a ``Create`` inside ``commit`` requires its parent (``get`` verb), and a
  non-recursive ``delete`` refuses a key that has children (:class:`NotEmpty`; that check is
  a separate read, not atomic with the delete).
* **Versions** are the key's ``ModifyIndex``. ``-1`` means "any version, but it must exist"
  (a ``get`` in the same transaction), as with ZooKeeper. Every set writes a random
  ``Flags`` nonce so that, as in ZooKeeper, a set of unchanged data still makes a new
  version (Consul skips writes that change nothing).
* **Sessions**: one Consul session per store, ``Behavior=delete``, ``TTL=max(10 s,
  session_timeout)``, ``LockDelay=0``, ``Checks: []`` (not tied to the agent's serfHealth:
  the agent we talk to need not be on our host), renewed by a daemon thread every TTL/3.
  Consul expires a session that stops renewing between TTL and 2 x TTL later, and every
  leader election re-arms all timers, so a crashed host's ephemerals can outlive it by
  2 x TTL per election (docs/consul.md). Deregistering the agent's node invalidates the
  session whatever its checks; the new session is refused until the node is back. Renew
  answering 404 means the session was invalidated: listeners get LOST, then a new session
  is made and they get CONNECTED.
  Consul unreachable: SUSPENDED until it answers again.
* **Ephemeral** keys are created ``check-not-exists`` + ``lock`` with our session: Consul
  deletes them when the session is invalidated (``stop()``, TTL expiry, ``destroy``).
* **Sequential** names take a 10-digit suffix from a counter key
  ``<root>/.seq/<parent path>``, bumped with ``cas`` *inside the same transaction* as the
  create (so a failed create consumes no number and two creators never share one); the
  counter is floored at 1 + the largest 10-digit suffix among the parent's children, so
  keys written by hand with ``consul kv put`` do not break the order.
* **commit** is one ``PUT /v1/txn``. A 409 names the failed operation (``Errors[].OpIndex``)
  and why (``What``); it becomes :class:`TransactionFailed` with the index of *our* op.
  Consul takes at most 64 operations per transaction before 1.14 and 128 since (one of
  our ops is up to two of Consul's, plus one parent check per distinct parent); a larger
  change is refused with :class:`TransactionTooLarge` saying so, before sending once
  Consul's 413 has told us its limit. Never split silently: that would not be atomic.
* **Lost answers and elections.** A 500 "No cluster leader" applied nothing: writes too are
  retried until the deadline. Any other lost answer to a transaction (timeout, connection
  cut after sending, another 5xx) may have been applied: every value written by one
  transaction carries the same random ``Flags`` nonce, so a consistent read of one written
  key tells whether it applied (a transaction of deletes only: whether the keys are gone).
  Applied: success, with the results read back. Not applied: the same transaction (same
  sequential names, same nonce) is sent again; if that one conflicts the read-back decides
  again. A create or sequential create whose answer was lost thus never reports
  NodeExists for its own node nor leaves a second node behind.
* **sync()**: Consul has no sync; it switches the calling thread's reads to ``?consistent``
  (leader-verified, never stale) until that thread's next ``commit()``.
* **Following** (the agent: ``coord.FollowCoordinator``): :meth:`ConsulStore.follow_tree`
  keeps one blocking recursive read (``?recurse&index=&wait=300s``) per followed key or
  prefix, each answer the subtree's whole content (:class:`TreeFollower`, as Patroni's
  consul.py does; ``hold``: no next read until the caller resumes it);
  :meth:`ConsulStore.read_trees` reads several subtrees in one consistent read-only
  ``/v1/txn`` (the agent's snapshot), :meth:`ConsulStore.commit_reading` writes and
  reads them in one transaction (entering the ready queue). docs/consul.md, "How an
  agent follows".
* **One-shot watches** (the CLI): one background blocking query (``?index=&wait=``) on the
  whole root prefix, started with the first watch. Any change under the root fires every
  pending watch (once). The interface allows spurious wake-ups; this is herd-prone
  compared with ZooKeeper's per-node watches, which is why the agent follows instead.

* **ACL token and TLS** come from the store URL's query (see :func:`consul_auth`):
  ``consul://h:8501/dc?token_file=/etc/dcdeploy/consul.token&ca_file=...&client_cert=...
  &client_key=...``; without them, from Consul's own environment variables. A token file
  (and a client key) readable by group or others is refused. An ACL denial is
  :class:`StoreUnauthorized`, also inside ``/v1/txn``, where Consul answers 409 with
  ``Errors[{OpIndex, What: "Permission denied: ..."}]`` exactly as for a failed CAS.

Every HTTP call has a deadline (``request_timeout``; blocking queries: their wait on top).
Reads are retried with tenacity on transport errors and 5xx until the deadline; writes are
retried when the request provably never left (connection refused / connect timeout) or
Consul had no leader; a transaction whose answer was lost otherwise is read back (above).
The watch's blocking-query index is reset when Consul reports a lower one (tombstones
reaped, snapshot restored), as Consul's "Blocking Queries" docs require. Errors leave this
module only as the :mod:`.base` family (:class:`TransactionTooLarge` is a ``StoreError``).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import consul
import consul.base
import requests
import structlog
from consul.exceptions import ACLDisabled, ACLPermissionDenied, ConsulException, NotFound
from tenacity import (Retrying, retry_if_exception, stop_after_delay,
                      wait_random_exponential)
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from . import StoreURLError
from .acl import CredentialError, check_private_file
from .base import (BadVersion, Check, Create, Delete, NodeExists, NoNode, NotEmpty, Op,
                   OpCounter, SessionState, SetData, Store, StoreError, StoreUnauthorized,
                   StoreUnavailable, TransactionFailed, Watcher)

T = TypeVar("T")

log = structlog.get_logger("dcdeploy.store.consul")

MIN_TTL = 10  # seconds: Consul refuses session TTLs below 10 s
WATCH_WAIT = 5.0  # seconds a watch blocking query may be held by the server
SEQ_DIGITS = 10


# -- error classification at the HTTP boundary ---------------------------------------------
def _never_sent(exc: BaseException) -> bool:
    """True when the request provably did not reach the server (safe to retry a write)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", None)
        return isinstance(reason, (NewConnectionError, ConnectTimeoutError))
    return False


def _server_error(exc: BaseException) -> bool:
    # py-consul raises a bare ConsulException("5xx body") for server errors ("No cluster
    # leader", "rpc error"): the store is unavailable, not our request wrong.
    return type(exc) is ConsulException and str(exc)[:1] == "5"


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, requests.RequestException) or _server_error(exc)


NO_LEADER = "No cluster leader"  # structs.ErrNoLeader: the request was never applied


def _no_leader(exc: BaseException) -> bool:
    """A 500 "No cluster leader" (an election is on): nothing was applied, so a write may
    be sent again."""
    return _server_error(exc) and NO_LEADER in str(exc)


def _write_retryable(exc: BaseException) -> bool:
    return _never_sent(exc) or _no_leader(exc)


TOO_MANY_OPS = re.compile(r"too many operations \((\d+) > (\d+)\)")


# -- credentials and TLS from config ----------------------------------------------------
URL_OPTIONS = ("token_file", "ca_file", "client_cert", "client_key", "tls")
# Consul's own environment variables, read only when the URL does not say (as its CLI does).
ENV_OPTIONS = {"token_file": "CONSUL_HTTP_TOKEN_FILE", "ca_file": "CONSUL_CACERT",
               "client_cert": "CONSUL_CLIENT_CERT", "client_key": "CONSUL_CLIENT_KEY",
               "tls": "CONSUL_HTTP_SSL"}
MAX_TOKEN_BYTES = 4096
# Consul's ACL error texts (acl/errors.go): "Permission denied[: token with AccessorID ...
# lacks permission 'key:write' on \"dc/x\"]" and, for a token it does not know, "ACL not
# found". Inside /v1/txn they come back as an op's ``What`` in a 409, like a failed CAS.
ACL_DENIED = ("Permission denied", "ACL not found")


@dataclass(frozen=True)
class ConsulAuth:
    """How to authenticate to Consul: the ACL token (and where it came from, for messages;
    the token itself is never logged) and the TLS settings handed to requests."""

    token: str | None = None
    source: str = "no token"
    scheme: str = "http"
    verify: bool | str = True  # True: the system CAs; a path: that CA bundle
    cert: tuple[str, str] | None = None  # (client certificate, client key)


def _private_file(what: str, path: str) -> os.stat_result:
    """A secret file must be a regular file of ours (or root's), not readable by group or
    others: a token anyone on the host can read is anyone's token (one rule for every
    store secret: :func:`.acl.check_private_file`)."""
    try:
        check_private_file(Path(path), f"consul {what}")
    except CredentialError as exc:
        raise StoreURLError(str(exc)) from None
    return os.stat(path)


def _read_token(path: str) -> str:
    _private_file("token_file", path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise StoreURLError(f"consul token_file {path!r}: {exc.strerror}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if len(raw) > MAX_TOKEN_BYTES or not token or not token.isprintable() or " " in token:
        raise StoreURLError(f"consul token_file {path!r}: expected one ACL token (a secret "
                            "ID) on one line")
    return token


def consul_auth(url: str, environ: Mapping[str, str] | None = None) -> ConsulAuth:
    """The token and TLS settings for ``url``; raises :class:`StoreURLError` naming the option.

    Options in the URL's query: ``token_file`` (a file holding the ACL token; must not be
    readable by group or others), ``ca_file`` (CA bundle to verify Consul's certificate),
    ``client_cert`` + ``client_key`` (for ``verify_incoming``; the key file private like the
    token), ``tls=1`` (https with the system CAs). Any TLS option means https. An option the
    URL does not give is taken from Consul's environment variable (``CONSUL_HTTP_TOKEN_FILE``,
    ``CONSUL_HTTP_TOKEN``, ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``,
    ``CONSUL_HTTP_SSL``). A token written in the URL itself is refused: URLs are logged."""
    env = os.environ if environ is None else environ
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    if "token" in query:
        raise StoreURLError("consul store URL: do not put the ACL token in the URL (it is "
                            "logged and shown in process lists); write it to a file only "
                            "root can read and give token_file=PATH")
    for name, values in query.items():
        if name not in URL_OPTIONS:
            raise StoreURLError(f"consul store URL: unknown option {name!r} (options: "
                                f"{', '.join(URL_OPTIONS)})")
        if len(values) > 1 or not values[0]:
            raise StoreURLError(f"consul store URL: give {name}= once, with a value")

    def option(name: str) -> tuple[str | None, str]:
        if name in query:
            return query[name][0], f"{name} in the store URL"
        value = env.get(ENV_OPTIONS[name]) or None
        return value, ENV_OPTIONS[name]

    token_file, where = option("token_file")
    if token_file:
        token, source = _read_token(token_file), f"token_file {token_file} ({where})"
    elif env.get("CONSUL_HTTP_TOKEN"):
        token, source = env["CONSUL_HTTP_TOKEN"], "CONSUL_HTTP_TOKEN"
    else:
        token, source = None, "no token (the anonymous token)"
    ca_file, _ = option("ca_file")
    client_cert, _ = option("client_cert")
    client_key, _ = option("client_key")
    tls_flag, where = option("tls")
    tls = None
    if tls_flag is not None:
        if tls_flag.lower() not in ("1", "true", "0", "false"):
            raise StoreURLError(f"consul tls ({where}): {tls_flag!r} is not 1/true or 0/false")
        tls = tls_flag.lower() in ("1", "true")
    if (client_cert is None) != (client_key is None):
        raise StoreURLError("consul store URL: client_cert and client_key go together")
    if tls is False and (ca_file or client_cert):
        raise StoreURLError("consul store URL: tls=0 with a CA or client certificate")
    for name, path in (("ca_file", ca_file), ("client_cert", client_cert)):
        if path and not os.path.isfile(path):
            raise StoreURLError(f"consul {name} {path!r}: no such file")
    if client_key:
        _private_file("client_key", client_key)
    https = bool(tls or ca_file or client_cert)
    return ConsulAuth(token=token, source=source, scheme="https" if https else "http",
                      verify=ca_file or True,
                      cert=(client_cert, client_key) if client_cert and client_key else None)


def _acl_denial(errors: Sequence[dict]) -> dict | None:
    """The first txn error that is an ACL refusal (Consul checks ACLs for every op before
    applying any, so such a 409 applied nothing), else None."""
    for error in errors:
        if any(text in str(error.get("What", "")) for text in ACL_DENIED):
            return error
    return None


@dataclass
class _TxOp:
    """One Consul txn operation and what its failure means for the caller."""

    body: dict[str, Any]
    owner: int | None  # index of the caller's op, None for internal bookkeeping
    role: str  # exists | version | absent | lock | write | counter | parent | mkparent | read


WRITE_VERBS = ("set", "cas", "lock")  # the verbs that write a value (and our Flags nonce)


@dataclass
class _Txn:
    ops: list[_TxOp] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # caller op index -> created path
    # Written as Flags by every value write of this transaction: after a lost answer, a
    # key carrying it proves the transaction applied (all or nothing), as kazoo finds its
    # own sequential node by the uuid in its name. Never 0 (hand-written keys have 0).
    nonce: int = field(default_factory=lambda: random.getrandbits(63) | 1)

    def add(self, owner: int | None, role: str, verb: str, key: str, **extra: Any) -> None:
        if verb in WRITE_VERBS:
            extra["Flags"] = self.nonce
        self.ops.append(_TxOp({"Verb": verb, "Key": key, **extra}, owner, role))


class TransactionTooLarge(StoreError):
    """The change needs more operations than Consul takes in one transaction (``maxTxnOps``
    in Consul's agent/txn_endpoint.go: 64 before Consul 1.14, 128 since). Nothing was
    written. ``needed`` and ``limit`` say by how much."""

    def __init__(self, message: str, needed: int, limit: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.limit = limit


class _OutcomeUnknown(Exception):
    """A write whose answer was lost (timeout, connection cut after sending, a 5xx other
    than "No cluster leader"): it may or may not have been applied."""


def _cause(role: str, what: str) -> StoreError:
    """The :mod:`.base` error a failed txn operation of ``role`` stands for."""
    if role == "absent":
        return NodeExists(what)
    if role in ("exists", "parent"):
        return NoNode(what)
    if role == "version":  # check-index: the key is missing, or at another index
        return NoNode(what) if "doesn't exist" in what or "not exist" in what \
            else BadVersion(what)
    return BadVersion(what)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Raw:
    """py-consul callback returning the raw response (for /v1/txn, whose 409 carries data)."""

    def __call__(self, response: consul.base.Response) -> consul.base.Response:
        return response


FOLLOW_WAIT = 300.0  # seconds a follower's blocking read may be held (Consul's default)
Tree = dict[str, tuple[bytes, int]]  # relative path -> (data, ModifyIndex)


@dataclass(frozen=True)
class TreeAnswer:
    """What one read of a followed subtree said: its whole content at ``index`` (``tree``),
    or ``error`` (the read failed; the follower retries with backoff). ``reset``: the
    index had gone backwards and this is a fresh load (accept it whatever its index).
    ``started``: ``time.monotonic()`` when the request was sent (writes made before it are
    in ``tree``)."""

    follower: TreeFollower
    index: int = 0
    tree: Tree | None = None
    error: StoreError | None = None
    reset: bool = False
    started: float = 0.0


class TreeFollower:
    """One subtree followed the way Patroni's consul.py follows its cluster: a blocking
    recursive read (``?recurse&index=<X-Consul-Index>&wait=``) answered when something
    below the prefix changes, or after ``wait`` (+ up to wait/16), one at a time.

    Consul's "Blocking Queries" docs, followed here: an index that goes *backwards*
    (tombstones reaped after the newest change was a delete, a snapshot restored) resets
    to 0, so the next read returns at once and reloads; an index of 0 or a missing
    ``X-Consul-Index`` is never blocked on (index 1 instead: always safe); and reads are
    rate-limited: at most one per ``interval`` seconds (a burst of changes costs one read;
    :meth:`kick` skips the wait when the caller needs the subtree now). An error (500 "No
    cluster leader", unreachable, 403) is delivered once per failure run and retried with
    backoff up to 5 s; what was delivered before stays valid meanwhile.

    ``hold``: after each answer the follower sends nothing until :meth:`resume` (every
    read is a request: the caller decides whether the next change can matter to it;
    changes meanwhile are answered at once by the next read, all in one answer)."""

    def __init__(self, store: ConsulStore, path: str, recurse: bool, index: int,
                 deliver: Callable[[TreeAnswer], None], interval: float, wait: float,
                 stopping: threading.Event, hold: bool = False) -> None:
        self.store = store
        self.path = path
        self.recurse = recurse
        self.index = index
        self.interval = interval
        self.wait = wait
        self.reads = 0
        self.hold = hold
        self.held = False
        self._deliver = deliver
        self._kick = threading.Event()
        self._go = threading.Event()
        self._cancelled = threading.Event()
        self._stopping = stopping
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"consul-follow-{path}")
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._cancelled.is_set()

    def set_interval(self, seconds: float) -> None:
        """A new rate limit; a shorter one applies from now (the pending wait is cut)."""
        shorter = seconds < self.interval
        self.interval = seconds
        if shorter:
            self.kick()

    def kick(self) -> None:
        self._kick.set()

    def cancel(self) -> None:
        self._cancelled.set()
        self._kick.set()
        self._go.set()

    def resume(self, index: int | None = None) -> None:
        """A held follower (``hold``) sends its next read, from ``index`` when given
        (a later state the caller read otherwise: what it already has is not answered
        again)."""
        if index is not None and index > self.index:
            self.index = index
        if self.held or self._cancelled.is_set():
            self._go.set()

    def _done(self) -> bool:
        return self._cancelled.is_set() or self._stopping.is_set()

    def _run(self) -> None:
        last = -math.inf
        failures = 0
        reset = False
        while not self._done():
            pause = last + self.interval - time.monotonic()
            if pause > 0:
                self._kick.wait(pause)
            self._kick.clear()
            if self._done():
                return
            last = started = time.monotonic()
            index = self.index
            try:
                self.reads += 1
                self.store.ops.read()
                found, tree = self.store._tree_read(
                    self.path, self.recurse, index, self.wait, False, time.monotonic())
            except StoreError as exc:
                if self._done():
                    return
                failures += 1
                if failures == 1:
                    log.warning("consul.follow.error", path=self.path, error=str(exc))
                    self._deliver(TreeAnswer(self, error=exc, started=started))
                self._kick.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
                self._kick.clear()
                continue
            if self._done():
                return
            if found < index:
                log.info("consul.follow.index_reset", path=self.path, was=index, now=found)
                self.index, reset = 0, True  # reload at once, as the docs say
                continue
            found = max(1, found)
            if found == index and not failures and not reset:
                continue  # the wait ran out (or an idempotent write): nothing new
            self.index = found
            if self.hold:
                self.held = True  # before delivering: the caller may resume at once
            self._deliver(TreeAnswer(self, found, tree, reset=reset, started=started))
            failures, reset = 0, False
            if self.hold:
                self._go.wait()
                self._go.clear()
                self.held = False
                last = -math.inf  # resumed: the caller wants it now


class ConsulStore(Store):
    """One Consul session and KV view rooted at ``root`` (see the module docstring)."""

    def __init__(self, url: str, servers: list[tuple[str, int]], root: str,
                 session_timeout: float = 10.0, request_timeout: float | None = None) -> None:
        self.url = url
        self.root = root
        self.prefix = root.strip("/")
        if not self.prefix:
            raise StoreError(f"consul store {url!r}: the root must not be empty (e.g. /dc)")
        self.ops = OpCounter()
        self.servers = servers
        self.auth = consul_auth(url)  # read once: a new token needs a restart (docs/consul.md)
        self.ttl = max(MIN_TTL, math.ceil(session_timeout))
        self.request_timeout = request_timeout or max(2.0, session_timeout / 2)
        self.renew_interval = self.ttl / 3
        self._server = 0  # index into servers; rotated on transport errors
        self._tls = threading.local()
        self._state = SessionState.LOST
        self._session_id: str | None = None
        self._listeners: list[Callable[[SessionState], None]] = []
        self._events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._kick = threading.Event()  # renew now (a call just failed)
        self._closed = True
        self._wlock = threading.Lock()
        self._watch_index = 0
        self._watching = False
        self._pending: dict[Watcher, int] = {}
        self._followers: list[TreeFollower] = []
        self._threads: list[threading.Thread] = []
        # Operations per /v1/txn: unknown until Consul refuses one (413 names the limit);
        # then checked before sending.
        self.max_txn_ops: int | None = None

    # -- HTTP boundary ------------------------------------------------------------------
    def _client(self) -> consul.Consul:
        clients = getattr(self._tls, "clients", None)
        if clients is None:  # one client per thread: requests.Session is not thread-safe
            clients = self._tls.clients = [self._new_client(h, p) for h, p in self.servers]
        return clients[self._server % len(clients)]

    def _new_client(self, host: str, port: int) -> consul.Consul:
        auth = self.auth
        client = consul.Consul(host=host, port=port, token=auth.token, scheme=auth.scheme,
                               verify=auth.verify, cert=auth.cert,
                               connections_timeout=self.request_timeout)
        client.token = auth.token  # py-consul lets CONSUL_HTTP_TOKEN override it: config wins
        return client

    def _unauthorized(self, what: str, body: str) -> StoreUnauthorized:
        body = body.strip()[:300]
        if "ACL not found" in body:
            return StoreUnauthorized(f"consul {what}: Consul does not know the token from "
                                     f"{self.auth.source} ({body}): check the token file")
        return StoreUnauthorized(f"consul {what}: permission denied ({body}); the token from "
                                 f"{self.auth.source} needs key write on the prefix "
                                 f"{self.prefix + '/'!r}, key write on {self.prefix!r} and "
                                 "session write (docs/consul.md, \"ACLs\")")

    def _call(self, what: str, fn: Callable[[consul.Consul], T], *, write: bool = False,
              deadline: float | None = None, attempt_timeout: float | None = None) -> T:
        """Run ``fn(client)`` with retries until ``deadline``; translate every failure.

        Reads retry on transport errors and 5xx; writes only when never sent.
        Raises :class:`StoreUnavailable` (unreachable, no leader, deadline) or
        :class:`StoreError` (refused: ACL, bad request)."""
        if self._closed:
            raise StoreUnavailable(f"consul at {self.url}: store is not started")
        end = deadline if deadline is not None else time.monotonic() + self.request_timeout

        def rotate(_state: Any) -> None:
            self._server += 1

        retrying = Retrying(
            stop=stop_after_delay(max(0.0, end - time.monotonic())),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            retry=retry_if_exception(_write_retryable if write else _transient),
            before_sleep=rotate, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    client = self._client()
                    client.http.connections_timeout = attempt_timeout or \
                        max(0.1, end - time.monotonic())
                    return fn(client)
        except (ACLPermissionDenied, ACLDisabled) as exc:
            raise self._unauthorized(what, str(exc)) from exc
        except requests.RequestException as exc:
            self._server += 1  # the next call (a renew, say) tries the next address
            self._kick.set()
            # A TLS failure says why (unknown CA, no client certificate); others by type.
            detail = f": {str(exc)[:200]}" if isinstance(exc, requests.exceptions.SSLError) \
                else ""
            raise StoreUnavailable(f"consul {what} at {self.url}: {type(exc).__name__}"
                                   f"{detail}") from exc
        except ConsulException as exc:
            if _server_error(exc):
                self._kick.set()
                raise StoreUnavailable(f"consul {what} at {self.url}: {exc}") from exc
            raise StoreError(f"consul {what}: {exc}") from exc
        raise AssertionError("unreachable")  # Retrying(reraise=True) returns or raises

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if path else self.prefix

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:]

    def _kv_get(self, key: str, **kw: Any) -> tuple[int, Any]:
        consistency = "consistent" if getattr(self._tls, "consistent", False) else "default"
        index, data = self._call(f"get {key}", lambda c: c.kv.get(
            key, consistency=consistency, **kw))
        return int(index), data

    def _list(self, path: str) -> tuple[int, list[str]]:
        """(X-Consul-Index, names of the keys one level below ``path``)."""
        index, keys = self._kv_get(self._key(path) + "/", keys=True, separator="/")
        start = len(self._key(path)) + 1
        names = {k[start:].rstrip("/") for k in keys or ()}
        if not path:
            names.discard(".seq")  # the sequence counters are ours, not nodes
        return index, sorted(n for n in names if n)

    # -- session ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Open a session, make the root key, start the renew, watch and callback threads.

        Raises :class:`StoreUnavailable` when Consul does not answer within ``timeout``, or
        refuses (ACL: the message says so). After :meth:`stop` it may be started again
        (with a new session)."""
        if not self._closed:
            raise StoreError(f"consul store {self.url}: already started")
        self._closed = False
        self._stopping = threading.Event()  # per start: threads of an earlier start see theirs
        deadline = time.monotonic() + timeout
        try:
            self._session_id = self._create_session(deadline)
            self.ensure("")
            self._watch_index, _ = self._call("watch index", lambda c: c.kv.get(
                self.prefix, keys=True), deadline=max(deadline, time.monotonic() + 1))
            self._watch_index = max(1, int(self._watch_index))
        except StoreError as exc:
            sid, self._session_id = self._session_id, None
            if sid:  # made before the failure: do not leave it to its TTL
                try:
                    self._call("session destroy", lambda c: c.session.destroy(sid),
                               write=True)
                except StoreError:
                    pass
            self._closed = True
            self._stopping.set()
            if isinstance(exc, StoreUnavailable):
                raise
            # The contract: start() fails only with StoreUnavailable (callers retry it);
            # keep what was wrong (an ACL refusal, say) in the message.
            raise StoreUnavailable(str(exc)) from exc
        self._events = queue.Queue()
        self._set_state(SessionState.CONNECTED)
        for name, target in (("session", self._session_loop), ("events", self._event_loop)):
            thread = threading.Thread(target=target, args=(self._stopping, self._events),
                                      name=f"consul-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._watching = False  # the root watch thread starts with the first one-shot watch
        log.info("consul.connected", url=self.url, session=self._session_id, ttl=self.ttl)

    def stop(self) -> None:
        """Destroy the session (Consul deletes our ephemerals at once) and stop threads."""
        if self._closed:
            return
        self._stopping.set()
        self._kick.set()
        for follower in self._followers:
            follower.cancel()
        self._followers = []
        sid, self._session_id = self._session_id, None
        if sid:
            try:
                self._call("session destroy", lambda c: c.session.destroy(sid), write=True,
                           deadline=time.monotonic() + min(2.0, self.request_timeout))
            except StoreError as exc:  # it will expire after its TTL instead
                log.warning("consul.session.destroy_failed", session=sid, error=str(exc))
        self._closed = True
        self._set_state(SessionState.LOST)
        self._events.put(None)

    def add_listener(self, listener: Callable[[SessionState], None]) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self._state is SessionState.CONNECTED and not self._closed

    @property
    def session_id(self) -> str | None:
        """The current Consul session id (for tests and diagnostics)."""
        return self._session_id

    def _create_session(self, deadline: float) -> str:
        name = f"dcdeploy {socket.gethostname()} pid={os.getpid()} {self.prefix}"
        sid = self._call("session create", lambda c: c.session.create(
            name=name, behavior="delete", ttl=self.ttl, lock_delay=0, checks=[]),
            write=True, deadline=deadline)
        log.info("consul.session.created", session=sid, ttl=self.ttl)
        return str(sid)

    def _set_state(self, state: SessionState) -> None:
        if state is self._state:
            return
        self._state = state
        log.info("consul.session.state", state=state.value, session=self._session_id)
        for listener in list(self._listeners):
            self._events.put(functools.partial(listener, state))

    def _renew(self, sid: str) -> bool:
        """True: renewed. False: Consul says the session is gone (404). One attempt: a
        failure must show as SUSPENDED now, not after a retry budget."""
        def renew(client: consul.Consul) -> bool:
            try:
                client.session.renew(sid)
                return True
            except NotFound:
                return False
        return self._call("session renew", renew, deadline=time.monotonic(),
                          attempt_timeout=self.request_timeout)

    def _session_loop(self, stopping: threading.Event, _events: queue.Queue) -> None:
        while not stopping.is_set():
            wait = self.renew_interval if self._state is SessionState.CONNECTED else 1.0
            self._kick.wait(wait)
            self._kick.clear()
            if stopping.is_set():
                return
            try:
                self._session_step()
            except StoreUnavailable as exc:
                if self._state is SessionState.CONNECTED:
                    log.warning("consul.unreachable", error=str(exc))
                    self._set_state(SessionState.SUSPENDED)
            except StoreError as exc:  # refused (ACL...): keep trying, say why
                log.error("consul.session.error", error=str(exc))
            finally:
                self._kick.clear()  # our own failed call kicked: wait before trying again

    def _session_step(self) -> None:
        sid = self._session_id
        if sid is not None and self._renew(sid):
            self._set_state(SessionState.CONNECTED)
            return
        if sid is not None:
            log.warning("consul.session.lost", session=sid)
            self._session_id = None
            self._set_state(SessionState.LOST)
        new = self._create_session(time.monotonic() + self.request_timeout)
        if self._stopping.is_set():  # stop() raced us: do not leak the new session
            try:
                self._call("session destroy", lambda c: c.session.destroy(new), write=True)
            except StoreError:
                pass
            return
        self._session_id = new
        self._set_state(SessionState.CONNECTED)

    # -- watches ------------------------------------------------------------------------
    def _event_loop(self, _stopping: threading.Event, events: queue.Queue) -> None:
        """The one thread that runs listener and watch callbacks, in order."""
        while True:
            callback = events.get()
            if callback is None:
                return
            try:
                callback()
            except Exception:  # a broken callback must not stop the others
                log.exception("consul.callback.error")

    def _add_watch(self, watch: Watcher, baseline: int) -> None:
        """Fire ``watch`` once on the first change after index ``baseline``.

        ``baseline`` is the larger of the watch thread's index taken *before* the read and
        the read's own X-Consul-Index: either way no later than the state the read saw, so
        any change after the read has a higher index and fires the watch (never lost). A
        change racing the read may fire it needlessly (spurious wake-ups are allowed)."""
        with self._wlock:
            if not self._watching:
                # Started on demand: an agent that follows a mirror (follow_tree) sets no
                # one-shot watch, and a blocking read of the whole root every WATCH_WAIT
                # seconds would be most of its idle traffic.
                self._watching = True
                thread = threading.Thread(target=self._watch_loop,
                                          args=(self._stopping, self._events),
                                          name="consul-watch", daemon=True)
                thread.start()
                self._threads.append(thread)
            if baseline < self._watch_index:
                self._events.put(watch)
                return
            self._pending[watch] = min(baseline, self._pending.get(watch, baseline))

    def _watch_loop(self, stopping: threading.Event, _events: queue.Queue) -> None:
        failures = 0
        while not stopping.is_set():
            index = self._watch_index

            def block(client: consul.Consul, index: int = index) -> tuple[str, Any]:
                return client.kv.get(self.prefix, index=index, wait=f"{WATCH_WAIT:g}s",
                                     keys=True)
            try:
                raw_index, _ = self._call(
                    "watch", block,
                    deadline=time.monotonic() + self.request_timeout + WATCH_WAIT * 1.1,
                    attempt_timeout=self.request_timeout)
            except StoreError as exc:
                if stopping.is_set():
                    return
                failures += 1
                if failures == 1:
                    log.warning("consul.watch.error", error=str(exc))
                stopping.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
                continue
            failures = 0
            new = max(1, int(raw_index))
            if new == index:
                continue  # the wait ran out with no change
            if new < index:
                log.info("consul.watch.index_reset", was=index, now=new)
            with self._wlock:
                # An index that went backwards (tombstones reaped after a delete was the
                # newest change, a snapshot restore, a new cluster): Consul's "Blocking
                # Queries" docs say reset and start over, so we block on the index we were
                # just given and fire everything pending (it may have changed unseen).
                fire = [w for w, base in self._pending.items() if new < index or base < new]
                for w in fire:
                    del self._pending[w]
                self._watch_index = new
            for w in fire:
                self._events.put(w)

    # -- reads --------------------------------------------------------------------------
    def get(self, path: str, watch: Watcher | None = None) -> tuple[bytes, int]:
        self.ops.read()
        baseline = self._watch_index
        index, entry = self._kv_get(self._key(path))
        if entry is None:
            raise NoNode(f"{self._key(path)}: no such key")
        if watch is not None:
            self._add_watch(watch, max(baseline, index))
        return entry.get("Value") or b"", int(entry["ModifyIndex"])

    def exists(self, path: str, watch: Watcher | None = None) -> int | None:
        self.ops.read()
        baseline = self._watch_index
        index, entry = self._kv_get(self._key(path))
        if watch is not None:
            self._add_watch(watch, max(baseline, index))
        return None if entry is None else int(entry["ModifyIndex"])

    def children(self, path: str, watch: Watcher | None = None) -> list[str]:
        """Names of the keys one level below ``path`` (also when the key ``path`` itself
        was never written, e.g. keys put by hand without their parents)."""
        self.ops.read()
        baseline = self._watch_index
        index, names = self._list(path)
        if watch is not None:
            self._add_watch(watch, max(baseline, index))
        return names

    def sync(self, path: str = "") -> None:
        """Switch this thread's reads to ``?consistent`` until its next :meth:`commit`.

        One consistent read of the root now, so that an unreachable or leaderless cluster
        raises :class:`StoreUnavailable` here rather than at the gate read."""
        self.ops.read()
        self._tls.consistent = True
        self._kv_get(self.prefix)

    # -- following subtrees: blocking recursive reads (coord.FollowCoordinator) ---------
    supports_tree_follow = True

    def read_tree(self, path: str, *, recurse: bool = True,
                  consistent: bool = False) -> tuple[int, Tree]:
        """One read of ``path``: with ``recurse`` the key ``path`` and every key below
        ``path + "/"`` (never a sibling such as ``current/AB`` for ``current/A``), else
        the key ``path`` alone. A recursive read is sent for the prefix *without* the
        slash, so that the node ``path`` itself is in it: Consul answers a prefix that
        matches no key (nor tombstone) with the whole KV table's index, and a blocking
        read on that would return on every write anywhere in the store; with the node
        in it, the index is the prefix's own (a sibling's change still wakes it). Returns (X-Consul-Index, {relative path: (data,
        ModifyIndex)}). ``consistent``: leader-verified (``?consistent``), for the gate."""
        self.ops.read()
        return self._tree_read(path, recurse, 0, None, consistent,
                               time.monotonic() + self.request_timeout)

    def follow_tree(self, path: str, deliver: Callable[[TreeAnswer], None], *,
                    recurse: bool = True, index: int = 0, interval: float = 0.0,
                    wait: float | None = None, hold: bool = False) -> TreeFollower:
        """Follow ``path`` (as :meth:`read_tree` reads it) with one blocking read at a
        time, from ``index``, until :meth:`stop` or the follower's ``cancel()``. Every
        answer that says something new is handed to ``deliver`` (on the follower's
        thread: must not block): the subtree's whole content, or the error that kept the
        read from answering. See :class:`TreeFollower`."""
        follower = TreeFollower(self, path, recurse, index, deliver, interval,
                                FOLLOW_WAIT if wait is None else wait, self._stopping,
                                hold=hold)
        self._followers = [f for f in self._followers if f.alive] + [follower]
        return follower

    def read_trees(self, wanted: Sequence[tuple[str, bool]]) -> list[Tree]:
        """Several :meth:`read_tree` reads at one instant, in one request: a read-only
        ``/v1/txn`` of ``get-tree`` verbs sent with ``?consistent`` (Consul serves a
        transaction without writes on its read path, where the consistency modes apply).
        ``wanted``: (path, recursive) pairs; one tree each, in order. For the gate."""
        self.ops.read()
        keys = [self._key(path) for path, _ in wanted]
        payload = json.dumps([{"KV": {"Verb": "get-tree", "Key": key}} for key in keys])

        def put(client: consul.Consul) -> consul.base.Response:
            response = client.http.put(_Raw(), "/v1/txn", params=[("consistent", "1")],
                                       data=payload, headers=client.prepare_headers())
            if response.code >= 500:
                raise ConsulException(f"{response.code} {response.body}")
            return response

        response = self._call("consistent read", put)  # reads: retried on 5xx
        if response.code in (401, 403):
            raise self._unauthorized("consistent read", str(response.body))
        try:
            body = json.loads(response.body) or {}
            results = [r["KV"] for r in body.get("Results") or [] if r.get("KV")]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StoreError(f"consul consistent read: unreadable answer ({exc})") from None
        if response.code != 200:
            raise StoreError(f"consul consistent read: {response.code} "
                             f"{str(response.body)[:200]}")
        return self._trees(keys, [r for _, r in wanted], results)

    def _trees(self, keys: Sequence[str], recursive: Sequence[bool],
               results: Sequence[dict]) -> list[Tree]:
        """Txn Results (``KV`` entries, in op order) sorted into one tree per key; a key
        met twice (a write's result, then a ``get-tree`` after it) keeps the later."""
        trees: list[Tree] = []
        try:
            for key, recurse in zip(keys, recursive):
                tree: Tree = {}
                for entry in results:
                    k = str(entry.get("Key", ""))
                    if k == key or recurse and k.startswith(key + "/"):
                        tree[self._rel(k) if k != self.prefix else ""] = (
                            base64.b64decode(entry.get("Value") or ""),
                            int(entry["ModifyIndex"]))
                trees.append(tree)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"consul txn: unreadable answer ({exc})") from None
        return trees

    def _tree_read(self, path: str, recurse: bool, index: int, wait: float | None,
                   consistent: bool, deadline: float) -> tuple[int, Tree]:
        """GET /v1/kv/<key>[?recurse][&index=&wait=][&consistent]; raises the :mod:`.base`
        family: StoreUnavailable (unreachable, 5xx such as "No cluster leader"),
        StoreUnauthorized (403)."""
        key = self._key(path)
        params: list[tuple[str, Any]] = []
        if recurse:
            params.append(("recurse", "1"))
        if index > 0:
            params += [("index", index), ("wait", f"{wait or FOLLOW_WAIT:g}s")]
        if consistent:
            params.append(("consistent", "1"))
        blocking = (wait or FOLLOW_WAIT) * 17 / 16 if index > 0 else 0.0

        def get(client: consul.Consul) -> consul.base.Response:
            response = client.http.get(_Raw(), f"/v1/kv/{key}", params=params,
                                       headers=client.prepare_headers())
            if response.code >= 500:
                raise ConsulException(f"{response.code} {response.body}")
            return response

        response = self._call(f"read {key}", get, deadline=deadline,
                              attempt_timeout=self.request_timeout + blocking)
        if response.code in (401, 403):
            raise self._unauthorized(f"read {key}", str(response.body))
        if response.code not in (200, 404):
            raise StoreError(f"consul read {key}: {response.code} {str(response.body)[:200]}")
        try:
            # Missing or not a number counts as 0: the caller never blocks on it.
            found = int(response.headers.get("X-Consul-Index") or 0)
        except ValueError:
            found = 0
        tree: Tree = {}
        if response.code == 200:
            try:
                entries = json.loads(response.body) or []
                for entry in entries:
                    k = entry["Key"]
                    if k != key and not (recurse and k.startswith(key + "/")):
                        continue  # a sibling (current/AB for current/A)
                    tree[self._rel(k) if k != self.prefix else ""] = (
                        base64.b64decode(entry.get("Value") or ""), int(entry["ModifyIndex"]))
            except (ValueError, TypeError, KeyError) as exc:
                raise StoreError(f"consul read {key}: unreadable answer ({exc})") from None
        return found, tree

    # -- writes -------------------------------------------------------------------------
    def create(self, path: str, data: bytes = b"", *, ephemeral: bool = False,
               sequential: bool = False) -> str:
        self.ops.write()
        try:
            created = self._commit([Create(path, data, ephemeral, sequential)], makepath=True)
        except TransactionFailed as exc:
            raise exc.cause from exc
        return str(created[0])

    def set(self, path: str, data: bytes, version: int = -1) -> int:
        self.ops.write()
        try:
            result = self._commit([SetData(path, data, version)])
        except TransactionFailed as exc:
            raise exc.cause from exc
        return int(result[0])  # type: ignore[arg-type]

    def delete(self, path: str, version: int = -1, *, recursive: bool = False) -> None:
        """Delete ``path``. Recursive deletes ignore ``version`` and a missing node (like
        kazoo's); a non-recursive one raises :class:`NotEmpty` if it has children."""
        self.ops.write()
        key = self._key(path)
        if recursive:
            tx = _Txn()
            tx.add(0, "write", "delete-tree", key + "/")
            tx.add(0, "write", "delete", key)
            ok, _, errors = self._send_txn(tx, time.monotonic() + self.request_timeout)
            if not ok:
                raise StoreError(f"consul delete-tree {key}: {errors}")
            return
        if self._list(path)[1]:
            raise NotEmpty(f"{key}: has children")
        try:
            self._commit([Delete(path, version)])
        except TransactionFailed as exc:
            raise exc.cause from exc

    def commit(self, ops: Sequence[Op]) -> list[str | int | None]:
        """Apply every op or none, in one ``/v1/txn``; ends this thread's ``sync()``."""
        self.ops.write()
        self._tls.consistent = False
        return self._commit(list(ops))

    def commit_reading(self, ops: Sequence[Op], wanted: Sequence[tuple[str, bool]]
                       ) -> tuple[list[str | int | None], list[Tree]]:
        """:meth:`commit`, and in the same ``/v1/txn`` (after the writes, so showing
        them) a ``get-tree`` of each (path, recursive) in ``wanted``, as
        :meth:`read_trees` reads them: one request for a write and the picture it
        leaves. A transaction with writes goes through raft, so what it reads is the
        leader's state at that entry. Raises as :meth:`commit`. When the answer was lost
        and the outcome read back, the trees are read apart (one more request)."""
        self.ops.write()
        self._tls.consistent = False
        keys = [self._key(path) for path, _ in wanted]
        found: list[dict] = []
        out = self._commit(list(ops), reads=keys, raw=found)
        if not any("Value" in (r.get("KV") or {}) for r in found):
            return out, self.read_trees(wanted)  # read back after a lost answer
        return out, self._trees(keys, [bool(r) for _, r in wanted],
                                [r["KV"] for r in found if r.get("KV")])

    # -- transactions -------------------------------------------------------------------
    def _commit(self, ops: Sequence[Op], makepath: bool = False, reads: Sequence[str] = (),
                raw: list[dict] | None = None) -> list[str | int | None]:
        """``reads``: keys whose ``get-tree`` ends the transaction; its Results go to
        ``raw`` (the caller sorts them out)."""
        deadline = time.monotonic() + self.request_timeout
        mkparents: list[str] = []  # keys to create (cas 0) before the op, create() only
        floors: dict[str, int] = {}  # sequence floors from the listing, kept across retries
        attempt = 0
        while True:
            tx = self._expand(ops, mkparents, floors)
            for key in reads:
                tx.add(None, "read", "get-tree", key)
            ok, results, errors = self._send_txn(tx, deadline)
            if ok:
                if raw is not None:
                    raw[:] = results
                return self._results(ops, tx, results)
            failures = sorted((int(e.get("OpIndex", 0)), str(e.get("What", ""))) for e in errors)
            # Consul reports every failed op. A stale counter or a parent made meanwhile
            # explains the others (our name or parent was taken): those mean "try again".
            index, what = next(((i, w) for i, w in failures
                                if tx.ops[i].role in ("counter", "mkparent")), failures[0])
            failed = tx.ops[index]
            if failed.role == "lock":  # check-not-exists passed: our session is invalid
                self._kick.set()
                raise StoreUnavailable(f"consul: session {self._session_id} refused: {what}")
            retry = failed.role in ("counter", "mkparent") or \
                (failed.role == "parent" and makepath)
            if not retry:
                assert failed.owner is not None
                raise TransactionFailed(failed.owner, _cause(failed.role, what))
            if failed.role != "counter":
                mkparents = self._missing_ancestors(ops[0].path)
            attempt += 1
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"consul: {what!r} still contended after {attempt} "
                                       f"attempts")
            # Contention on a counter (every host entering the ready queue at once): back
            # off with full jitter, or the losers collide again in lockstep.
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** attempt)))

    def _missing_ancestors(self, path: str) -> list[str]:
        parts = path.split("/") if path else []
        ancestors = [""] + ["/".join(parts[:i]) for i in range(1, len(parts))]
        missing = []
        for p in ancestors:
            _, entry = self._kv_get(self._key(p))
            if entry is None:
                missing.append(self._key(p))
        return missing

    def _expand(self, ops: Sequence[Op], mkparents: list[str],
                floors: dict[str, int] | None = None) -> _Txn:
        """Translate our ops into Consul txn verbs (one of ours may become several)."""
        tx = _Txn()
        for key in mkparents:
            tx.add(None, "mkparent", "cas", key, Value="", Index=0)
        seq, counters = self._allocate(ops, {} if floors is None else floors)
        parents: set[str] = set(mkparents)  # checked once per transaction (the op cap)
        for i, op in enumerate(ops):
            key = self._key(op.path)
            if isinstance(op, Check):
                if op.version == -1:
                    tx.add(i, "exists", "get", key)
                else:
                    tx.add(i, "version", "check-index", key, Index=op.version)
            elif isinstance(op, Create):
                if op.path:
                    parent = self._key(op.path.rpartition("/")[0])
                    if parent not in parents:
                        parents.add(parent)
                        tx.add(i, "parent", "get", parent)
                if op.sequential:
                    name = seq.pop(0)
                    key = self._key(name)
                tx.names[i] = self._rel(key) if key != self.prefix else ""
                value = _b64(op.data)
                if op.ephemeral:
                    sid = self._session_id
                    if sid is None or self._state is not SessionState.CONNECTED:
                        raise StoreUnavailable(f"consul: no live session for ephemeral {key}")
                    tx.add(i, "absent", "check-not-exists", key)
                    tx.add(i, "lock", "lock", key, Value=value, Session=sid)
                else:
                    tx.add(i, "absent", "cas", key, Value=value, Index=0)
            elif isinstance(op, SetData):
                # Consul skips a write that changes nothing (same value, flags, session), so
                # the ModifyIndex would stay; a ZooKeeper set always makes a new version and
                # the protocol relies on that (the gate commit rewrites the deploy item to
                # invalidate concurrent CAS writers). The transaction's random Flags nonce
                # (tx.add) forces a new index.
                value = _b64(op.data)
                if op.version == -1:  # "set" keeps the key's session: ephemerals stay so
                    tx.add(i, "exists", "get", key)
                    tx.add(i, "write", "set", key, Value=value)
                else:
                    tx.add(i, "version", "check-index", key, Index=op.version)
                    tx.add(i, "write", "cas", key, Value=value, Index=op.version)
            elif isinstance(op, Delete):
                if op.version == -1:
                    tx.add(i, "exists", "get", key)
                    tx.add(i, "write", "delete", key)
                else:
                    tx.add(i, "version", "check-index", key, Index=op.version)
                    tx.add(i, "write", "delete-cas", key, Index=op.version)
            else:
                raise TypeError(f"not a store operation: {op!r}")
        for counter, (cas_index, count) in counters.items():
            tx.add(None, "counter", "cas", counter, Value=_b64(str(count).encode()),
                   Index=cas_index)
        return tx

    def _allocate(self, ops: Sequence[Op], floors: dict[str, int]
                  ) -> tuple[list[str], dict[str, tuple[int, int]]]:
        """Names for the sequential creates in ``ops``, in order, and the counter bumps
        that must commit with them (counter key -> (ModifyIndex to cas against, value)).
        ``floors`` (counter -> 1 + the largest suffix among the parent's children) is
        filled on the first attempt and reused by retries of the same commit: a retry
        after a lost counter race re-reads only the counter (the counter only grows, and
        a key written by hand meanwhile is no more likely than before the first read)."""
        counters: dict[str, tuple[int, int]] = {}
        names: list[str] = []
        nxt: dict[str, int] = {}
        for op in ops:
            if not (isinstance(op, Create) and op.sequential):
                continue
            parent = op.path.rpartition("/")[0]
            counter = "/".join([self.prefix, ".seq"] + ([parent] if parent else []))
            if counter not in nxt:
                _, entry = self._kv_get(counter)
                try:
                    current = int(entry["Value"] or b"0") if entry else 0
                except ValueError:
                    raise StoreError(f"consul: sequence counter {counter} holds "
                                     f"{entry['Value']!r}, not a number (delete it; the "
                                     f"next create rebuilds it from the children)") from None
                if counter not in floors:
                    floors[counter] = max(
                        (int(n[-SEQ_DIGITS:]) + 1 for n in self._list(parent)[1]
                         if n[-SEQ_DIGITS:].isdigit() and len(n) >= SEQ_DIGITS), default=0)
                floor = floors[counter]
                nxt[counter] = max(current, floor)
                counters[counter] = (int(entry["ModifyIndex"]) if entry else 0, 0)
            names.append(f"{op.path}{nxt[counter]:0{SEQ_DIGITS}d}")
            nxt[counter] += 1
            counters[counter] = (counters[counter][0], nxt[counter])
        return names, counters

    def _too_large(self, needed: int, limit: int) -> TransactionTooLarge:
        return TransactionTooLarge(
            f"consul at {self.url}: this change needs {needed} operations in one "
            f"transaction and Consul takes at most {limit} (64 before Consul 1.14, 128 "
            "since); nothing was written. Do it in smaller steps (e.g. abort or deploy "
            "fewer items at a time)", needed, limit)

    def _send_txn(self, tx: _Txn, deadline: float) -> tuple[bool, list[dict], list[dict]]:
        """:meth:`_txn`, made safe when an answer is lost: the outcome is then read back
        (our Flags nonce on a written key, or the deleted keys gone). Applied: success as
        if the answer had come. Not applied: the *same* transaction is sent again (same
        names, same nonce), and if that one conflicts, the read-back decides again (the
        first may have been applied late)."""
        lost = False
        while True:
            try:
                ok, results, errors = self._txn(tx, deadline)
            except _OutcomeUnknown as exc:
                lost = True
                log.warning("consul.txn.answer_lost", error=str(exc))
                try:
                    applied = self._applied(tx, deadline)
                except StoreUnavailable as again:
                    raise StoreUnavailable(f"consul txn at {self.url}: answer lost ({exc}) "
                                           f"and the outcome could not be read back: "
                                           f"{again}") from None
                if applied is not None:
                    return True, applied, []
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"consul txn at {self.url}: answer lost ({exc}) "
                                           "and not applied before the deadline") from None
                continue
            if not ok and lost:
                applied = self._applied(tx, deadline)
                if applied is not None:
                    return True, applied, []
            return ok, results, errors

    def _applied(self, tx: _Txn, deadline: float) -> list[dict] | None:
        """Read back (consistently) whether ``tx`` was applied. Returns the Results it
        would have answered (the written keys with their ModifyIndex), or None."""
        end = max(deadline, time.monotonic() + self.request_timeout)

        def read(key: str, **kw: Any) -> Any:
            return self._call(f"read back {key}", lambda c: c.kv.get(
                key, consistency="consistent", **kw), deadline=end)[1]

        writes = [op.body for op in tx.ops if op.body["Verb"] in WRITE_VERBS]
        if writes:
            marker = read(writes[0]["Key"])
            if marker is None or int(marker.get("Flags") or 0) != tx.nonce:
                return None
            index = int(marker["ModifyIndex"])  # one raft entry: every write's index
            return [{"KV": {"Key": w["Key"], "ModifyIndex": index}} for w in writes]
        for op in tx.ops:  # deletes only: applied when what they delete is gone
            verb, key = op.body["Verb"], op.body["Key"]
            if verb in ("delete", "delete-cas") and read(key) is not None:
                return None
            if verb == "delete-tree" and read(key, keys=True):
                return None
        return []

    def _txn(self, tx: _Txn, deadline: float) -> tuple[bool, list[dict], list[dict]]:
        """PUT /v1/txn. Returns (applied, Results, Errors); raises :class:`_OutcomeUnknown`
        when the answer was lost, the :mod:`.base` family for anything else but 200/409.
        "No cluster leader" is retried until ``deadline`` (nothing was applied)."""
        if self.max_txn_ops is not None and len(tx.ops) > self.max_txn_ops:
            raise self._too_large(len(tx.ops), self.max_txn_ops)
        payload = json.dumps([{"KV": op.body} for op in tx.ops])

        def put(client: consul.Consul) -> consul.base.Response:
            response = client.http.put(_Raw(), "/v1/txn", data=payload,
                                       headers=client.prepare_headers())
            if response.code == 500 and NO_LEADER in str(response.body):
                raise ConsulException(f"500 {response.body}")  # retried by _call
            return response

        try:
            response = self._call("txn", put, write=True, deadline=deadline)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, requests.RequestException) and not _never_sent(cause):
                raise _OutcomeUnknown(str(exc)) from exc
            raise
        if response.code == 413:
            match = TOO_MANY_OPS.search(str(response.body))
            if match:
                self.max_txn_ops = int(match.group(2))
                raise self._too_large(len(tx.ops), self.max_txn_ops)
        if response.code in (200, 409):
            try:
                body = json.loads(response.body) or {}
            except ValueError:
                raise StoreError(f"consul txn: unreadable answer {response.body[:200]!r}") \
                    from None
            errors = body.get("Errors") or []
            denied = _acl_denial(errors) if response.code == 409 else None
            if denied is not None:
                # Not a conflict: retrying or reporting TransactionFailed would hide it.
                try:
                    key = tx.ops[int(denied.get("OpIndex", 0))].body.get("Key", "?")
                except (IndexError, ValueError, TypeError):
                    key = "?"
                raise self._unauthorized(f"txn writing {key}", str(denied.get("What", "")))
            return response.code == 200, body.get("Results") or [], errors
        if response.code >= 500:  # not "No cluster leader" (retried above): maybe applied
            self._kick.set()
            raise _OutcomeUnknown(f"consul txn at {self.url}: {response.code} "
                                  f"{response.body[:200]}")
        if response.code in (401, 403):
            raise self._unauthorized("txn", str(response.body))
        raise StoreError(f"consul txn: {response.code} {response.body[:200]}")

    def _results(self, ops: Sequence[Op], tx: _Txn,
                 results: list[dict]) -> list[str | int | None]:
        out: list[str | int | None] = []
        for i, op in enumerate(ops):
            if isinstance(op, Create):
                out.append(tx.names[i])
            elif isinstance(op, SetData):
                # Every write of one txn gets the same raft index: the highest ModifyIndex
                # reported for the key is the one our write gave it.
                key = self._key(op.path)
                indexes = [int(r["KV"]["ModifyIndex"]) for r in results
                           if r.get("KV") and r["KV"].get("Key") == key]
                if not indexes:
                    raise StoreError(f"consul txn: no result for {key} (ACL hides it?)")
                out.append(max(indexes))
            else:
                out.append(None)
        return out
