"""ZooKeeper backend on kazoo.

Every call goes through kazoo's ``*_async`` API with a deadline: a plain kazoo call queues
while the connection is suspended and can wait forever, and an agent must never hang on the
store (docs/design.md §4.8). A call that times out may still be applied when the connection comes
back; the protocol is written so that such a late write is safe (a late gate commit only
makes the host count as down).
"""

from __future__ import annotations

import math
import select
import time
from collections import namedtuple
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (AuthFailedError, BadVersionError, ConnectionClosedError,
                              ConnectionLoss, KazooException, NoAuthError, NodeExistsError,
                              NoNodeError, NotEmptyError, RolledBackError, SessionExpiredError)
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.handlers.utils import fileobj_to_fd
from kazoo.protocol.serialization import (EXCEPTIONS, GetData, MultiHeader, Sync, Watch,
                                          ZnodeStat, int_struct, multiheader_struct,
                                          read_buffer, stat_struct, write_string)
from kazoo.retry import KazooRetry

from . import acl as layout
from .base import (BadVersion, Check, Create, Delete, NodeExists, NodeRead, NoNode,
                   NotEmpty, OpCounter, SessionState, SetData, Store, StoreError, StoreUnauthorized,
                   StoreUnavailable, TransactionFailed, Watcher)

if TYPE_CHECKING:
    from . import StoreSecurity

_STATES = {KazooState.CONNECTED: SessionState.CONNECTED,
           KazooState.SUSPENDED: SessionState.SUSPENDED,
           KazooState.LOST: SessionState.LOST}


def _translate(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, NoNodeError):
        return NoNode(str(exc) or "no node")
    if isinstance(exc, NodeExistsError):
        return NodeExists(str(exc) or "node exists")
    if isinstance(exc, BadVersionError):
        return BadVersion(str(exc) or "bad version")
    if isinstance(exc, NotEmptyError):
        return NotEmpty(str(exc) or "not empty")
    if isinstance(exc, (NoAuthError, AuthFailedError)):
        return StoreUnauthorized(f"zookeeper: {type(exc).__name__}: this store identity may "
                                 "not do that here (see docs/security.md)")
    if isinstance(exc, (ConnectionLoss, SessionExpiredError, ConnectionClosedError,
                        KazooTimeoutError)):
        return StoreUnavailable(f"zookeeper: {type(exc).__name__}")
    if isinstance(exc, KazooException):
        return StoreError(f"zookeeper: {type(exc).__name__}: {exc}")
    raise exc


# ZooKeeper 3.6+ ``addWatch`` (opcode 106), which kazoo 2.11 does not offer: one persistent
# recursive watch per subtree delivers every create, delete and data change below it, so a
# mirror learns each change without re-reading (and without re-arming one-shot watches).
_ADD_WATCH = 106
_PERSISTENT_RECURSIVE = 1
_TREE_EVENTS = {1: "created", 2: "deleted", 3: "changed"}
TreeWatcher = Callable[[str, str], None]


class _AddWatch(namedtuple("_AddWatch", "path mode")):
    type = _ADD_WATCH

    def serialize(self) -> bytearray:
        out = bytearray(write_string(self.path))
        out.extend(int_struct.pack(self.mode))
        return out

    @classmethod
    def deserialize(cls, buffer, offset) -> bool:  # the reply is an empty ErrorResponse
        return True


class _MultiRead(namedtuple("_MultiRead", "paths")):
    """ZooKeeper 3.6+ ``multiRead`` (opcode 22), which kazoo 2.11 does not offer: getData
    of many nodes in one request, each answered on its own (data and stat, or its error).
    Not atomic across nodes, which is all a reader of presences needs."""

    type = 22

    def serialize(self) -> bytearray:
        out = bytearray()
        for path in self.paths:
            out.extend(MultiHeader(GetData.type, False, -1).serialize())
            out.extend(GetData(path, None).serialize())
        return out + multiheader_struct.pack(-1, True, -1)

    @classmethod
    def deserialize(cls, buffer, offset) -> list:
        results: list = []
        header, offset = MultiHeader.deserialize(buffer, offset)
        while not header.done:
            if header.type == GetData.type:
                data, offset = read_buffer(buffer, offset)
                stat = ZnodeStat._make(stat_struct.unpack_from(buffer, offset))
                offset += stat_struct.size
                results.append((data, stat))
            else:  # -1: an error for this one path
                err = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[err]())
            header, offset = MultiHeader.deserialize(buffer, offset)
        return results


