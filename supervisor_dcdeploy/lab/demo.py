"""``dcdeploy demo``: a local data center, end to end, in one command.

A single-node ZooKeeper, N hosts (each its own supervisord + agent + directories), two
services (``api`` depends on ``db``) with quorums that let two hosts switch at once. It
boots version 1.0 everywhere, stages and deploys 2.0 of both, shows live progress, checks
convergence and the quorum on what an independent prober saw, prints the timeline, and
leaves no process behind (also on Ctrl-C)."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .. import ops
from .localdc import Cluster, Prober, wait_for
from ..store import StoreError, layout, open_store
from .zkserver import ZooKeeperNotInstalled, ZooKeeperServer, free_port


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _progress_line(dc: Cluster, services: list[str]) -> str:
    parts = []
    for svc in services:
        counts: dict[str, int] = {}
        for host in dc.hosts:
            version = dc.version(host, svc) or "down"
            counts[version] = counts.get(version, 0) + 1
        parts.append(f"{svc}: " + ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())))
    queue = ops.status(dc.store)["deploy"]
    head = f"{queue[0]['service']} {queue[0]['state']}" if queue else "empty"
    return " | ".join(parts) + f" | queue: {head}"


def timeline(prober: Prober, t0: float) -> list[str]:
    """Every change a host's endpoint showed, in time order."""
    last: dict[tuple[str, str], str | None] = {}
    lines = []
    for sample in prober.samples:
        for key, version in sorted(sample.versions.items()):
            if key in last and last[key] != version:
                host, svc = key
                what = f"serving {version}" if version else "down"
                lines.append(f"  +{sample.t - t0:6.2f}s  {host:<4} {svc:<4} {what}")
            last[key] = version
    return lines


def run_demo(hosts: int = 4, keep: bool = False) -> int:
    if hosts < 3:
        print("dcdeploy demo: --hosts must be at least 3", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-demo-"))
    zk = ZooKeeperServer(workdir / "zk", free_port())
    dc: Cluster | None = None
    prober: Prober | None = None
    store = None
    interrupted: list[int] = []

    def interrupt(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    # An interrupt can land inside a store call, and kazoo may then fail that call with its
    # own error (seen once: ConnectionClosedError) instead of letting KeyboardInterrupt
    # through; the flag says that what failed was an interrupted demo, not the store.
    previous = signal.signal(signal.SIGTERM, interrupt)
    previous_int = signal.signal(signal.SIGINT, interrupt)
    quorum = hosts - 2
    services = {"db": {"quorum": quorum, "max_parallel": 2, "healthy_secs": 1.0},
                "api": {"quorum": quorum, "max_parallel": 2, "healthy_secs": 1.0,
                        "depends_on": ["db"]}}
    try:
        _say(f"work directory {workdir}")
        _say("starting ZooKeeper")
        zk.start()
        zk.wait_serving()
        url = f"zk://127.0.0.1:{zk.client_port}/dc"
        store = open_store(url)
        store.start()
        dc = Cluster(workdir, store, url, hosts, services)
        assert dc.signer is not None
        _say(f"operator key {dc.signer.keyid}: every host pins it; specs, releases and "
             "deploy items are signed with it")
        _say(f"defining db and api (api depends on db), quorum {quorum} of {hosts}, "
             "max_parallel 2; staging 1.0 and starting hosts")
        dc.boot({"db": "1.0", "api": "1.0"})
        _say("every host serves db 1.0 and api 1.0")
        prober = dc.prober(20).start()
        t0 = time.time()
        for svc in ("db", "api"):
            dc.stage(svc, "2.0")
        _say("staged 2.0 of db and api; hosts are downloading and verifying")
        wait_for(lambda: all(len(dc.store.children(layout.staged(s))) == hosts
                             for s in ("db", "api")), 60, "every host ready to roll")
        items = dc.deploy(["api", "db"])
        _say("queued: " + ", ".join(f"{i.node} {i.service} -> {i.version}" for i in items))
        last = ""
        deadline = time.monotonic() + 240
        while True:
            line = _progress_line(dc, ["db", "api"])
            if line != last:
                _say(line)
                last = line
            if dc.queue_empty() and dc.all_on("db", "2.0") and dc.all_on("api", "2.0"):
                break
            if time.monotonic() > deadline:
                _say("the deploy did not converge in 240 s: see dcdeploy status")
                return 1
            time.sleep(0.25)
        prober.stop()
        status = ops.status(store)
        ok = all(status["services"][s]["versions"] == {"2.0": hosts} for s in ("db", "api"))
        worst = {s: min(prober.serving(x, s) for x in prober.samples) for s in ("db", "api")}
        history = {h["service"]: h["state"] for h in ops.history(store)}
        print("\nTimeline (as an independent prober saw it, "
              f"{prober.rate():.0f} samples/s):")
        print("\n".join(timeline(prober, t0)))
        print(f"\nmakespan {prober.samples[-1].t - t0:.1f}s; fewest serving: db {worst['db']}, "
              f"api {worst['api']} (quorum {quorum}); history: {history}")
        if not ok or min(worst.values()) < quorum or \
                set(history.values()) != {"done"}:
            _say("FAILED: did not converge, or went below quorum")
            return 1
        _say(f"converged: all {hosts} hosts on db 2.0 and api 2.0, never below quorum")
        return 0
    except KeyboardInterrupt:
        _say("interrupted: stopping every process")
        return 130
    except StoreError:
        if not interrupted:
            raise
        _say("interrupted: stopping every process")
        return 130
    except ZooKeeperNotInstalled as exc:
        print(f"dcdeploy demo: {exc}", file=sys.stderr)
        return 2
    finally:
        if prober is not None:
            prober.stop()
        if dc is not None:
            dc.stop_all()
        if store is not None:
            try:
                store.stop()
            except Exception:  # noqa: BLE001 - best effort during cleanup
                pass
        zk.kill()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
