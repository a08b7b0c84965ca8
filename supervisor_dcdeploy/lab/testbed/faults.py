"""Faults for the testbed (docs/design.md §6), each an object with ``inject()`` and ``heal()``.

:class:`FaultRunner` records a ``fault`` start event just before ``inject`` and an end
event just after ``heal`` returns, with the fault's effects (see :mod:`.history`), so the
checker knows which hosts were disturbed and how. ``heal`` blocks until the fault is really
over (a restarted host's supervisord answers; a restarted ZooKeeper server serves).

Every fault also records evidence that it took effect (``detail["evidence"]`` and
``detail["took_effect"]``): the pid gone, the process in state T, the filter's dropped-packet
counter, the new leader, the disk's free bytes, the garbage read back. A fault that cannot
show its effect (no pid to kill, a filter that dropped nothing) is recorded as not having
taken effect, and the checker (F) fails the trial instead of counting it as a test.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog
from kazoo.client import KazooClient

from .. import netns
from ..hostenv import wait_rpc
from .bed import Testbed
from .ensemble import CLIENT_PORT
from .history import HistoryWriter
from .recorder import snapshot_state, wait_for

log = structlog.get_logger(__name__)


@dataclass
class Fault:
    """Base: ``kind`` names it in histories and reports; ``effects`` tells the checker."""

    bed: Testbed
    host: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    fault_id: str = ""  # set by FaultRunner
    writer: HistoryWriter | None = None  # set by FaultRunner: state snapshots after kills
    kind: ClassVar[str] = "fault"
    effects: ClassVar[tuple[str, ...]] = ()
    needs_host: ClassVar[bool] = True

    @property
    def name(self) -> str:
        """The target host; ValueError for a host fault built without one."""
        if self.host is None:
            raise ValueError(f"fault {self.kind} needs a host")
        return self.host

    def hosts(self) -> list[str]:
        return [self.host] if self.host else []

    def inject(self) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        """Undo the fault; idempotent."""

    def before_heal(self) -> None:
        """Collect evidence that only shows over the fault's duration (counters)."""

    def _evidence(self, ok: bool, **found: Any) -> None:
        """Record what showed the fault's effect; one False makes the fault ineffective."""
        self.detail.setdefault("evidence", {}).update(found)
        self.detail["took_effect"] = bool(self.detail.get("took_effect", True) and ok)

    def _crashed(self) -> None:
        """The host's services were killed now (S1 allows a stale presence from here)."""
        self.detail.setdefault("crashed_at", []).append(time.monotonic())


def proc_state(pid: int | None) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, T, Z...), None when there is none."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def wait_state(pid: int | None, want: set[str | None], timeout: float = 5.0) -> str | None:
    """Poll ``pid``'s state until it is one of ``want`` (None: gone); the last state seen."""
    deadline = time.monotonic() + timeout
    state = proc_state(pid)
    while state not in want and time.monotonic() < deadline:
        time.sleep(0.02)
        state = proc_state(pid)
    return state


def link_up(veth: str) -> bool:
    out = netns.ip("-o", "link", "show", veth, check=False).stdout
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in out else []
    return "UP" in flags


def iptables_packets(ns: str, chain: str, match: list[str]) -> int:
    """Sum of the packet counters of the rules in ``chain`` whose line has every word of
    ``match`` (``iptables -L -v -n -x``)."""
    out = netns.run_in(ns, "iptables", "-L", chain, "-v", "-n", "-x", check=False).stdout
    total = 0
    for line in out.splitlines()[2:]:
        words = line.split()
        if words and words[0].isdigit() and all(m in line for m in match):
            total += int(words[0])
    return total


def qdisc_packets(ns: str | None, dev: str) -> int:
    """Packets sent through the root qdisc of ``dev`` (``tc -s qdisc``)."""
    cmd = ["tc", "-s", "qdisc", "show", "dev", dev]
    if ns:
        out = netns.run_in(ns, *cmd, check=False).stdout
    else:
        import subprocess
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
    words = out.split()
    total = 0
    for i, w in enumerate(words[:-4]):  # "Sent 1234 bytes 17 pkt (dropped 0, ..."
        if w == "Sent" and words[i + 4].startswith("pkt") and words[i + 3].isdigit():
            total += int(words[i + 3])
    return total


