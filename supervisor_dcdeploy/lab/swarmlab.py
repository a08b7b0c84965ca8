"""A swarm on one machine: hosts in network namespaces, a ZooKeeper, one node per host.

Shared by the swarm tests (``tests/test_p2p_swarm.py``) and ``bench/distribute.py``. Needs
root. Every namespace and link carries ``prefix``; :meth:`SwarmLab.down` (also run on
``__exit__``) kills what runs in them and deletes them, after failures too.

Each daemon's RPC listens on its own namespace's loopback (as on a real host, where only the
agent beside it may call it). The test process reaches it through :class:`NetnsRunner`: a
thread that entered the namespace (``setns``) opens the connections, so no RPC ever listens
on an address the other namespaces can reach.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from . import netns
from ..store import NodeExists, Store, layout, open_store
from .zkserver import ZooKeeperServer
from ..p2p.engine import Engine
from ..p2p.ltengine import LtEngine
from ..p2p.seed import SeedConfig, secret_file, start as start_node, status as node_status
from ..p2p.swarm import SwarmFetcher

CLONE_NEWNET = 0x40000000


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only it: namespaces are per thread) into ``ns``."""
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsRunner:
    """``runner(fn)`` runs ``fn()`` on one thread living in network namespace ``ns`` and
    returns its result (raises what it raised). Sockets it opens belong to ``ns``, whichever
    thread uses them later. Calls from several threads are served one at a time."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{ns}",
                                        initializer=_enter_netns, initargs=(ns,))

    def __call__(self, fn: Callable[[], Any]) -> Any:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

log = structlog.get_logger("dcdeploy.p2p.lab")


@dataclass
class LabHost:
    name: str
    rack: str
    ns: netns.NsHost
    dir: Path
    info: dict = field(default_factory=dict)
    _runner: NetnsRunner | None = field(default=None, repr=False)
    _runner_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def address(self) -> str:
        return self.ns.addr

    @property
    def rpc_url(self) -> str:
        return self.info["rpc_url"]

    @property
    def releases(self) -> Path:
        return self.dir / "releases"

    @property
    def runner(self) -> NetnsRunner:
        """Runs RPC exchanges inside this host's namespace (its daemon's loopback)."""
        with self._runner_lock:
            if self._runner is None:
                self._runner = NetnsRunner(self.ns.ns)
            return self._runner

    @property
    def secret_file(self) -> Path:
        return secret_file(self.dir)

    @property
    def engine(self) -> str:
        return self.info.get("engine", "transmission")

    def fetcher(self, download_dir: Path | None = None) -> Engine:
        """This host's engine client (libtorrent: its daemon's unix socket, which a path
        reaches from any namespace; Transmission: the RPC on the namespace's loopback)."""
        if self.engine == "libtorrent":
            return LtEngine(Path(self.info["control"]), download_dir or self.releases,
                            poll=0.25)
        return SwarmFetcher(self.rpc_url, download_dir or self.releases, poll=0.25,
                            secret_file=self.secret_file, runner=self.runner)

    def tracker_status(self) -> dict:
        url = f"http://{self.address}:{self.info['tracker_port']}/status"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def announce(self, query: str) -> bytes:
        """A raw GET /announce on this host's tracker (as its own daemon would)."""
        url = f"http://{self.address}:{self.info['tracker_port']}/announce?{query}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read()


class SwarmLab:
    def __init__(self, workdir: Path, *, prefix: str = "dcdp", subnet: str = "10.214.0.0/16",
                 root: str = "/dcdp", tuning: dict | None = None,
                 host_tuning: dict[str, dict] | None = None,
                 engine: str = "transmission", data_roots: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.net = netns.Network(prefix=prefix, subnet=subnet)
        self.root = root
        self.tuning = tuning
        self.host_tuning = host_tuning or {}
        self.engine = engine
        self.data_roots = data_roots
        self.zk: ZooKeeperServer | None = None
        self.hosts: dict[str, LabHost] = {}
        self.store: Store | None = None

    @property
    def store_url(self) -> str:
        assert self.zk is not None
        return f"zk://{self.net.gateway}:{self.zk.client_port}{self.root}"

    def up(self) -> "SwarmLab":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net.up()
        from .zkserver import free_port
        self.zk = ZooKeeperServer(self.workdir / "zk", free_port(self.net.gateway),
                                  host=self.net.gateway)
        self.zk.start()
        self.zk.wait_serving(60)
        self.store = open_store(self.store_url)
        self.store.start(timeout=30)
        return self

    def add_host(self, name: str, rack: str, *, mbit: int | None = None) -> LabHost:
        ns = self.net.add_host(name)
        if mbit:
            self.net.shape(name, mbit * 1_000_000)
        host = LabHost(name, rack, ns, self.workdir / name)
        self.hosts[name] = host
        return host

    def config(self, host: LabHost) -> SeedConfig:
        return SeedConfig(dir=host.dir, store_url=self.store_url, host=host.name,
                          address=host.address, rack=host.rack, tracker_bind="0.0.0.0",
                          engine=self.engine, data_roots=self.data_roots,
                          tuning={**(self.tuning or {}), **self.host_tuning.get(host.name, {})}
                          or None)

    def start_node(self, name: str) -> LabHost:
        host = self.hosts[name]
        cfg = self.config(host)
        cmd_prefix = ["ip", "netns", "exec", host.ns.ns]
        host.info = start_node(cfg, prefix=cmd_prefix, wait=60)
        return host

    def kill_node(self, name: str) -> None:
        """SIGKILL a host's node and its daemon (a crashed host)."""
        host = self.hosts[name]
        for key in ("daemon_pid", "pid"):
            pid = host.info.get(key)
            if pid:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while node_status(host.dir) and time.monotonic() < deadline:
            time.sleep(0.1)

    def egress_bytes(self, name: str) -> int:
        """Bytes the host has sent so far (its bridge-side veth's receive counter)."""
        veth = self.hosts[name].ns.veth
        return int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())

    def publish(self, staged: Any, service: str | None = None) -> str:
        """Write ``staged`` (a :class:`~.seed.Staged`) as ``staging/<service>`` (default: a
        name made from its infohash), as ``dcdeploy stage`` would: the hosts' trackers
        answer only staged infohashes. Returns the service name."""
        from ..model import StagedRelease
        assert self.store is not None
        service = service or f"t{staged.infohash[:12]}"
        data = StagedRelease(service, "1", staged.sha256, staged.size, (),
                             staged.metainfo_b64).to_json()
        self.store.ensure(layout.STAGING)
        try:
            self.store.create(layout.staged(service), data)
        except NodeExists:
            self.store.set(layout.staged(service), data)
        return service

    def down(self) -> None:
        for host in self.hosts.values():
            if host._runner is not None:
                host._runner.close()
        try:
            if self.store is not None:
                self.store.stop()
        except Exception:  # noqa: BLE001 - teardown must go on
            pass
        self.net.down()  # kills every process in the namespaces
        if self.zk is not None:
            self.zk.kill()

    def __enter__(self) -> "SwarmLab":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()
