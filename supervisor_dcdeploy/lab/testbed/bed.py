"""The namespace testbed: K hosts in network namespaces on one bridge, grouped in racks,
each running supervisord + the agent + a BitTorrent engine (the libtorrent daemon by default,
transmission-daemon with ``BedConfig(swarm_engine="transmission")``; the shipped conf/
drop-in, written by ``provision/host.sh``), and a 3-node ZooKeeper ensemble in its own
namespaces.

Everything carries the prefix ``dcdt`` (namespaces ``dcdt-h1``, bridge ``dcdtbr``, veths
``dcdtvN``) on 10.216.0.0/16, and the testbed's state lives in ``<base>/testbed.json``, so
:func:`teardown` can remove every namespace, interface, process and tmpfs mount also after a
crashed run, from another process (``dcdeploy testbed down``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .. import netns
from ... import ops
from ..hostenv import HostLayout, host_rpc, stop_host, wait_rpc
from ...model import HealthCheck
from ..sample import build_release
from ...store import Store, open_store
from .ensemble import Ensemble
from .provision import SCRIPTS, host_layout, main as provision_main  # noqa: F401

log = structlog.get_logger(__name__)

PREFIX = "dcdt"
SUBNET = "10.216.0.0/16"
DEFAULT_BASE = Path("/tmp/dcdt-testbed")
STATE_FILE = "testbed.json"
NETNS_ETC = Path("/etc/netns")
LOCK_FILE = Path("/run/lock" if Path("/run/lock").is_dir() else "/tmp") / "dcdt-testbed.lock"
AGENT = "dcdeploy-agent"


@dataclass(frozen=True)
class ServiceDef:
    name: str
    port: int
    quorum: int
    depends_on: tuple[str, ...] = ()
    max_parallel: int = 1
    healthy_secs: float = 0.5


DEFAULT_SERVICES = (ServiceDef("a", 8001, 2), ServiceDef("b", 8002, 2, ("a",)))


@dataclass
class BedConfig:
    hosts: int = 4
    racks: int = 2
    services: tuple[ServiceDef, ...] = DEFAULT_SERVICES
    base: Path = DEFAULT_BASE
    session_timeout: float = 4.0
    transmission: bool = True  # run a swarm engine at all (the name is historical)
    # "libtorrent" (the ltdaemon program; docs/distribution.md recommends it) or
    # "transmission" (transmission-daemon, the agent's own default engine)
    swarm_engine: str = "libtorrent"
    disk_host: str | None = "h1"  # this host's root is a small tmpfs (the disk-full fault)
    disk_mb: int = 48
    initial_version: str = "1"
    lock_timeout: float = 1800.0  # wait this long for another testbed on this machine


@dataclass
class Host:
    name: str
    ns: str
    addr: str
    veth: str
    layout: HostLayout
    proc: subprocess.Popen | None = None

    def supervisord_pid(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        try:
            pid = int((self.layout.root / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def agent_pid(self) -> int | None:
        try:
            info: Any = host_rpc(self.layout).supervisor.getProcessInfo(AGENT)
        except Exception:  # noqa: BLE001 - supervisord down or agent unknown: no pid
            return None
        return int(info["pid"]) or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Testbed:
    """Build with :meth:`up`, tear down with :meth:`down` (idempotent; also a context
    manager). Operator actions go through :attr:`store` (a :class:`Store` session from the
    root namespace)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, config: BedConfig | None = None) -> None:
        self.config = config or BedConfig()
        self.base = Path(self.config.base)
        self.net = netns.Network(prefix=PREFIX, subnet=SUBNET)
        self.ensemble = Ensemble(self.net, self.base / "zk")
        self.hosts: dict[str, Host] = {}
        self.store: Store | None = None
        self.mounts: list[Path] = []
        self.artifacts = self.base / "artifacts"
        self.services = {s.name: s for s in self.config.services}
        self._lock_fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def up(self, start_hosts: bool = True, timeout: float = 120.0) -> "Testbed":
        """Create the network, the ensemble and the hosts; define the services, stage the
        initial version and wait until every host serves it. On any failure everything made
        so far is torn down before the error propagates."""
        ok, why = netns.available()
        if not ok:
            raise RuntimeError(f"testbed: {why}")
        self._lock()
        teardown(self.base)
        shutil.rmtree(self.base, ignore_errors=True)  # a testbed starts from nothing
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.net.up()
            self.ensemble.add_hosts()
            self._write_resolver()
            self._write_state()
            for sid, host in self.ensemble.hosts.items():
                subprocess.run(["sh", str(SCRIPTS / "zk.sh"), str(sid), host.addr,
                                str(self.base / "zk" / f"zk{sid}"),
                                *[f"{i}={h.addr}" for i, h in self.ensemble.hosts.items()]],
                               check=True, capture_output=True,
                               env={**os.environ, "DCDT_PYTHON": sys.executable})
            self.ensemble.start(timeout)
            for i in range(1, self.config.hosts + 1):
                self._add_host(f"h{i}", f"r{(i - 1) % self.config.racks + 1}")
            self._write_resolver()
            self._write_state()
            self.store = open_store(self.store_url, session_timeout=10.0)
            self.store.start(timeout=30)
            self.define()
            for svc in self.services:
                self.stage(svc, self.config.initial_version)
            if start_hosts:
                for name in self.hosts:
                    self.start_host(name)
                for name in self.hosts:
                    wait_rpc(self.hosts[name].layout, timeout=30)
                self.wait_versions({s: self.config.initial_version for s in self.services},
                                   timeout)
            self._write_state()
            log.info("testbed.up", hosts=len(self.hosts), store=self.store_url)
            return self
        except BaseException:
            self.down()
            raise

    @property
    def store_url(self) -> str:
        return self.ensemble.store_url("/dc")

    def _add_host(self, name: str, rack: str) -> Host:
        nh = self.net.add_host(name)
        root = self.base / "hosts" / name
        root.mkdir(parents=True, exist_ok=True)
        if name == self.config.disk_host:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.config.disk_mb}m",
                            f"{PREFIX}-{name}", str(root)], check=True, capture_output=True)
            self.mounts.append(root)
        args = [str(SCRIPTS / "host.sh"), name, rack, nh.addr, str(root), self.store_url,
                *[f"{s.name}={s.port}" for s in self.config.services]]
        env = {**os.environ, "DCDT_PYTHON": sys.executable,
               "DCDT_FILE_ROOT": str(self.artifacts),
               "DCDT_TRANSMISSION": "1" if self.config.transmission else "0",
               "DCDT_ENGINE": self.config.swarm_engine}
        subprocess.run(["sh", *args], check=True, capture_output=True, env=env)
        layout = self._layout(name, rack, nh.addr, root)
        host = Host(name, nh.ns, nh.addr, nh.veth, layout)
        self.hosts[name] = host
        return host

    def _layout(self, name: str, rack: str, addr: str, root: Path) -> HostLayout:
        import argparse
        ns = argparse.Namespace(name=name, rack=rack, address=addr, root=str(root),
                                store=self.store_url, python=sys.executable,
                                session_timeout=self.config.session_timeout,
                                start_timeout=15.0, poll_interval=1.0,
                                file_root=str(self.artifacts),
                                service=[f"{s.name}={s.port}" for s in self.config.services],
                                transmission=False)
        return host_layout(ns)

    def _write_resolver(self) -> None:
        """Give every namespace an /etc/hosts naming all testbed addresses and a resolver
        that fails at once (``ip netns exec`` bind-mounts ``/etc/netns/<ns>/*``): without it
        a reverse lookup (http.server's ``getfqdn`` at bind) waits ~10 s for an
        unreachable DNS server."""
        names = [(h.addr, n) for n, h in self.net.hosts.items()]
        text = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in names)
        for nh in self.net.hosts.values():
            etc = NETNS_ETC / nh.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(text)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def start_host(self, name: str) -> None:
        host = self.hosts[name]
        from ..hostenv import start_host
        host.proc = start_host(host.layout, netns=host.ns)

    def kill_host(self, name: str) -> None:
        """kill -9 the host's supervisord and everything in its namespace."""
        host = self.hosts[name]
        if host.proc is not None:
            stop_host(host.layout, host.proc, signal.SIGKILL)
        for pid in netns.pids_in(host.ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(netns.pids_in, host.ns)
        host.proc = None

    def down(self) -> None:
        """Stop everything and remove every namespace, link, mount and process."""
        if self.store is not None:
            try:
                self.store.stop()
            except Exception:  # noqa: BLE001 - tearing down: the store may be gone already
                pass
            self.store = None
        for host in self.hosts.values():
            if host.proc is not None and host.proc.poll() is None:
                stop_host(host.layout, host.proc, signal.SIGKILL)
        self.ensemble.stop()
        teardown(self.base)
        self.hosts.clear()
        self._unlock()
        log.info("testbed.down", base=str(self.base))

    def detach(self) -> None:
        """Leave the testbed running for others (``dcdeploy testbed up``): close the store
        session and release the machine's testbed lock."""
        if self.store is not None:
            self.store.stop()
            self.store = None
        self._unlock()

    def _lock(self) -> None:
        """One testbed per machine: every testbed uses the same prefix and subnet, and
        ``up`` clears what a crashed one left. Wait (``lock_timeout``) for a live one held
        by another process (``flock``, released when that process exits)."""
        if self._lock_fd is not None:
            return
        fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.config.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another testbed holds {LOCK_FILE} for more than "
                                       f"{self.config.lock_timeout:g}s") from None
                time.sleep(1.0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def _write_state(self) -> None:
        state = {"prefix": PREFIX, "base": str(self.base), "store": self.store_url
                 if self.ensemble.hosts else None,
                 "mounts": [str(m) for m in self.mounts],
                 "zk": {sid: {"ns": h.ns, "addr": h.addr} for sid, h in
                        self.ensemble.hosts.items()},
                 "hosts": {n: {"ns": h.ns, "addr": h.addr, "rack": h.layout.rack,
                               "root": str(h.layout.root), "services": h.layout.services}
                           for n, h in self.hosts.items()}}
        (self.base / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))

    # -- operator side ------------------------------------------------------------------
    def define(self) -> None:
        assert self.store is not None
        for s in self.config.services:
            ops.service_set(self.store, s.name, program=s.name, quorum=s.quorum,
                            depends_on=list(s.depends_on), max_parallel=s.max_parallel,
                            health=HealthCheck(kind="http", path="/health", port="port",
                                               timeout=1.0),
                            healthy_secs=s.healthy_secs)

    def release(self, svc: str, version: str, broken: bool = False) -> tuple[Path, str]:
        return build_release(self.artifacts, svc, version, broken=broken)

    def stage(self, svc: str, version: str, broken: bool = False,
              sha256: str | None = None) -> tuple[Path, str]:
        """Build and stage a release; return (artifact path, true sha256)."""
        assert self.store is not None
        path, sha = self.release(svc, version, broken)
        ops.stage(self.store, svc, version, sha256=sha256 or sha, urls=[f"file://{path}"],
                  size=path.stat().st_size)
        return path, sha

    def deploy(self, names: list[str]) -> list[Any]:
        assert self.store is not None
        return ops.deploy(self.store, names)

    # -- observation --------------------------------------------------------------------
    def version(self, name: str, svc: str, timeout: float = 0.5) -> str | None:
        from .recorder import probe_once
        ok, body = probe_once(self.hosts[name].addr, self.services[svc].port, "/", timeout)
        return body.get("version") if ok and body else None

    def versions(self) -> dict[str, dict[str, str | None]]:
        return {svc: {h: self.version(h, svc) for h in self.hosts} for svc in self.services}

    def wait_versions(self, want: dict[str, str], timeout: float,
                      hosts: list[str] | None = None) -> None:
        from .recorder import wait_for
        names = hosts or list(self.hosts)
        wait_for(lambda: all(self.version(h, s) == v for s, v in want.items() for h in names),
                 timeout, f"hosts {names} serving {want} (now {self.versions()})", 0.25)

    def queue_empty(self) -> bool:
        assert self.store is not None
        return not self.store.children("deploy")

    def status(self) -> dict[str, Any]:
        return status(self.base)

    def topology(self) -> dict[str, Any]:
        """The history's ``topology`` event fields."""
        return {"hosts": {n: {"rack": h.layout.rack, "address": h.addr,
                              "services": dict(h.layout.services)}
                          for n, h in self.hosts.items()},
                "services": {s.name: {"quorum": s.quorum, "depends_on": list(s.depends_on)}
                             for s in self.config.services},
                "session_timeout": self.config.session_timeout}


