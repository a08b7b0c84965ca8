"""Record what happens during a testbed run: a prober of every service endpoint and a
watcher of the store, both writing :mod:`.history` events.

The prober runs in the root network namespace and reaches the hosts' namespace addresses
over the bridge. Each endpoint has its own thread sampling ``GET /`` on a fixed schedule
(default 25 Hz) and ``GET /health`` every ``health_every`` samples, each recorded with how
long it took (``dt``). A refused connection or a non-200 answer is "not serving" (``ok``
False); a timeout or an unreachable address is ``ok`` None, which the checker also counts
as not serving (a client that gets no answer is not served).

The store watcher uses kazoo's re-arming data and children watches on ``services``,
``staging``, ``gate``, ``deploy``, ``history`` and ``current/<svc>/<host>``. One-shot watches
can coalesce changes that follow each other closely; gate node versions make such gaps
visible to the checker.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from kazoo.client import KazooClient, KazooState
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from .history import HistoryWriter
from ..localstate import read_state
from ..waiting import wait_for  # noqa: F401 (re-exported for the testbed)

log = structlog.get_logger(__name__)

WATCHED = ("services", "staging", "gate", "deploy", "history")


@dataclass(frozen=True)
class Endpoint:
    host: str
    service: str
    address: str
    port: int


def probe_once(address: str, port: int, path: str = "/",
               timeout: float = 0.25) -> tuple[bool | None, dict[str, Any] | None]:
    """One GET. Returns (True, body) on 200 with a JSON object, (False, None) on refusal,
    reset or another status, (None, None) on a timeout (indeterminate)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return False, None
        try:
            data = json.loads(body)
        except ValueError:
            return False, None
        return True, data if isinstance(data, dict) else {}
    except (socket.timeout, TimeoutError):
        return None, None
    except (ConnectionError, http.client.HTTPException):
        return False, None
    except OSError:  # no route / host unreachable (link down): indeterminate
        return None, None
    finally:
        conn.close()


class Prober:
    """Samples every endpoint at ``rate`` Hz until :meth:`stop`. Threads are daemons and
    never raise; :meth:`stop` joins them."""

    def __init__(self, writer: HistoryWriter, endpoints: list[Endpoint], rate: float = 25.0,
                 health_every: int = 4, timeout: float = 0.25) -> None:
        if rate < 20.0:
            raise ValueError(f"probe rate {rate} Hz: the testbed needs at least 20 Hz")
        self.writer = writer
        self.endpoints = endpoints
        self.period = 1.0 / rate
        self.health_every = health_every
        self.timeout = timeout
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.samples = 0

    def start(self) -> "Prober":
        for ep in self.endpoints:
            thread = threading.Thread(target=self._run, args=(ep,), daemon=True,
                                      name=f"probe-{ep.host}-{ep.service}")
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, ep: Endpoint) -> None:
        n = 0
        while not self._stop.is_set():
            t = time.monotonic()
            ok, body = probe_once(ep.address, ep.port, "/", self.timeout)
            dt = time.monotonic() - t
            healthy = None
            if ok and n % self.health_every == 0:
                hok, _ = probe_once(ep.address, ep.port, "/health", self.timeout)
                healthy = hok
            version = body.get("version") if body else None
            self.writer.emit("probe", t=t, host=ep.host, service=ep.service, ok=ok,
                             version=version, healthy=healthy, dt=round(dt, 4))
            self.samples += 1
            n += 1
            # One period after this sample began, or at once when that moment has passed.
            # Never several samples back to back to "catch up": a burst would make the
            # count right and hide the gap, which the checker (P) measures instead.
            self._stop.wait(max(0.0, t + self.period - time.monotonic()))
    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


class StoreRecorder:
    """Watches the store under ``root`` and writes ``store`` events (paths relative to the
    root). :meth:`start` blocks until connected (raises after ``timeout``)."""

    def __init__(self, writer: HistoryWriter, hosts: str, root: str = "/dc") -> None:
        self.writer = writer
        self.root = root.rstrip("/")
        self.client = KazooClient(hosts=hosts, timeout=10.0,
                                  connection_retry={"max_tries": -1, "delay": 0.1,
                                                    "max_delay": 1.0})
        self._watched_data: set[str] = set()
        self._watched_children: set[str] = set()
        self._lock = threading.Lock()
        self.events = 0

    def start(self, timeout: float = 30.0) -> "StoreRecorder":
        self.client.add_listener(self._on_state)
        self.client.start(timeout=timeout)
        self.client.ensure_path(self.root)
        self.writer.emit("recorder", status="connected")
        for name in WATCHED:
            self._children(name, data=True)
        self._children("current", data=False, nested=True)
        return self

    def _on_state(self, state: str) -> None:
        if state != KazooState.CONNECTED:
            self.writer.emit("recorder", status="disconnected", state=str(state))
        else:
            self.writer.emit("recorder", status="connected")

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _children(self, rel: str, *, data: bool, nested: bool = False) -> None:
        with self._lock:
            if rel in self._watched_children:
                return
            self._watched_children.add(rel)
        self.client.ensure_path(self._abs(rel))

        def on_children(children: list[str]) -> None:
            for child in children:
                path = f"{rel}/{child}"
                if nested:
                    self._children(path, data=True)
                elif data:
                    self._data(path)
        ChildrenWatch(self.client, self._abs(rel), on_children)

    def _data(self, rel: str) -> None:
        with self._lock:
            if rel in self._watched_data:
                return
            self._watched_data.add(rel)

        def on_data(data: bytes | None, stat: Any) -> None:
            text = None if stat is None else (data or b"").decode("utf-8", errors="replace")
            self.writer.emit("store", path=rel, data=text,
                             zversion=None if stat is None else stat.version,
                             mzxid=None if stat is None else stat.mzxid)
            self.events += 1
        DataWatch(self.client, self._abs(rel), on_data)

    def stop(self) -> None:
        try:
            self.client.stop()
        finally:
            self.client.close()


def snapshot_state(writer: HistoryWriter, host: str, root: Path, fault: str | None = None
                   ) -> dict[str, Any]:
    """Record the host's local state (``state.slots``, the newest valid slot) as a
    ``state`` event (``ok`` False when no copy is readable, which S5 reports)."""
    try:
        data = read_state(Path(root))
        if not data:
            return writer.emit("state", host=host, ok=True, data={"services": {}},
                               fault=fault, note="no local state yet")
        return writer.emit("state", host=host, ok=True, data=data, fault=fault)
    except (OSError, ValueError) as exc:
        return writer.emit("state", host=host, ok=False, error=f"{root}: {exc}", fault=fault)