def _kill(pid: int | None, sig: int) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class AgentKill(Fault):
    """kill -9 of the agent; supervisord restarts it."""

    kind = "agent_kill"
    effects = ("process",)

    def inject(self) -> None:
        pid = self.bed.hosts[self.name].agent_pid()
        self.detail["pid"] = pid
        sent = _kill(pid, signal.SIGKILL)
        state = wait_state(pid, {None, "Z"}) if sent else "no agent pid"
        self._evidence(sent and state in (None, "Z"), pid=pid, after_kill=state or "gone")

    def heal(self) -> None:
        host = self.bed.hosts[self.name]
        old = self.detail.get("pid")
        wait_for(lambda: (p := host.agent_pid()) and p != old, 30, f"{self.host} agent back")
        self._evidence(True, new_pid=host.agent_pid())


class AgentStop(Fault):
    """SIGSTOP of the agent for longer than the session timeout, then SIGCONT."""

    kind = "agent_stop"
    effects = ("process",)

    def inject(self) -> None:
        pid = self.bed.hosts[self.name].agent_pid()
        self.detail["pid"] = pid
        sent = _kill(pid, signal.SIGSTOP)
        state = wait_state(pid, {"T", None}, 2.0) if sent else None
        self._evidence(state == "T", pid=pid, state_after_stop=state)

    def before_heal(self) -> None:
        state = proc_state(self.detail.get("pid"))
        self._evidence(state == "T", state_before_cont=state)

    def heal(self) -> None:
        _kill(self.detail.get("pid"), signal.SIGCONT)


class SupervisordKill(Fault):
    """kill -9 of supervisord alone. Its children are orphaned; on heal they are killed
    (what systemd's control-group kill does to a crashed unit) and supervisord restarts."""

    kind = "supervisord_kill"
    effects = ("process",)

    def inject(self) -> None:
        host = self.bed.hosts[self.name]
        pid = host.supervisord_pid()
        self.detail["pid"] = pid
        sent = _kill(pid, signal.SIGKILL)
        code = host.proc.wait(timeout=10) if host.proc is not None and sent else None
        state = wait_state(pid, {None, "Z"}) if sent else "no supervisord pid"
        self._evidence(sent and state in (None, "Z"), pid=pid, exit=code,
                       after_kill=state or "gone")

    def heal(self) -> None:
        self._crashed()
        self.bed.kill_host(self.name)
        if self.writer is not None:
            snapshot_state(self.writer, self.name, self.bed.hosts[self.name].layout.root,
                           self.fault_id)
        self.bed.start_host(self.name)
        wait_rpc(self.bed.hosts[self.name].layout, timeout=30)


class HostKill(Fault):
    """A whole host crashes: every process killed at once, its link down while it is off;
    on heal the link comes back and it boots (supervisord, agent, swarm engine)."""

    kind = "host_kill"
    effects = ("process", "unobservable")

    def inject(self) -> None:
        host = self.bed.hosts[self.name]
        before = len(netns.pids_in(host.ns))
        self._crashed()
        self.bed.kill_host(self.name)
        self.bed.net.set_link(self.name, False)
        left = len(netns.pids_in(host.ns))
        up = link_up(host.veth)
        self._evidence(before > 0 and left == 0 and not up, processes_before=before,
                       processes_left=left, link_up=up)

    def heal(self) -> None:
        if self.writer is not None:
            snapshot_state(self.writer, self.name, self.bed.hosts[self.name].layout.root,
                           self.fault_id)
        self.bed.net.set_link(self.name, True)
        if self.bed.hosts[self.name].proc is None:
            self.bed.start_host(self.name)
            wait_rpc(self.bed.hosts[self.name].layout, timeout=30)


class LinkCut(Fault):
    """The host's only link goes down: cut off from the store (and from the prober)."""

    kind = "link_cut"
    effects = ("store_cut", "unobservable")

    def inject(self) -> None:
        self._crashed()  # every client is cut off from it at once
        self.bed.net.set_link(self.name, False)
        up = link_up(self.bed.hosts[self.name].veth)
        self._evidence(not up, link_up=up)

    def heal(self) -> None:
        self.bed.net.set_link(self.name, True)


