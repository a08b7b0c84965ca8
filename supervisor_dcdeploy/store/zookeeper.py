"""ZooKeeper backend on kazoo.

Every call goes through kazoo's ``*_async`` API with a deadline: a plain kazoo call queues
while the connection is suspended and can wait forever, and an agent must never hang on the
store (DESIGN §4.8). A call that times out may still be applied when the connection comes
back; the protocol is written so that such a late write is safe (a late gate commit only
makes the host count as down).
"""

from __future__ import annotations

from typing import Callable, Sequence

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (BadVersionError, ConnectionClosedError, ConnectionLoss,
                              KazooException, NodeExistsError, NoNodeError, NotEmptyError,
                              RolledBackError, SessionExpiredError)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from .base import (BadVersion, Check, Create, Delete, NodeExists, NoNode, NotEmpty, OpCounter,
                   SessionState, SetData, Store, StoreError, StoreUnavailable,
                   TransactionFailed, Watcher)

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
    if isinstance(exc, (ConnectionLoss, SessionExpiredError, ConnectionClosedError,
                        KazooTimeoutError)):
        return StoreUnavailable(f"zookeeper: {type(exc).__name__}")
    if isinstance(exc, KazooException):
        return StoreError(f"zookeeper: {type(exc).__name__}: {exc}")
    raise exc


class ZooKeeperStore(Store):
    def __init__(self, url: str, servers: list[tuple[str, int]], root: str,
                 session_timeout: float = 10.0, request_timeout: float | None = None) -> None:
        self.url = url
        self.root = root
        self.ops = OpCounter()
        self._wrappers: dict[Watcher, Callable] = {}
        self.request_timeout = request_timeout or max(2.0, session_timeout / 2)
        hosts = ",".join(f"{h}:{p}" for h, p in servers)
        self._client = KazooClient(
            hosts=hosts, timeout=session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0,
                                        ignore_expire=False),
        )

    # -- session ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        try:
            self._client.start(timeout=timeout)
        except KazooTimeoutError:
            self._client.stop()
            raise StoreUnavailable(
                f"zookeeper at {self.url}: no answer within {timeout:g}s") from None
        self.ensure("")

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
            wrapper = self._wrappers[watch] = lambda _event: watch()
        return wrapper

    # -- reads --------------------------------------------------------------------------
    def get(self, path: str, watch: Watcher | None = None) -> tuple[bytes, int]:
        self.ops.read()
        data, stat = self._wait(self._client.get_async(self._abs(path), self._watch(watch)))
        return data, stat.version

    def exists(self, path: str, watch: Watcher | None = None) -> int | None:
        self.ops.read()
        stat = self._wait(self._client.exists_async(self._abs(path), self._watch(watch)))
        return None if stat is None else stat.version

    def children(self, path: str, watch: Watcher | None = None) -> list[str]:
        self.ops.read()
        try:
            return list(self._wait(self._client.get_children_async(self._abs(path),
                                                                   self._watch(watch))))
        except NoNode:
            if watch:  # watch for the parent to appear instead
                self.exists(path, watch)
            return []

    def sync(self, path: str = "") -> None:
        self.ops.read()
        self._wait(self._client.sync_async(self._abs(path)))

    # -- writes -------------------------------------------------------------------------
    def create(self, path: str, data: bytes = b"", *, ephemeral: bool = False,
               sequential: bool = False) -> str:
        self.ops.write()
        created = self._wait(self._client.create_async(
            self._abs(path), data, ephemeral=ephemeral, sequence=sequential, makepath=True))
        return created[len(self.root) + 1:]

    def set(self, path: str, data: bytes, version: int = -1) -> int:
        self.ops.write()
        return self._wait(self._client.set_async(self._abs(path), data, version)).version

    def delete(self, path: str, version: int = -1, *, recursive: bool = False) -> None:
        self.ops.write()
        if recursive:
            try:
                self._client.delete(self._abs(path), version, recursive=True)
            except BaseException as exc:
                raise _translate(exc) from exc
            return
        self._wait(self._client.delete_async(self._abs(path), version))

    def commit(self, ops: Sequence) -> list:
        self.ops.write()
        txn = self._client.transaction()
        for op in ops:
            if isinstance(op, Check):
                txn.check(self._abs(op.path), op.version)
            elif isinstance(op, Create):
                txn.create(self._abs(op.path), op.data, ephemeral=op.ephemeral,
                           sequence=op.sequential)
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
        for op, result in zip(ops, results):
            if isinstance(op, Create):
                out.append(result[len(self.root) + 1:])
            elif isinstance(op, SetData):
                out.append(result.version)
            else:
                out.append(None)
        return out
