"""Prober designs compared by ``run.py``. ``current`` is ``testbed.recorder.Prober``; the
others keep its API and semantics (t taken right before the request, a sample covers
[t, t + dt], a timeout covers its wait, no catch-up bursts, SCHED_FIFO 10 where allowed,
samples flow to the parent's history writer) and change only what couples the endpoints:

- ``a_sleep``: the same threads, ``time.sleep`` on the monotonic clock instead of the
  cross-process Event's ``wait(timeout)``; a process-local flag set by the main thread.
- ``b_procs``: one single-threaded process per endpoint, each with its own result pipe (no
  shared queue lock, no feeder thread); stop is the parent closing a pipe.
- ``c_async``: one asyncio loop, non-blocking connects, a minimal HTTP/1.1 reader.

Measured on 3 Dec 2026 (docs/testbed.md, "Prober coverage under machine stalls"): after a
stall every design woke within about 2 ms of the machine's own pinned samplers, none
measurably sooner than ``current``, so the testbed keeps ``current``."""
from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import select
import threading
import time

from supervisor_dcdeploy.lab.testbed.recorder import Endpoint, Prober, sample
from supervisor_dcdeploy.lab.testbed.recorder import realtime as _rt


# ---- (a) threads, time.sleep on the monotonic clock, stop via a local threading.Event
def _proc_a(endpoints, period, health_every, timeout, queue, stop):
    _rt()
    done = threading.Event()
    threads = [threading.Thread(target=_loop_a, daemon=True,
                                args=(Endpoint(*ep), period, health_every, timeout, queue, done))
               for ep in endpoints]
    for th in threads:
        th.start()
    stop.wait()
    done.set()
    for th in threads:
        th.join()
    queue.put(None)


def _loop_a(ep, period, health_every, timeout, queue, done):
    n = 0
    while not done.is_set():
        item = sample(ep, n % health_every == 0, timeout)
        t = item[0]
        queue.put(item)
        n += 1
        delay = t + period - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class ProberA(Prober):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(target=_proc_a, name="dcdt-prober", daemon=True,
                                 args=([tuple(vars(ep).values()) for ep in self.endpoints],
                                       self.period, self.health_every, self.timeout,
                                       self._queue, self._stop))

    def pids(self):
        return [self._proc.pid]


# ---- (b) one single-threaded process per endpoint; own result pipe; stop = a pipe closing
def _proc_b(ep, period, health_every, timeout, out, stop_fd):
    _rt()
    ep = Endpoint(*ep)
    n = 0
    while True:
        item = sample(ep, n % health_every == 0, timeout)
        t = item[0]
        out.send(item)
        n += 1
        delay = max(0.0, t + period - time.monotonic())
        if select.select([stop_fd.fileno()], [], [], delay)[0]:
            break
    out.close()


class ProberB(Prober):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        ctx = multiprocessing.get_context("spawn")
        self._stop_r, self._stop_w = ctx.Pipe(duplex=False)
        self._conns = []
        self._procs = []
        for ep in self.endpoints:
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_proc_b, name=f"dcdt-probe-{ep.host}-{ep.service}",
                            daemon=True,
                            args=(tuple(vars(ep).values()), self.period, self.health_every,
                                  self.timeout, w, self._stop_r))
            p._w = w
            self._conns.append(r)
            self._procs.append(p)
        self._reader = threading.Thread(target=self._read, daemon=True, name="prober-reader")

    def start(self, timeout: float = 30.0):
        for p in self._procs:
            p.start()
            p._w.close()
        self._reader.start()
        if not self._all_in.wait(timeout):
            raise TimeoutError("prober: no first samples")
        return self

    def _read(self):
        conns = list(self._conns)
        while conns:
            for c in multiprocessing.connection.wait(conns):
                try:
                    item = c.recv()
                except (EOFError, OSError):
                    conns.remove(c)
                    continue
                self._emit(item)

    def stop(self):
        self._stop_w.close()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._reader.join(timeout=10)

    def pids(self):
        return [p.pid for p in self._procs]


# ---- (c) one asyncio loop, non-blocking connects, one coroutine per endpoint
async def _aprobe(address, port, path, timeout):
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = await reader.read()
    except TimeoutError:
        return None, None
    except ConnectionError:
        return False, None
    except OSError:
        return None, None
    finally:
        if writer is not None:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return False, None
    if status != 200:
        return False, None
    import json
    try:
        obj = json.loads(body)
    except ValueError:
        return False, None
    return True, obj if isinstance(obj, dict) else {}


async def _aloop(ep, period, health_every, timeout, out, stopping):
    n = 0
    while not stopping.is_set():
        t = time.monotonic()
        ok, body = await _aprobe(ep.address, ep.port, "/", timeout)
        healthy = None
        if ok and n % health_every == 0:
            healthy, _ = await _aprobe(ep.address, ep.port, "/health", timeout)
        dt = time.monotonic() - t
        version = body.get("version") if body else None
        out.send((t, ep.host, ep.service, ok, version, healthy, round(dt, 4)))
        n += 1
        await asyncio.sleep(max(0.0, t + period - time.monotonic()))


async def _amain(endpoints, period, health_every, timeout, out, stop_fd):
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_reader(stop_fd.fileno(), stopping.set)
    await asyncio.gather(*(_aloop(Endpoint(*ep), period, health_every, timeout, out, stopping)
                           for ep in endpoints))


def _proc_c(endpoints, period, health_every, timeout, out, stop_fd):
    _rt()
    asyncio.run(_amain(endpoints, period, health_every, timeout, out, stop_fd))
    out.close()


class ProberC(ProberB):
    def __init__(self, *a, **kw):
        Prober.__init__(self, *a, **kw)
        ctx = multiprocessing.get_context("spawn")
        self._stop_r, self._stop_w = ctx.Pipe(duplex=False)
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_proc_c, name="dcdt-prober", daemon=True,
                        args=([tuple(vars(ep).values()) for ep in self.endpoints], self.period,
                              self.health_every, self.timeout, w, self._stop_r))
        p._w = w
        self._conns = [r]
        self._procs = [p]
        self._reader = threading.Thread(target=self._read, daemon=True, name="prober-reader")


class Prober0(Prober):
    def pids(self):
        return [self._proc.pid]


VARIANTS = {"current": Prober0, "a_sleep": ProberA, "b_procs": ProberB, "c_async": ProberC}
