"""The coordination store interface, shaped so that ZooKeeper and Consul both fit.

Paths are relative to the store's root (``/dc`` by default): ``"current/api/web-01"``.
Versions are opaque CAS tokens: a ZooKeeper znode version, a Consul ModifyIndex.

Error contract (one family, always raised, never returned): :class:`NoNode`,
:class:`NodeExists`, :class:`BadVersion`, :class:`NotEmpty` for the conditions the protocol
relies on; :class:`StoreUnavailable` when the store cannot be reached or the session is
gone; :class:`StoreUnauthorized` when the store refuses the request for lack of permission
(never reported as a CAS conflict: retrying will not help); :class:`TransactionFailed`
when an atomic multi-op was rolled back (``.index`` is the operation that failed and
``.cause`` its error).
"""

from __future__ import annotations

import abc
import enum
import threading
from dataclasses import dataclass
from typing import Callable, Sequence


class StoreError(Exception):
    """Base of every error raised by a store backend."""


class NoNode(StoreError):
    pass


class NodeExists(StoreError):
    pass


class BadVersion(StoreError):
    pass


class NotEmpty(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The store could not be reached, or the session was lost, during the call."""


class StoreUnauthorized(StoreError):
    """The store refused the request for lack of permission: no credentials, unknown ones,
    or ones that do not allow this read or write (ZooKeeper NoAuth or AuthFailed, a Consul
    ACL denial, also one inside a transaction), or a ZooKeeper root not set up for
    authenticated use by ``dcdeploy init``. Nothing was applied; the message names the path
    and what to grant."""


class TransactionFailed(StoreError):
    def __init__(self, index: int, cause: StoreError) -> None:
        self.index = index
        self.cause = cause
        super().__init__(f"operation {index} failed: {type(cause).__name__}: {cause}")


class SessionState(enum.Enum):
    CONNECTED = "connected"  # session live, ephemerals ours
    SUSPENDED = "suspended"  # connection lost, session may survive: start nothing destructive
    LOST = "lost"  # session expired: every ephemeral of ours is gone


@dataclass(frozen=True)
class Check:
    path: str
    version: int


@dataclass(frozen=True)
class Create:
    path: str
    data: bytes = b""
    ephemeral: bool = False
    sequential: bool = False


@dataclass(frozen=True)
class SetData:
    path: str
    data: bytes
    version: int = -1


@dataclass(frozen=True)
class Delete:
    path: str
    version: int = -1


Op = Check | Create | SetData | Delete


@dataclass(frozen=True)
class NodeRead:
    """A node read with its owner: ``owner`` is the session id of the ZooKeeper session
    that holds the (ephemeral) node, 0 for a persistent one, None where the backend
    cannot tell."""

    data: bytes
    version: int
    owner: int | None
Watcher = Callable[[], None]


class OpCounter:
    """Counts store round trips (for ``bench/rollout.py``: store operations per upgrade) and
    the watch notifications delivered to this client (for ``bench/scale.py``; counted by the
    ZooKeeper backend, where each is one event the server sent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads = 0
        self.writes = 0
        self.notifications = 0

    def read(self, n: int = 1) -> None:
        with self._lock:
            self.reads += n

    def write(self, n: int = 1) -> None:
        with self._lock:
            self.writes += n

    def notified(self) -> None:
        with self._lock:
            self.notifications += 1

    @property
    def total(self) -> int:
        return self.reads + self.writes


class Store(abc.ABC):
    """One client session to the coordination store.

    Methods block for at most the backend's request timeout and raise
    :class:`StoreUnavailable` when it cannot answer. Listener and watch callbacks run on the
    backend's own thread and must not block: set an event and return.
    """

    url: str
    ops: OpCounter

    @abc.abstractmethod
    def start(self, timeout: float = 10.0) -> None:
        """Connect and open a session; raises :class:`StoreUnavailable` after ``timeout``."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Close the session (our ephemerals go at once) and release the client."""

    @abc.abstractmethod
    def add_listener(self, listener: Callable[[SessionState], None]) -> None:
        """Call ``listener`` on every session state change."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the session is live and the connection up."""

    @abc.abstractmethod
    def get(self, path: str, watch: Watcher | None = None) -> tuple[bytes, int]:
        """Return (data, version); raise :class:`NoNode`. ``watch`` fires once on change."""

    @abc.abstractmethod
    def exists(self, path: str, watch: Watcher | None = None) -> int | None:
        """Return the node's version, or None; ``watch`` fires once on create/change/delete."""

    @abc.abstractmethod
    def children(self, path: str, watch: Watcher | None = None) -> list[str]:
        """Names of the direct children; [] when ``path`` does not exist."""

    @abc.abstractmethod
    def create(self, path: str, data: bytes = b"", *, ephemeral: bool = False,
               sequential: bool = False) -> str:
        """Create (parents too, persistent); return the created path, which for a
        sequential node ends in a 10-digit, monotonically increasing sequence number."""

    @abc.abstractmethod
    def set(self, path: str, data: bytes, version: int = -1) -> int:
        """Write data if the version matches (-1: any); return the new version."""

    @abc.abstractmethod
    def delete(self, path: str, version: int = -1, *, recursive: bool = False) -> None:
        """Delete if the version matches; raise :class:`NoNode` when absent."""

    @abc.abstractmethod
    def sync(self, path: str = "") -> None:
        """Make the next read at least as fresh as every write committed before this call."""

    @abc.abstractmethod
    def commit(self, ops: Sequence[Op]) -> list[str | int | None]:
        """Apply every op or none (ZooKeeper ``multi``, Consul ``/v1/txn``).

        Returns one result per op (created path, new version, or None); raises
        :class:`TransactionFailed` naming the op that failed."""

    knows_owners = False  # get_owned() tells who holds an ephemeral node (ZooKeeper)

    # What shows that the store still admits this identity (agent/access.py), as
    # time.monotonic() values, None: never or not told by this backend (then the agent's
    # periodic access check runs on its own clock). ``accepted_at``: the last request the
    # store checked against our rights and accepted; ``notified_at``: the last watch
    # notification received.
    accepted_at: float | None = None
    notified_at: float | None = None

    @property
    def session_id(self) -> int | None:
        """The id this session's ephemeral nodes carry as their owner, or None where the
        backend has none to show (then presences are not checked against it)."""
        return None

    def get_owned(self, paths: Sequence[str]) -> list[NodeRead | None]:
        """Each path read with its owner (None for a missing node). The default reads one
        by one and knows no owner; ZooKeeper answers all in one request."""
        out: list[NodeRead | None] = []
        for path in paths:
            try:
                data, version = self.get(path)
            except NoNode:
                out.append(None)
                continue
            out.append(NodeRead(data, version, None))
        return out

    def watch_tree(self, path: str, watcher: Callable[[str, str], None]) -> bool:
        """Follow every change at or below ``path`` (``watcher(kind, relpath)``, kind one of
        created/deleted/changed) until the connection drops; False when the backend cannot
        (the caller then re-reads instead)."""
        return False

    def secure(self, hosts: dict[str, str], initial: dict[str, bytes]) -> int:
        """Set up access control for the operator (this session's identity) and the given
        hosts (name -> credential id), creating the nodes in ``initial`` (path -> data)
        when missing; idempotent. Returns how many nodes were created or changed."""
        raise StoreError(f"{type(self).__name__}: access control is not managed by dcdeploy "
                         "for this backend")

    def ensure(self, path: str) -> None:
        """Create ``path`` (and parents) as an empty persistent node unless it exists."""
        try:
            self.create(path)
        except NodeExists:
            pass