class StoreFilter(Fault):
    """A packet filter in the host's namespace drops its traffic to the ZooKeeper client
    port: cut off from the store, still reachable by clients (and the prober)."""

    kind = "store_filter"
    effects = ("store_cut",)
    RULE: ClassVar[list[str]] = ["OUTPUT", "-p", "tcp", "--dport", str(CLIENT_PORT), "-j", "DROP"]

    def inject(self) -> None:
        netns.run_in(self.bed.hosts[self.name].ns, "iptables", "-I", *self.RULE)

    def before_heal(self) -> None:
        n = self.dropped()
        self._evidence(n > 0, dropped_packets=n)

    def dropped(self) -> int:
        return iptables_packets(self.bed.hosts[self.name].ns, "OUTPUT",
                                ["DROP", f"dpt:{CLIENT_PORT}"])

    def heal(self) -> None:
        ns = self.bed.hosts[self.name].ns
        while netns.run_in(ns, "iptables", "-D", *self.RULE, check=False).returncode == 0:
            pass


class RebootIsolated(Fault):
    """The host is cut off from the store, then crashes and boots again while still cut
    off: it must start its last known version from local state (L3)."""

    kind = "reboot_isolated"
    effects = ("process", "store_cut", "reboot")

    def inject(self) -> None:
        StoreFilter(self.bed, self.host).inject()
        host = self.bed.hosts[self.name]
        old = host.supervisord_pid()
        self._crashed()
        self.bed.kill_host(self.name)
        self.bed.start_host(self.name)
        self.detail["restarted_at"] = time.monotonic()
        wait_rpc(host.layout, timeout=30)
        new = host.supervisord_pid()
        self._evidence(old is not None and proc_state(old) is None and new not in (None, old),
                       old_supervisord=old, new_supervisord=new)

    def before_heal(self) -> None:
        n = StoreFilter(self.bed, self.host).dropped()
        self._evidence(n > 0, dropped_packets=n)

    def heal(self) -> None:
        """Lift the filter once the host serves again (or after ``boot_max`` seconds: the
        checker then reports that it did not start without the store)."""
        bed, name = self.bed, self.name
        try:
            wait_for(lambda: all(bed.version(name, svc) for svc in bed.services),
                     float(self.detail.get("boot_max", 45.0)), f"{name} serving after reboot")
        except TimeoutError:
            self.detail["served"] = False
        StoreFilter(self.bed, self.host).heal()


class ZkLeaderKill(Fault):
    """kill -9 of the ZooKeeper leader; heal restarts it. Records the election time."""

    kind = "zk_leader_kill"
    effects = ("store",)
    needs_host = False

    def inject(self) -> None:
        old, new, seconds = self.bed.ensemble.kill_leader()
        self.detail.update(old=old, new=new, election_s=round(seconds, 3))
        self._evidence(new is not None and new != old, leader_before=old, leader_after=new)

    def heal(self) -> None:
        sid = self.detail.get("old")
        if sid is not None and not self.bed.ensemble.servers[sid].running:
            self.bed.ensemble.restart(sid)