class _MarkedSync(Sync):
    """A sync whose reply calls ``mark()`` on kazoo's reader thread, in order with the watch
    notifications: everything notified before it has reached the tree watchers."""

    def deserialize(self, buffer, offset):  # type: ignore[override]
        self.mark()
        return Sync.deserialize(buffer, offset)


class _MarkedGetData(GetData):
    def deserialize(self, buffer, offset):  # type: ignore[override]
        self.mark()
        return GetData.deserialize(buffer, offset)


_POLL_READ = select.POLLIN | select.POLLPRI
_POLL_WRITE = select.POLLOUT


class PollingHandler(SequentialThreadingHandler):
    """kazoo's threading handler with a cheaper ``select``. kazoo's own makes a new epoll
    instance on every call (epoll_create, one epoll_ctl per fd, epoll_wait, close), and its
    connection thread calls it before every read from the socket: two or three times for
    each packet received, a watch notification included. With hundreds of sessions in one
    process (bench/scale.py) that was the largest single cost of receiving notifications,
    and each of those system calls hands the GIL over. ``poll(2)`` does the same in one
    call, with no descriptor of its own and no limit on descriptor numbers (the reason
    kazoo moved off ``select(2)``). Same contract as kazoo's ``selector_select``: ready
    readers, then ready writers (a descriptor ready both ways only as a reader), and an
    empty third list; a bad descriptor raises as kazoo's does."""

    def select(self, rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any],
               timeout: float | None = None) -> tuple[list, list, list]:
        if timeout is not None:
            if not isinstance(timeout, (int, float)):
                raise TypeError("timeout must be a number")
            if timeout < 0:
                raise ValueError("timeout must be non-negative")
        # Bytes already read into a _BufferedSocket are ready without asking the kernel
        # (kazoo's loop then reads the next packet from them; its requests to send wait
        # at most until they are used up).
        buffered = [obj for obj in rlist if type(obj) is _BufferedSocket and obj.pending()]
        if buffered:
            return buffered, [], []
        masks: dict[int, int] = {}
        objects: dict[int, tuple[list, list]] = {}
        for mask, objs in ((_POLL_READ, rlist), (_POLL_WRITE, wlist)):
            for obj in objs:
                fd = fileobj_to_fd(obj)
                masks[fd] = masks.get(fd, 0) | mask
                objects.setdefault(fd, ([], []))[mask == _POLL_WRITE].append(obj)
        poller = select.poll()
        for fd, mask in masks.items():
            poller.register(fd, mask)
        # Rounded up: a timeout below a millisecond must wait, not spin.
        ready = poller.poll(None if timeout is None else math.ceil(timeout * 1000))
        readers: list = []
        writers: list = []
        for fd, events in ready:
            readable, writable = objects[fd]
            # As the selectors module reads poll's answer: an error or hang-up wakes
            # readers (their read then reports it).
            if events & ~_POLL_WRITE and (readable or not writable):
                readers.extend(readable)
            elif events & ~_POLL_READ:
                writers.extend(writable)
        return readers, writers, []

    def create_connection(self, *args: Any, **kwargs: Any) -> "_BufferedSocket":
        return _BufferedSocket(super().create_connection(*args, **kwargs))


