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
import multiprocessing
import os
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
from ...localstate import read_state
from ...waiting import wait_for  # noqa: F401 (re-exported for the testbed)

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
    """Samples every endpoint at ``rate`` Hz until :meth:`stop`.

    The sampling runs in a separate process (``spawn``; one thread per endpoint, at
    real-time priority, SCHED_FIFO 10, when allowed) so that nothing the harness does in this
    process (forking ``ip``/``iptables``, kazoo callbacks, writing the history, garbage
    collection) can stall it: each sample's time is taken there, on the system-wide
    monotonic clock this process uses too, and a reader thread here writes them into the
    history. :meth:`start` returns once the first sample of every endpoint is in."""

    def __init__(self, writer: HistoryWriter, endpoints: list[Endpoint], rate: float = 25.0,
                 health_every: int = 4, timeout: float = 0.25) -> None:
        if rate < 20.0:
            raise ValueError(f"probe rate {rate} Hz: the testbed needs at least 20 Hz")
        self.writer = writer
        self.endpoints = endpoints
        self.period = 1.0 / rate
        self.health_every = health_every
        self.timeout = timeout
        self.samples = 0
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_probe_process, name="dcdt-prober", daemon=True,
                                 args=([tuple(vars(ep).values()) for ep in endpoints],
                                       self.period, health_every, timeout, self._queue,
                                       self._stop, os.getpid()))
        self._reader = threading.Thread(target=self._read, daemon=True, name="prober-reader")
        self._first: set[tuple[str, str]] = set()
        self._all_in = threading.Event()

    def start(self, timeout: float = 30.0) -> "Prober":
        self._proc.start()
        self._reader.start()
        if not self._all_in.wait(timeout):
            raise TimeoutError(f"prober: no sample from every endpoint within {timeout:g}s")
        return self

    def _read(self) -> None:
        while True:
            try:
                item = self._queue.get()
            except (EOFError, OSError):
                return
            if item is None:
                return
            self._emit(item)

    def _emit(self, item: tuple) -> None:
        """Write one sample (:func:`sample`'s tuple) into the history."""
        t, host, service, ok, version, healthy, dt = item
        self.writer.emit("probe", t=t, host=host, service=service, ok=ok,
                         version=version, healthy=healthy, dt=dt)
        self.samples += 1
        if not self._all_in.is_set():
            self._first.add((host, service))
            if len(self._first) == len(self.endpoints):
                self._all_in.set()

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._queue.put(None)
        self._reader.join(timeout=10)


def realtime() -> None:
    """Real-time priority (SCHED_FIFO 10) for this process where allowed (root), else a
    better nice value. The prober is an instrument: it should be the last thing a loaded
    machine starves; it sleeps between samples, and the kernel's RT throttling bounds it."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        try:
            os.nice(-10)
        except OSError:
            pass


def _probe_process(endpoints: list[tuple[str, str, str, int]], period: float,
                   health_every: int, timeout: float, queue: Any, stop: Any,
                   parent: int | None = None) -> None:
    """The prober process: one thread per endpoint; ``None`` on the queue when done. It
    also ends when ``parent`` is no longer its parent: a harness killed with SIGKILL never
    sets ``stop``, and a real-time process sampling forever is what it would leave."""
    realtime()
    threads = [threading.Thread(target=_probe_loop, daemon=True,
                                args=(Endpoint(*ep), period, health_every, timeout, queue,
                                      stop, parent)) for ep in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put(None)


def sample(ep: Endpoint, health: bool, timeout: float) -> tuple:
    """One sample of ``ep``: ``GET /``, then ``GET /health`` when ``health`` and the first
    answered. Returns ``(t, host, service, ok, version, healthy, dt)``, ``t`` taken right
    before the first request and ``dt`` covering both (the sample covers [t, t + dt])."""
    t = time.monotonic()
    ok, body = probe_once(ep.address, ep.port, "/", timeout)
    healthy = None
    if ok and health:
        healthy, _ = probe_once(ep.address, ep.port, "/health", timeout)
    dt = time.monotonic() - t
    version = body.get("version") if body else None
    return (t, ep.host, ep.service, ok, version, healthy, round(dt, 4))


def _probe_loop(ep: Endpoint, period: float, health_every: int, timeout: float, queue: Any,
                stop: Any, parent: int | None = None) -> None:
    n = 0
    while not stop.is_set() and (parent is None or os.getppid() == parent):
        item = sample(ep, n % health_every == 0, timeout)
        t = item[0]
        queue.put(item)
        n += 1
        # One period after this sample began, or at once when that moment has passed.
        # Never several samples back to back to "catch up": a burst would make the count
        # right and hide the gap, which the checker (P) measures instead.
        stop.wait(max(0.0, t + period - time.monotonic()))


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