def _wait_gone(pids, ns: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pids(ns) and time.monotonic() < deadline:
        time.sleep(0.05)


def _mounts_under(base: Path) -> list[str]:
    out: list[str] = []
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) > 1 and (parts[1].startswith(str(base) + "/") or
                               parts[0].startswith(f"{PREFIX}-")):
            out.append(parts[1])
    return out


def teardown(base: Path = DEFAULT_BASE) -> list[str]:
    """Remove everything a testbed (this process's or a crashed one's) may have left: every
    ``dcdt*`` namespace with its processes, every ``dcdt*`` link, every tmpfs mounted under
    ``base`` or named ``dcdt-*``. Returns what was removed, for the log. Idempotent."""
    removed = [f"netns {ns}" for ns in netns.namespaces() if ns.startswith(PREFIX)]
    netns.cleanup(PREFIX)
    if NETNS_ETC.is_dir():
        for etc in NETNS_ETC.glob(f"{PREFIX}-*"):
            shutil.rmtree(etc, ignore_errors=True)
            removed.append(f"dir {etc}")
    for mount in _mounts_under(Path(base)):
        subprocess.run(["umount", "-l", mount], capture_output=True)
        removed.append(f"mount {mount}")
    return removed


def leftovers(base: Path = DEFAULT_BASE) -> dict[str, list[str]]:
    """What a torn-down testbed must not leave: namespaces, links, mounts, processes whose
    command line names ``base``."""
    links = netns.ip("-o", "link", "show", check=False).stdout
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(base) + "/" in cmd and "pytest" not in cmd:
                procs.append(f"{entry}: {cmd[:120]}")
    return {"namespaces": [n for n in netns.namespaces() if n.startswith(PREFIX)],
            "netns_etc": [str(p) for p in NETNS_ETC.glob(f"{PREFIX}-*")]
            if NETNS_ETC.is_dir() else [],
            "links": [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
                      if line.split(":")[1].strip().startswith(PREFIX)],
            "mounts": _mounts_under(Path(base)),
            "processes": procs}


def status(base: Path = DEFAULT_BASE) -> dict[str, Any]:
    """The testbed's state from ``<base>/testbed.json`` plus live checks (processes, ZooKeeper
    modes, service versions); {"up": False} when there is none."""
    from .. import zkserver
    from .recorder import probe_once
    try:
        state = json.loads((Path(base) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {"up": False, "namespaces": [n for n in netns.namespaces()
                                            if n.startswith(PREFIX)]}
    out: dict[str, Any] = {"up": True, "store": state.get("store"), "zk": {}, "hosts": {}}
    for sid, zk in state.get("zk", {}).items():
        out["zk"][sid] = {"addr": zk["addr"], "mode": zkserver.server_mode(zk["addr"], 2181)}
    for name, h in state.get("hosts", {}).items():
        svcs = {}
        for svc, port in h["services"].items():
            ok, body = probe_once(h["addr"], int(port), "/", 0.5)
            svcs[svc] = body.get("version") if ok and body else None
        out["hosts"][name] = {"addr": h["addr"], "rack": h["rack"], "services": svcs,
                              "processes": len(netns.pids_in(h["ns"]))}
    return out