class _BufferedSocket:
    """The connection's socket, read in large pieces. kazoo reads each packet in two
    ``recv`` calls (its length, then the rest), each after a ``select``: with the loop's
    own select, three polls and two receives per notification, and each system call
    hands the GIL over. Here one ``recv`` takes whatever the kernel holds (up to
    ``CHUNK``), later ``recv`` calls are served from it, and ``pending()`` (which kazoo
    already asks of an SSL socket before it selects) says so: a notification that arrives
    alone costs one poll and one receive, and those that arrive together (the two events
    of one multi) share them. Everything else is the wrapped socket's."""

    CHUNK = 65536

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)  # an SSL socket's decrypted bytes
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def recv(self, size: int, *flags: Any) -> bytes:
        if self._pos < len(self._buf):
            out = self._buf[self._pos:self._pos + size]
            self._pos += len(out)
            return out
        data = self._sock.recv(max(size, self.CHUNK), *flags)
        if len(data) <= size:
            return data
        self._buf, self._pos = data, size
        return data[:size]

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:  # send, close, setblocking, ...
        return getattr(self._sock, name)

    def __enter__(self) -> "_BufferedSocket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sock.close()


class ZooKeeperStore(Store):
    """With an ``identity`` every node is created with the ACL :mod:`.acl` gives its path
    (nothing world-readable or world-writable); without one, as before: ZooKeeper's
    world-open default, for labs and the demo. ``security`` adds TLS (kazoo's ``use_ssl``)."""

    supports_tree_watch = True  # ZooKeeper 3.6+ (addWatch); coord.py follows a mirror
    knows_owners = True  # ephemeralOwner, in one multiRead (get_owned)

    def __init__(self, url: str, servers: list[tuple[str, int]], root: str,
                 session_timeout: float = 10.0, request_timeout: float | None = None, *,
                 identity: layout.Identity | None = None,
                 security: StoreSecurity | None = None) -> None:
        self.url = url
        self.root = root
        self.identity = identity
        self._me = identity.digest_id if identity else None
        self.ops = OpCounter()
        self._wrappers: dict[Watcher, Callable] = {}
        self._tree_watches: dict[str, TreeWatcher] = {}  # absolute path -> callback
        self._hooked = False
        self.request_timeout = request_timeout or max(2.0, session_timeout / 2)
        hosts = ",".join(f"{h}:{p}" for h, p in servers)
        tls = {}
        if security is not None and security.use_tls:
            # Server certificates are checked against the CA and the server's name (the
            # host as written in the URL must be in the certificate).
            tls = dict(use_ssl=True, ca=security.ca, certfile=security.cert,
                       keyfile=security.key, verify_certs=True, check_hostname=True)
        self._client = KazooClient(
            hosts=hosts, timeout=session_timeout, handler=PollingHandler(),
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0,
                                        ignore_expire=False),
            auth_data=[identity.auth_data] if identity else None, **tls,
        )

    # -- session ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        try:
            self._client.start(timeout=timeout)
        except KazooTimeoutError:
            self._client.stop()
            raise StoreUnavailable(
                f"zookeeper at {self.url}: no answer within {timeout:g}s") from None
        if self._me is None:
            self.ensure("")
        # With credentials the root is made by `dcdeploy init`, with its ACL: a host must
        # never create it world-open.

    def stop(self) -> None:
        try:
            self._client.stop()
        finally:
            self._client.close()

    def add_listener(self, listener: Callable[[SessionState], None]) -> None:
        self._client.add_listener(lambda state: listener(_STATES[state]))

    @property
    def connected(self) -> bool:
        return self._client.state == KazooState.CONNECTED

    @property
    def client(self) -> KazooClient:
        """The raw client, for tests that expire sessions; not for product code."""
        return self._client

    # -- helpers ------------------------------------------------------------------------
    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}".rstrip("/") if path else self.root

    def _wait(self, async_result):
        try:
            return async_result.get(timeout=self.request_timeout)
        except BaseException as exc:  # kazoo raises its own family; translate once, here
            raise _translate(exc) from exc

    def _watch(self, watch: Watcher | None):
        # One wrapper per callback, so kazoo's per-path watcher sets de-duplicate a watch
        # re-armed every cycle instead of piling up copies until the node changes.
        if watch is None:
            return None
        wrapper = self._wrappers.get(watch)
        if wrapper is None:
            def wrapper(_event, watch=watch) -> None:
                self.ops.notified()
                self.notified_at = time.monotonic()
                watch()
            self._wrappers[watch] = wrapper
        return wrapper

    # -- reads --------------------------------------------------------------------------
    def get(self, path: str, watch: Watcher | None = None) -> tuple[bytes, int]:
        self.ops.read()
        data, stat = self._wait(self._client.get_async(self._abs(path), self._watch(watch)))
        self.accepted_at = time.monotonic()
        return data, stat.version

    def exists(self, path: str, watch: Watcher | None = None) -> int | None:
        self.ops.read()
        stat = self._wait(self._client.exists_async(self._abs(path), self._watch(watch)))
        return None if stat is None else stat.version

    def children(self, path: str, watch: Watcher | None = None) -> list[str]:
        self.ops.read()
        try:
            names = list(self._wait(self._client.get_children_async(self._abs(path),
                                                                    self._watch(watch))))
            self.accepted_at = time.monotonic()
            return names
        except NoNode:
            if watch:  # watch for the parent to appear instead
                self.exists(path, watch)
            return []

    def watch_tree(self, path: str, watcher: TreeWatcher) -> bool:
        """A persistent recursive watch on ``path`` (ZooKeeper 3.6+ ``addWatch``):
        ``watcher(kind, relpath)`` with kind ``created``, ``deleted`` or ``changed`` for every
        node at or below ``path``, on kazoo's connection thread (must not block). The
        server forgets such watches when the connection drops (kazoo re-sends only
        one-shot watches), so the caller sets them again after every reconnect."""
        self._hook_events()
        full = self._abs(path)
        self._tree_watches[full] = watcher
        self.ops.read()
        client = self._client
        result = client.handler.async_result()
        client._call(_AddWatch(full, _PERSISTENT_RECURSIVE), result)
        self._wait(result)
        return True

    def sync_marked(self, path: str, mark: Callable[[], None]) -> None:
        """``sync(path)``; ``mark()`` runs when its reply arrives, after every notification
        the server sent before it and before any sent after it (the consistent cut a
        mirror needs). For :mod:`..coord`."""
        self.ops.read()
        request = _MarkedSync(self._abs(path))
        request.mark = mark  # type: ignore[attr-defined]
        result = self._client.handler.async_result()
        self._client._call(request, result)
        self._wait(result)

    def get_marked(self, path: str, mark: Callable[[], None]) -> tuple[bytes, int]:
        """``get(path)`` with ``mark()`` at its reply, as :meth:`sync_marked`; NoNode
        leaves ``mark`` uncalled."""
        self.ops.read()
        request = _MarkedGetData(self._abs(path), None)
        request.mark = mark  # type: ignore[attr-defined]
        result = self._client.handler.async_result()
        self._client._call(request, result)
        data, stat = self._wait(result)
        self.accepted_at = time.monotonic()
        return data, stat.version

    @property
    def session_id(self) -> int | None:
        """This session's id (what ZooKeeper puts in ``ephemeralOwner`` of our ephemeral
        nodes), or None before the session is open."""
        client_id = self._client.client_id
        return client_id[0] if client_id and client_id[0] else None

    def get_owned(self, paths: Sequence[str]) -> list[NodeRead | None]:
        """Data, version and ``ephemeralOwner`` (0: persistent) of each path, None for a
        missing one: one ``multiRead`` request whatever the number of paths."""
        if not paths:
            return []
        self.ops.read()
        result = self._client.handler.async_result()
        self._client._call(_MultiRead([self._abs(p) for p in paths]), result)
        out: list[NodeRead | None] = []
        for answer in self._wait(result):
            if isinstance(answer, NoNodeError):
                out.append(None)
            elif isinstance(answer, BaseException):
                raise _translate(answer)
            else:
                data, stat = answer
                out.append(NodeRead(data or b"", stat.version, stat.ephemeralOwner))
                self.accepted_at = time.monotonic()
        return out

    def _hook_events(self) -> None:
        if self._hooked:
            return
        connection = self._client._connection
        original = connection._read_watch_event
        root = len(self.root) + 1

        client = self._client

        def read_watch_event(buffer, offset):
            try:
                event, _ = Watch.deserialize(buffer, offset)
                kind = _TREE_EVENTS.get(event.type)
                if kind is not None:
                    for prefix, watcher in list(self._tree_watches.items()):
                        if event.path == prefix or event.path.startswith(prefix + "/"):
                            self.ops.notified()
                            self.notified_at = time.monotonic()
                            watcher(kind, event.path[root:])
                    # No one-shot watch of kazoo's waits on this path: its own handling
                    # would only decode the event again and build an event nobody gets
                    # (most notifications of a mirror: one per change per host).
                    if event.path not in client._data_watchers and \
                            event.path not in client._child_watchers:
                        return None
            except Exception:  # noqa: BLE001 - never break kazoo's reader thread
                pass
            return original(buffer, offset)

        connection._read_watch_event = read_watch_event
        self._hooked = True

    def sync(self, path: str = "") -> None:
        self.ops.read()
        self._wait(self._client.sync_async(self._abs(path)))

    # -- writes -------------------------------------------------------------------------
    def create(self, path: str, data: bytes = b"", *, ephemeral: bool = False,
               sequential: bool = False) -> str:
        self.ops.write()
        if self._me is None:
            created = self._wait(self._client.create_async(
                self._abs(path), data, ephemeral=ephemeral, sequence=sequential,
                makepath=True))
            self.accepted_at = time.monotonic()
            return created[len(self.root) + 1:]
        policy = self.policy()

        def attempt() -> str:
            return self._wait(self._client.create_async(
                self._abs(path), data, acl=self._acl(path, policy), ephemeral=ephemeral,
                sequence=sequential))
        try:
            created = attempt()
        except NoNode:  # parents first, each with its own ACL (kazoo's makepath would
            self._make_parents(path, policy)  # give them the child's)
            created = attempt()
        self.accepted_at = time.monotonic()
        return created[len(self.root) + 1:]

    def ensure(self, path: str) -> None:
        # Under ACLs, look before creating: creating an existing node is refused for lack
        # of CREATE on its parent before ZooKeeper says it exists.
        if self._me is None or self.exists(path) is None:
            super().ensure(path)

    # -- access control -----------------------------------------------------------------
    def policy(self) -> layout.AclPolicy:
        """Who is operator and who is a host: the root's data, written by ``dcdeploy init``.
        Raises :class:`StoreUnauthorized` when the root is not set up."""
        self.ops.read()
        try:
            raw, _ = self._wait(self._client.get_async(self._abs(layout.POLICY_NODE)))
        except NoNode:
            raw = None
        policy = layout.AclPolicy.from_json(raw)
        if policy is None:
            raise StoreUnauthorized(f"store root {self.root} is not set up for authenticated "
                                "access: run `dcdeploy init` with the operator's credentials")
        return policy

    def _acl(self, path: str, policy: layout.AclPolicy, owner: str | None = None) -> list:
        if layout.kind_of(path) in layout.OWNED:
            owner = owner or self._me
        return layout.acl_for(path, policy, owner)

    def _make_parents(self, path: str, policy: layout.AclPolicy,
                      owners: dict[str, str] | None = None) -> None:
        parts = path.split("/")[:-1]
        for i in range(len(parts) + 1):
            sub = "/".join(parts[:i])
            if self.exists(sub) is not None:
                continue
            owner = (owners or {}).get(layout.owner_of(sub) or "")
            try:
                self.ops.write()
                self._wait(self._client.create_async(
                    self._abs(sub), b"", acl=self._acl(sub, policy, owner),
                    makepath=not sub))  # the root's own parents, e.g. "/" for "/dc"
            except NodeExists:
                pass

    def add_identity(self, identity: layout.Identity) -> None:
        """Also act as ``identity`` for the rest of the session (``init`` rotating the
        operator: the old identity's rights set up the new one's)."""
        try:
            self._client.add_auth(*identity.auth_data)
        except BaseException as exc:
            raise _translate(exc) from exc

    def get_acl(self, path: str) -> list:
        """The node's ACL as kazoo ``ACL`` values (for ``init`` and the tests)."""
        self.ops.read()
        return list(self._wait(self._client.get_acls_async(self._abs(path)))[0])

    def secure(self, hosts: dict[str, str], initial: dict[str, bytes]) -> int:
        """``dcdeploy init``: make this session's identity the operator and ``hosts``
        (name -> digest id) the hosts, create the ``initial`` nodes that are missing, and
        give every node in the tree the ACL its path calls for. Idempotent; run again to
        add or revoke a host (a revoked host's own nodes become the operator's)."""
        if self._me is None:
            raise StoreUnauthorized("init needs the operator's credentials: add "
                                "auth=/path/to/operator.auth to the store URL")
        policy = layout.AclPolicy((self._me,), tuple(sorted(set(hosts.values()))))
        changed = 0
        if self.exists("") is None:
            self._make_parents("x", policy)
            changed += 1
        try:
            if layout.AclPolicy.from_json(self.get(layout.POLICY_NODE)[0]) != policy:
                self.set(layout.POLICY_NODE, policy.to_json())
                changed += 1
        except NoNode:
            initial = {**initial, layout.POLICY_NODE: policy.to_json()}
        for path in sorted(initial, key=lambda p: (p.count("/"), p)):
            if self.exists(path) is not None:
                continue
            self._make_parents(path, policy, hosts)
            try:
                self.ops.write()
                self._wait(self._client.create_async(
                    self._abs(path), initial[path],
                    acl=self._acl(path, policy, hosts.get(layout.owner_of(path) or ""))))
                changed += 1
            except NodeExists:
                pass
        todo = [""]  # breadth first from the root: the root (the policy) first
        while todo:
            path = todo.pop(0)
            want = self._acl(path, policy, hosts.get(layout.owner_of(path) or ""))
            try:
                if not layout.same_acl(self.get_acl(path), want):
                    self.ops.write()
                    self._wait(self._client.set_acls_async(self._abs(path), want))
                    changed += 1
                todo += [f"{path}/{c}" if path else c for c in self.children(path)]
            except NoNode:  # an ephemeral that went away meanwhile
                continue
            except StoreUnauthorized:
                raise StoreUnauthorized(
                    f"init: {self._abs(path)} denies this identity ADMIN; its ACL must be "
                    "fixed by ZooKeeper's super user (or delete the node)") from None
        return changed

    def set(self, path: str, data: bytes, version: int = -1) -> int:
        self.ops.write()
        version = self._wait(self._client.set_async(self._abs(path), data, version)).version
        self.accepted_at = time.monotonic()
        return version

    def delete(self, path: str, version: int = -1, *, recursive: bool = False) -> None:
        self.ops.write()
        if recursive:
            try:
                self._client.delete(self._abs(path), version, recursive=True)
            except BaseException as exc:
                raise _translate(exc) from exc
            return
        self._wait(self._client.delete_async(self._abs(path), version))
        self.accepted_at = time.monotonic()

    def commit(self, ops: Sequence) -> list:
        self.ops.write()
        policy = self.policy() if self._me and any(isinstance(op, Create) for op in ops) \
            else None
        txn = self._client.transaction()
        for op in ops:
            if isinstance(op, Check):
                txn.check(self._abs(op.path), op.version)
            elif isinstance(op, Create):
                txn.create(self._abs(op.path), op.data, ephemeral=op.ephemeral,
                           sequence=op.sequential,
                           acl=self._acl(op.path, policy) if policy else None)
            elif isinstance(op, SetData):
                txn.set_data(self._abs(op.path), op.data, op.version)
            elif isinstance(op, Delete):
                txn.delete(self._abs(op.path), op.version)
            else:
                raise TypeError(f"not a store operation: {op!r}")
        results = self._wait(txn.commit_async())
        out: list = []
        for index, result in enumerate(results):
            if isinstance(result, RolledBackError):
                continue
            if isinstance(result, BaseException):
                raise TransactionFailed(index, _translate(result))
        self.accepted_at = time.monotonic()  # every op passed its ACL check
        for op, result in zip(ops, results):
            if isinstance(op, Create):
                out.append(result[len(self.root) + 1:])
            elif isinstance(op, SetData):
                out.append(result.version)
            else:
                out.append(None)
        return out
