"""Hosts with their own addresses on one machine: network namespaces on a bridge.

Transmission refuses peers on 127.0.0.0/8, and a partition needs a link to cut, so swarm
tests, the testbed and the distribution benchmark put each host in a namespace with a veth
into a shared bridge. Needs root and iproute2. Every name carries ``prefix`` so a crashed run
can be cleaned up by :func:`cleanup` (no namespace, interface or process left behind).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def run_in(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"[{ns}] {' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def available() -> tuple[bool, str]:
    """(True, '') when namespaces can be made here, else (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False, "iproute2 ('ip') is not installed"
    return True, ""


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def cleanup(prefix: str) -> None:
    """Kill every process in, and delete, the namespaces and links made by a
    :class:`Network` with this exact ``prefix`` (``<prefix>-*``, ``<prefix>br``,
    ``<prefix>v<N>``): another prefix that merely starts the same is left alone."""
    for ns in namespaces():
        if ns.startswith(f"{prefix}-"):
            for pid in pids_in(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", ns, check=False)
    ours = re.compile(rf"^{re.escape(prefix)}(br|v\d+)$")
    links = ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if ours.match(name):
            ip("link", "del", name, check=False)


@dataclass
class NsHost:
    name: str
    ns: str
    addr: str
    veth: str  # the bridge-side end, for shaping what the host receives

    def exec_args(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_in(self.ns, *cmd, check=check)


@dataclass
class Network:
    """A bridge ``<prefix>br`` with address ``.1`` of ``subnet``, and hosts added to it."""

    prefix: str = "dcdn"
    subnet: str = "10.213.0.0/16"
    hosts: dict[str, NsHost] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prefix) > 6:
            raise ValueError("prefix must be at most 6 characters (interface names <= 15)")
        self._net = ipaddress.ip_network(self.subnet)
        self._addrs = self._net.hosts()
        self.bridge = f"{self.prefix}br"
        self.gateway = str(next(self._addrs))

    def up(self) -> "Network":
        cleanup(self.prefix)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{self._net.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> NsHost:
        index = len(self.hosts)
        ns = f"{self.prefix}-{name}"
        veth = f"{self.prefix}v{index}"
        addr = str(next(self._addrs))
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        run_in(ns, "ip", "addr", "add", f"{addr}/{self._net.prefixlen}", "dev", "eth0")
        run_in(ns, "ip", "link", "set", "eth0", "up")
        run_in(ns, "ip", "link", "set", "lo", "up")
        run_in(ns, "ip", "route", "add", "default", "via", self.gateway)
        host = NsHost(name, ns, addr, veth)
        self.hosts[name] = host
        return host

    def set_link(self, name: str, up: bool) -> None:
        """Cut (or restore) a host's only link: a partition from everything."""
        ip("link", "set", self.hosts[name].veth, "up" if up else "down")

    def shape(self, name: str, rate_bit: int, netem: str = "") -> None:
        """Cap a host's bandwidth both ways (tbf), optionally with netem delay/loss."""
        host = self.hosts[name]
        burst = max(rate_bit // 8 // 100, 32 * 1024)
        for dev, where in (("eth0", host.ns), (host.veth, None)):
            base = ["tc", "qdisc", "replace", "dev", dev, "root"]
            if netem:
                cmds = [base + ["handle", "1:", "netem", *netem.split()],
                        ["tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:",
                         "tbf", "rate", f"{rate_bit}bit", "burst", str(burst),
                         "latency", "50ms"]] if rate_bit else [base + ["netem", *netem.split()]]
            else:
                cmds = [base + ["tbf", "rate", f"{rate_bit}bit", "burst", str(burst),
                                "latency", "50ms"]]
            for cmd in cmds:
                if where:
                    run_in(where, *cmd)
                else:
                    subprocess.run(cmd, check=True, capture_output=True)

    def unshape(self, name: str) -> None:
        host = self.hosts[name]
        run_in(host.ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        subprocess.run(["tc", "qdisc", "del", "dev", host.veth, "root"], capture_output=True)

    def down(self) -> None:
        cleanup(self.prefix)
        self.hosts.clear()

    def __enter__(self) -> "Network":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