class Netem(Fault):
    """Delay and loss on the host's link, both ways: ``tc netem`` where the kernel has it.

    Kernels without ``sch_netem`` (this CI's) get an emulation, recorded in the fault's
    detail: random loss with iptables' ``statistic`` match on the host's input and output,
    and a ``tbf`` rate limit whose queue adds delay under load (no fixed delay)."""

    kind = "netem"
    effects = ("network",)

    def inject(self) -> None:
        spec = self.detail.setdefault("netem", "delay 80ms 20ms loss 5%")
        try:
            self.bed.net.shape(self.name, 0, spec)
            self.detail["mechanism"] = "netem"
            self.detail["loss"] = None
            return
        except netns.NetnsError as exc:
            if "unknown" not in str(exc):
                raise
        words = spec.split()
        loss = float(words[words.index("loss") + 1].rstrip("%")) / 100 if "loss" in words \
            else 0.0
        self.detail["mechanism"] = "iptables-statistic+tbf (kernel without sch_netem)"
        self.detail["loss"] = loss
        ns = self.bed.hosts[self.name].ns
        for chain in ("INPUT", "OUTPUT"):
            netns.run_in(ns, "iptables", "-I", chain, *self._rule(loss))
        self.bed.net.shape(self.name, 2_000_000)

    def before_heal(self) -> None:
        """The shaping carried the host's traffic (packets through its qdisc) and, with the
        emulation, how many packets the random drop took."""
        host = self.bed.hosts[self.name]
        sent = qdisc_packets(host.ns, "eth0")
        dropped = sum(iptables_packets(host.ns, chain, ["DROP", "statistic"])
                      for chain in ("INPUT", "OUTPUT")) if self.detail.get("loss") else None
        self._evidence(sent > 0, qdisc_packets=sent, dropped_packets=dropped)

    @staticmethod
    def _rule(loss: float) -> list[str]:
        return ["-m", "statistic", "--mode", "random", "--probability", f"{loss:.4f}",
                "-j", "DROP"]

    def heal(self) -> None:
        self.bed.net.unshape(self.name)
        if self.detail.get("loss"):
            ns = self.bed.hosts[self.name].ns
            for chain in ("INPUT", "OUTPUT"):
                while netns.run_in(ns, "iptables", "-D", chain,
                                   *self._rule(self.detail["loss"]), check=False).returncode == 0:
                    pass


class DiskFull(Fault):
    """The host's disk (a small tmpfs) is filled to the last byte; heal frees it."""

    kind = "disk_full"
    effects = ("disk", "process")  # process: supervisord may die of it (see heal)

    def inject(self) -> None:
        host = self.bed.hosts[self.name]
        if host.layout.root not in self.bed.mounts:
            raise RuntimeError(f"{self.host} has no tmpfs root (BedConfig.disk_host)")
        ballast = host.layout.root / ".ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096, 1):  # big blocks first, then fill the last bytes
                block = b"\0" * size
                while True:
                    try:
                        os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        self.detail["ballast"] = str(ballast)
        st = os.statvfs(host.layout.root)
        self._evidence(st.f_bavail == 0, free_bytes=st.f_bavail * st.f_frsize)

    def heal(self) -> None:
        """Free the space. supervisord writes its logs on the same disk and can die of
        ENOSPC (seen here: an OSError out of its log handler ends its main loop); when it
        did, do what systemd's ``Restart=always`` with ``KillMode=control-group`` does on a
        real host (provision/host.sh installs such a unit): kill the leftovers, restart."""
        host = self.bed.hosts[self.name]
        Path(host.layout.root / ".ballast").unlink(missing_ok=True)
        # A supervisord that hit ENOSPC just before the space came back is still alive for a
        # while (it writes the traceback, to the same full disk, then leaves its loop): a
        # pid check alone missed one on a loaded machine, and the host went on without
        # supervisord or agent. Its main loop answering a call made after the space came
        # back shows it survived: the failing write would have ended the loop first.
        survived = _answers_after(host)
        self.detail["supervisord_after_heal"] = "answered" if survived else "gone"
        if not survived:
            self.detail["supervisord_died"] = True
            self._crashed()
            if self.writer is not None:
                snapshot_state(self.writer, self.name, host.layout.root, self.fault_id)
            self.bed.kill_host(self.name)
            self.bed.start_host(self.name)
            wait_rpc(host.layout, timeout=30)


def _answers_after(host: Any, timeout: float = 20.0) -> bool:
    """True once ``host``'s supervisord answers an XML-RPC call, False when it has no live
    pid (or no answer within ``timeout``: treated as dead, the heal restarts it)."""
    import threading

    from ..hostenv import host_rpc
    answered = threading.Event()

    def call() -> None:
        try:
            host_rpc(host.layout).supervisor.getState()
            answered.set()
        except Exception:  # noqa: BLE001 - refused or reset: it died
            pass

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.supervisord_pid() is None:
            return False
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if answered.is_set():
            return True
        time.sleep(0.1)  # refused: look at the pid again
    return False


