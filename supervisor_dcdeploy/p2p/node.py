"""One host's swarm runtime in one process: the engine's daemon (child) + tracker (thread).

``--engine transmission`` (default) runs transmission-daemon; ``--engine libtorrent`` runs
``python -m supervisor_dcdeploy.p2p.ltdaemon`` (its state, control socket and the
releases it seeds under ``ltdaemon/`` and ``releases/``).

The agent does not use this (it runs the daemon as a supervisord program and the tracker in
its own process). This is what ``dcdeploy seed start`` runs on the build host, and what the
swarm tests and ``bench/distribute.py`` run inside each network namespace:

    python -m supervisor_dcdeploy.p2p.node --store zk://10.0.0.1:2181/dc --host build \\
        --address 10.0.0.5 --rack build --dir /var/lib/dcdeploy/seed

Layout under ``--dir``: ``transmission/`` (daemon config), ``releases/`` (default download
dir), ``seeds/<infohash>.json`` (torrents to seed from a given path, re-added whenever the
daemon forgets them), ``node.json`` (written once ready: pids, ports, RPC URL),
``node.pid``. The daemon is restarted if it exits (like supervisord would). SIGTERM stops
the daemon and the tracker and removes the peer registrations.

The daemon's RPC listens on loopback only and wants the password in
``transmission/rpc-secret`` (made at first start, 0600); a client on the same host (or in
the same network namespace) reads it from there. The tracker answers announces for the
releases staged in the store and for the torrents recorded under ``seeds/`` (the build host
seeds a release a moment before ``dcdeploy stage`` publishes it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..files import atomic_write
from ..store import StoreError, open_store
from .daemon import DaemonProcess, check_loopback, write_settings
from .engine import ENGINES, Engine
from .errors import FetchError
from .ltengine import LtDaemonProcess, LtEngine
from .swarm import Kicker, SwarmFetcher
from .tracker import Tracker, intro_window

log = structlog.get_logger("dcdeploy.p2p.node")


@dataclass(frozen=True)
class SeedEntry:
    """``seeds/<infohash>.json``: seed ``metainfo`` from ``data_dir/<name>``."""

    infohash: str
    metainfo: bytes
    data_dir: Path

    def to_json(self) -> str:
        return json.dumps({"infohash": self.infohash, "data_dir": str(self.data_dir),
                           "metainfo": base64.b64encode(self.metainfo).decode()})

    @classmethod
    def load(cls, path: Path) -> "SeedEntry":
        data = json.loads(path.read_text())
        return cls(data["infohash"], base64.b64decode(data["metainfo"]), Path(data["data_dir"]))


def seeds_dir(node_dir: Path) -> Path:
    return Path(node_dir) / "seeds"


def record_seed(node_dir: Path, entry: SeedEntry) -> Path:
    """Persist a seed so the node re-adds it after a daemon restart (atomic write)."""
    d = seeds_dir(node_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{entry.infohash}.json"
    atomic_write(path, entry.to_json().encode())
    return path


def forget_seed(node_dir: Path, infohash: str) -> None:
    (seeds_dir(node_dir) / f"{infohash}.json").unlink(missing_ok=True)


def seeded_infohashes(node_dir: Path) -> list[str]:
    """The infohashes recorded under ``seeds/`` (file names only: cheap per announce)."""
    return [p.stem for p in seeds_dir(node_dir).glob("*.json")]


def load_seeds(node_dir: Path) -> list[SeedEntry]:
    out = []
    for p in sorted(seeds_dir(node_dir).glob("*.json")):
        try:
            out.append(SeedEntry.load(p))
        except (ValueError, KeyError, OSError) as exc:
            log.warning("node.bad_seed_file", path=str(p), error=str(exc))
    return out


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(args.dir).resolve()
        self.rpc_address = check_loopback("--rpc-bind", args.rpc_bind)
        self.engine = args.engine
        self.daemon: DaemonProcess | LtDaemonProcess
        if self.engine == "libtorrent":
            tuning = json.loads(args.tuning) if args.tuning else {}
            roots = [self.dir / "releases", *(Path(r) for r in args.data_root)]
            self.daemon = LtDaemonProcess(self.dir / "ltdaemon", roots, args.address,
                                          args.peer_port, tuning)
        else:
            self.daemon = DaemonProcess(self.dir / "transmission", self.rpc_address,
                                        args.rpc_port)
        self.store = open_store(args.store, session_timeout=args.session_timeout)
        self.tracker: Tracker | None = None
        self.stopping = threading.Event()

    def run(self) -> int:
        tuning = json.loads(self.args.tuning) if self.args.tuning else {}
        if isinstance(self.daemon, DaemonProcess):
            write_settings(self.daemon.config_dir, download_dir=self.dir / "releases",
                           rpc_bind=self.rpc_address, rpc_port=self.args.rpc_port,
                           peer_port=self.args.peer_port, bind_address=self.args.address,
                           **tuning)
        (self.dir / "node.pid").write_text(f"{os.getpid()}\n")
        self.store.start(timeout=30)
        self.tracker = Tracker(self.store, self.args.host, self.args.address, self.args.rack,
                               port=self.args.tracker_port, bind=self.args.tracker_bind,
                               active=lambda: self.args.active,
                               interval_active=self.args.interval,
                               local_torrents=lambda: seeded_infohashes(self.dir),
                               intro_window=intro_window(self.engine))
        self.tracker.start()
        self.daemon.start()
        fetcher: Engine
        if isinstance(self.daemon, LtDaemonProcess):
            fetcher = LtEngine(self.daemon.control, self.dir / "releases")
            secret = ""
        else:
            fetcher = SwarmFetcher(self.daemon.url, self.dir / "releases",
                                   secret_file=self.daemon.secret_path)
            secret = str(self.daemon.secret_path)
        self._ensure_seeds(fetcher)
        # Only Transmission waits on a 10 s choke pass (libtorrent's is every 5 s, settable).
        kicker = Kicker(fetcher, self.args.kick) \
            if self.args.kick > 0 and isinstance(fetcher, SwarmFetcher) else None
        if kicker:
            kicker.start()
        info = {"pid": os.getpid(), "daemon_pid": self.daemon.proc.pid if self.daemon.proc
                else None, "engine": self.engine, "rpc_url": self.daemon.url,
                "rpc_secret": secret, "tracker_port": self.tracker.port,
                "address": self.args.address, "host": self.args.host}
        if isinstance(self.daemon, LtDaemonProcess):
            info["control"] = str(self.daemon.control)
        atomic_write(self.dir / "node.json", json.dumps(info).encode())
        log.info("node.ready", **info)
        last_check = time.monotonic()
        while not self.stopping.wait(0.5):
            if not self.daemon.running:
                log.warning("node.daemon_exited", code=self.daemon.proc.returncode
                            if self.daemon.proc else None, action="restart")
                try:
                    self.daemon.start()
                    self._ensure_seeds(fetcher)
                    info["daemon_pid"] = self.daemon.proc.pid if self.daemon.proc else None
                    atomic_write(self.dir / "node.json", json.dumps(info).encode())
                except (RuntimeError, TimeoutError, FetchError) as exc:
                    log.error("node.daemon_restart_failed", error=str(exc))
                    self.stopping.wait(2.0)
            elif self.args.seed_check and time.monotonic() - last_check > 30:
                last_check = time.monotonic()
                self._ensure_seeds(fetcher)
        if kicker:
            kicker.stop()
        return 0

    def _ensure_seeds(self, fetcher: Engine) -> None:
        for entry in load_seeds(self.dir):
            try:
                fetcher.ensure_seeding(entry.metainfo, entry.data_dir, origin=True)
            except FetchError as exc:
                log.error("node.seed_failed", infohash=entry.infohash, error=str(exc))

    def shutdown(self) -> None:
        self.stopping.set()
        if self.tracker is not None:
            self.tracker.stop()
        self.daemon.stop()
        try:
            self.store.stop()
        except StoreError:
            pass
        (self.dir / "node.json").unlink(missing_ok=True)
        (self.dir / "node.pid").unlink(missing_ok=True)
        log.info("node.stopped", host=self.args.host)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m supervisor_dcdeploy.p2p.node",
                                description="BitTorrent daemon + store-backed tracker")
    p.add_argument("--store", required=True, help="zk://HOST:PORT/ROOT")
    p.add_argument("--host", required=True, help="this host's name in the store")
    p.add_argument("--address", required=True, help="address peers dial (data network)")
    p.add_argument("--rack", default="")
    p.add_argument("--engine", choices=ENGINES, default="transmission")
    p.add_argument("--data-root", action="append", default=[],
                   help="libtorrent: another directory releases may be saved in (repeatable; "
                        "<dir>/releases always is)")
    p.add_argument("--dir", required=True, help="state directory")
    p.add_argument("--rpc-bind", default="127.0.0.1",
                   help="RPC bind address: a loopback address (the RPC is never on the network)")
    p.add_argument("--rpc-port", type=int, default=9091)
    p.add_argument("--peer-port", type=int, default=51413)
    p.add_argument("--tracker-bind", default="127.0.0.1")
    p.add_argument("--tracker-port", type=int, default=6969)
    p.add_argument("--interval", type=int, default=5, help="announce interval while active")
    p.add_argument("--active", action="store_true", default=True)
    p.add_argument("--idle", dest="active", action="store_false")
    p.add_argument("--session-timeout", type=float, default=10.0)
    p.add_argument("--seed-check", action="store_true", help="re-check seeds every 30 s")
    p.add_argument("--kick", type=float, default=1.0,
                   help="seconds between rechoke kicks (0: off; see docs/distribution.md)")
    p.add_argument("--tuning", default="",
                   help="JSON object of extra settings (settings.json keys for Transmission, "
                        "settings_pack names for libtorrent)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        node = Node(args)
    except ValueError as exc:
        print(f"dcdeploy seeder: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        node.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return node.run()
    finally:
        node.shutdown()


if __name__ == "__main__":
    sys.exit(main())
