"""A 3-node ZooKeeper ensemble, each server in its own network namespace on the testbed
bridge, with leader detection, leader kill/restart and election timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .. import zkserver
from ..netns import Network, NsHost

log = structlog.get_logger(__name__)

CLIENT_PORT = 2181
QUORUM_PORT = 2888
ELECTION_PORT = 3888


@dataclass
class Ensemble:
    """``size`` ZooKeeper servers named ``zk1..zkN`` added to ``net``; data under ``base``."""

    net: Network
    base: Path
    size: int = 3
    tick_ms: int = 200
    servers: dict[int, zkserver.ZooKeeperServer] = field(default_factory=dict)
    hosts: dict[int, NsHost] = field(default_factory=dict)

    def add_hosts(self) -> None:
        """Create the servers' namespaces (before any testbed host, so addresses are stable)."""
        for sid in range(1, self.size + 1):
            self.hosts[sid] = self.net.add_host(f"zk{sid}")

    def start(self, timeout: float = 90.0) -> None:
        """Start every server and block until the ensemble has a leader and every server
        serves; raises TimeoutError (with the servers' logs named) otherwise."""
        if not self.hosts:
            self.add_hosts()
        peers = {sid: (h.addr, QUORUM_PORT, ELECTION_PORT) for sid, h in self.hosts.items()}
        for sid, host in self.hosts.items():
            server = zkserver.ZooKeeperServer(
                data_dir=self.base / f"zk{sid}", client_port=CLIENT_PORT, host=host.addr,
                server_id=sid, peers=peers, tick_ms=self.tick_ms, netns=host.ns)
            server.start()
            self.servers[sid] = server
        for server in self.servers.values():
            server.wait_serving(timeout)
        self.wait_leader(timeout)
        log.info("ensemble.up", leader=self.leader(), servers=self.connect_string)

    @property
    def connect_string(self) -> str:
        return ",".join(f"{h.addr}:{CLIENT_PORT}" for h in self.hosts.values())

    def store_url(self, root: str = "/dc") -> str:
        return f"zk://{self.connect_string}{root}"

    def modes(self) -> dict[int, str | None]:
        return {sid: zkserver.server_mode(h.addr, CLIENT_PORT) for sid, h in self.hosts.items()}

    def leader(self) -> int | None:
        leaders = [sid for sid, mode in self.modes().items() if mode == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def wait_leader(self, timeout: float, exclude: int | None = None,
                    interval: float = 0.02) -> int:
        """Block until exactly one server (other than ``exclude``) is leader and the others
        that run are followers; return its id."""
        deadline = time.monotonic() + timeout
        while True:
            modes = self._live_modes(exclude)
            leaders = [sid for sid, m in modes.items() if m == "leader"]
            if len(leaders) == 1 and all(m in ("leader", "follower") for m in modes.values()):
                return leaders[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ZooKeeper leader after {timeout:g}s: modes {modes}")
            time.sleep(interval)

    def _live_modes(self, exclude: int | None) -> dict[int, str | None]:
        return {sid: zkserver.server_mode(h.addr, CLIENT_PORT)
                for sid, h in self.hosts.items()
                if sid != exclude and sid in self.servers and self.servers[sid].running}

    def kill(self, sid: int) -> None:
        self.servers[sid].kill()
        log.info("ensemble.killed", server=sid)

    def restart(self, sid: int, timeout: float = 90.0) -> None:
        """Start a killed server again and block until it serves (rejoined the quorum)."""
        self.servers[sid].start()
        self.servers[sid].wait_serving(timeout)
        log.info("ensemble.restarted", server=sid, mode=self.modes().get(sid))

    def kill_leader(self, timeout: float = 60.0) -> tuple[int, int, float]:
        """kill -9 the leader; block until the others elect a new one.

        Returns (old leader, new leader, election seconds measured from the kill to the first
        poll that saw a leader and only followers among the survivors)."""
        old = self.leader()
        if old is None:
            old = self.wait_leader(timeout)
        t0 = time.monotonic()
        self.kill(old)
        new = self.wait_leader(timeout, exclude=old)
        elapsed = time.monotonic() - t0
        log.info("ensemble.elected", old=old, new=new, seconds=round(elapsed, 3))
        return old, new, elapsed

    def stop(self) -> None:
        for server in self.servers.values():
            server.kill()