class Garbage(Fault):
    """Garbage written into the store by hand (as with ``zkCli.sh set``): a service spec,
    the staged release, and a bogus presence entry. Heal restores what was there."""

    kind = "garbage"
    effects = ("store", "garbage")
    needs_host = False
    TARGETS: ClassVar[tuple[str, ...]] = ("services/{svc}", "staging/{svc}",
                                          "current/{svc}/ghost", "hosts/{host}")

    def inject(self) -> None:
        svc = self.detail.setdefault("service", next(iter(self.bed.services)))
        target = self.detail.setdefault("target", self.TARGETS[0])
        path = target.format(svc=svc, host=next(iter(self.bed.hosts)))
        self.detail["path"] = path
        client = self._client()
        full = f"/dc/{path}"
        try:
            stat = client.exists(full)
            if stat is None:
                self.detail["original"] = None
                client.create(full, b"\xff{garbage", makepath=True)
            else:
                data, _ = client.get(full)
                self.detail["original"] = data.decode("utf-8", errors="replace")
                client.set(full, b"\xff{garbage")
            back, _ = client.get(full)
            self._evidence(back == b"\xff{garbage", read_back=back.decode("latin-1"))
        finally:
            client.stop()
            client.close()

    def heal(self) -> None:
        if "path" not in self.detail:
            return
        client = self._client()
        full = f"/dc/{self.detail['path']}"
        try:
            original = self.detail.get("original")
            if original is None:
                if client.exists(full):
                    client.delete(full)
            else:
                client.set(full, original.encode())
        finally:
            client.stop()
            client.close()

    def _client(self) -> KazooClient:
        client = KazooClient(hosts=self.bed.ensemble.connect_string, timeout=10.0)
        client.start(timeout=20)
        return client


KINDS: dict[str, type[Fault]] = {cls.kind: cls for cls in (
    AgentKill, SupervisordKill, HostKill, AgentStop, LinkCut, StoreFilter, ZkLeaderKill,
    Netem, DiskFull, Garbage, RebootIsolated)}
REQUIRED = ("agent_kill", "supervisord_kill", "host_kill", "agent_stop", "link_cut",
            "store_filter", "zk_leader_kill", "netem", "disk_full", "garbage")


class FaultRunner:
    """Injects faults into a bed and records them in a history."""

    def __init__(self, bed: Testbed, writer: HistoryWriter) -> None:
        self.bed = bed
        self.writer = writer
        self.count = 0
        self.active: list[Fault] = []

    def inject(self, fault: Fault) -> Fault:
        self.count += 1
        fault.fault_id = f"f{self.count}-{fault.kind}"
        fault.writer = self.writer
        self.writer.emit("fault", fault=fault.kind, phase="start", id=fault.fault_id,
                         hosts=fault.hosts(), effects=list(fault.effects),
                         detail=dict(fault.detail))
        log.info("fault.inject", kind=fault.kind, host=fault.host)
        try:
            fault.inject()
        finally:
            self.active.append(fault)
        return fault

    def heal(self, fault: Fault) -> None:
        try:
            try:
                fault.before_heal()
            except Exception as exc:  # noqa: BLE001 - no evidence is itself the finding
                fault._evidence(False, error=f"evidence: {type(exc).__name__}: {exc}")
            fault.heal()
        finally:
            if fault in self.active:
                self.active.remove(fault)
            fault.detail.setdefault("took_effect", False)
            self.writer.emit("fault", fault=fault.kind, phase="end", id=fault.fault_id,
                             hosts=fault.hosts(), detail=json.loads(json.dumps(
                                 fault.detail, default=str)))
            log.info("fault.healed", kind=fault.kind, host=fault.host, **{
                k: v for k, v in fault.detail.items() if k in ("election_s",)})

    def heal_all(self) -> None:
        for fault in list(reversed(self.active)):
            try:
                self.heal(fault)
            except Exception as exc:  # noqa: BLE001 - heal the others anyway, then report
                log.error("fault.heal_failed", kind=fault.kind, error=str(exc))
