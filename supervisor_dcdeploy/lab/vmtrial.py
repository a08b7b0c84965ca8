"""Recorded deploy trials with real ``tc netem`` delay and loss on the Vagrant VMs (issue 13).

The namespace testbed's kernel has no ``sch_netem``; the VMs' kernels do. This module runs
the namespace testbed's own trial, :func:`.testbed.trial.run_deploy` (stage a new version,
queue the deploy, inject the schedule, heal, wait for convergence, record the history with
the testbed's prober process and store recorder, check it), against the VMs that
``DCVM_KEEP=1 bash vagrant/run-demo.sh`` left up. What differs is only the glue here:

- :class:`VmBed` has the few attributes and methods ``run_deploy`` uses of a
  :class:`.testbed.bed.Testbed` (the store session, services, hosts with their addresses,
  ``version``, ``stage`` by an HTTP URL served on the host side, ``deploy``, ``topology``);
- :class:`VmNetem` is the ``netem`` fault done inside the VM over ssh:
  ``tc qdisc replace dev <private interface> root netem delay ... loss ...`` (egress of the
  VM's private interface, so every reply and every packet the host sends is delayed: the
  store session, the release download, the prober's answers), with evidence from the
  qdisc's own counters (``tc -s qdisc``: packets sent, dropped) and the TCP connect time to
  the VM's sshd on its private address measured from the host side before and during the
  fault; healed by deleting the qdisc, checked by reading it back;
- each host's local state (``state.slots``) is copied from the VM over ssh when the trial
  reads it (``layout.root``), so the history's ``state`` events are the VMs' own.

Runs where the VMs' private network is reachable (inside the namespace ``dcvm``), as
``vagrant/chaos-netem.sh`` does. Nothing of the runtime differs from the namespace
testbed's.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from .. import ops
from ..store import open_store
from .sample import build_release
from .testbed import checker
from .testbed.bed import ServiceDef
from .testbed.faults import Netem
from .testbed.recorder import probe_once
from .testbed.trial import Planned, run_deploy
from .vmdemo import SERVICES, serve

STATE_ROOT = "/var/lib/dcdeploy"  # the root provision/host.sh gets from vagrant/Vagrantfile
STATE_FILE = "state.slots"


# -- pure ---------------------------------------------------------------------------------
def netem_spec(delay_ms: int, jitter_ms: int, loss_pct: float) -> str:
    """The ``tc netem`` arguments; ValueError for a value tc would refuse or misread."""
    if delay_ms <= 0 or jitter_ms < 0 or jitter_ms > delay_ms:
        raise ValueError(f"netem delay {delay_ms} ms, jitter {jitter_ms} ms: need "
                         "0 < delay and 0 <= jitter <= delay")
    if not 0 <= loss_pct < 100:
        raise ValueError(f"netem loss {loss_pct}%: need 0 <= loss < 100")
    return f"delay {delay_ms}ms {jitter_ms}ms loss {loss_pct:g}%"


def netem_delay_ms(spec: str) -> float:
    """The fixed delay of a netem spec (``delay 200ms 50ms ...`` -> 200.0)."""
    words = spec.split()
    if "delay" not in words or words.index("delay") + 1 >= len(words):
        raise ValueError(f"netem spec {spec!r} has no delay")
    value = words[words.index("delay") + 1]
    if value.endswith("ms"):
        return float(value[:-2])
    if value.endswith("us"):
        return float(value[:-2]) / 1000
    if value.endswith("s"):
        return float(value[:-1]) * 1000
    raise ValueError(f"netem delay {value!r}: no unit (ms, us or s)")


def qdisc_counters(text: str) -> dict[str, Any]:
    """From ``tc -s qdisc show dev X``: whether a netem qdisc is there, and the packets
    sent and dropped summed over the qdiscs listed (``Sent 1234 bytes 17 pkt (dropped 2,``)."""
    words = text.replace(",", " ").replace("(", " ").replace(")", " ").split()
    sent = dropped = 0
    for i, w in enumerate(words):
        if w == "Sent" and i + 4 < len(words) and words[i + 4] == "pkt" \
                and words[i + 3].isdigit():
            sent += int(words[i + 3])
        if w == "dropped" and i + 1 < len(words) and words[i + 1].isdigit():
            dropped += int(words[i + 1])
    netem = any(line.split()[:2] == ["qdisc", "netem"] for line in text.splitlines()
                if line.strip())
    return {"netem": netem, "sent": sent, "dropped": dropped}


def delay_seen(before_ms: float | None, during_ms: float | None, delay_ms: float) -> bool:
    """The host side saw the delay: the median connect time rose by at least half of it."""
    return before_ms is not None and during_ms is not None \
        and during_ms - before_ms >= delay_ms / 2


def conf_value(text: str, key: str) -> str | None:
    """``key = value`` from an ini-style text (the first one), None when absent."""
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return None


def schedule(seed: int, hosts: Sequence[str], delay_ms: tuple[int, int],
             loss_pct: tuple[float, float], duration: tuple[float, float],
             at: tuple[float, float]) -> Planned:
    """One netem fault drawn from ``seed``: host, delay (jitter a quarter of it), loss,
    start (seconds after the deploy is queued) and duration, each uniformly in its range."""
    rng = random.Random(seed)
    delay = rng.randrange(delay_ms[0], delay_ms[1] + 1, 10) if delay_ms[1] > delay_ms[0] \
        else delay_ms[0]
    loss = round(rng.uniform(*loss_pct), 1)
    return Planned(round(rng.uniform(*at), 3), "netem", rng.choice(list(hosts)),
                   round(rng.uniform(*duration), 3),
                   {"netem": netem_spec(delay, delay // 4, loss)})


# -- the VMs over ssh ---------------------------------------------------------------------
@dataclass(frozen=True)
class Ssh:
    """``ssh -F <vagrant ssh-config output> <host> <command>`` (the management network)."""

    config: Path

    def run(self, host: str, command: str, timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ssh", "-F", str(self.config), "-o", "BatchMode=yes",
                               "-o", "ConnectTimeout=60", host, command],
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ssh {host} {command!r}: exit {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()}")
        return proc

    def text(self, host: str, command: str, **kw: Any) -> str:
        return self.run(host, command, **kw).stdout.decode(errors="replace")


def connect_ms(address: str, port: int = 22, n: int = 5, timeout: float = 5.0
               ) -> float | None:
    """Median TCP connect time to ``address:port`` in ms (None when none connected)."""
    times = []
    for _ in range(n):
        t = time.monotonic()
        try:
            with socket.create_connection((address, port), timeout=timeout):
                times.append((time.monotonic() - t) * 1000)
        except OSError:
            pass
    return round(statistics.median(times), 1) if times else None


class VmNet:
    """``shape``/``unshape`` of :class:`.testbed.faults.Netem`, inside the VM over ssh."""

    def __init__(self, ssh: Ssh, devs: dict[str, str]) -> None:
        self.ssh, self.devs = ssh, devs

    def shape(self, name: str, rate_bit: int, netem: str = "") -> None:
        if rate_bit or not netem:
            raise ValueError("on the VMs only netem delay/loss is done, no rate limit")
        self.ssh.run(name, f"sudo tc qdisc replace dev {self.devs[name]} root netem "
                           f"{' '.join(shlex.quote(w) for w in netem.split())}")

    def unshape(self, name: str) -> None:
        self.ssh.run(name, f"sudo tc qdisc del dev {self.devs[name]} root", check=False)

    def qdisc(self, name: str) -> str:
        return self.ssh.text(name, f"sudo tc -s qdisc show dev {self.devs[name]}")


class VmNetem(Netem):
    """The ``netem`` fault on a VM (see the module's doc): same kind, same effects."""

    def inject(self) -> None:
        spec = self.detail.setdefault("netem", "delay 200ms 50ms loss 3%")
        bed: VmBed = self.bed  # type: ignore[assignment]
        net: VmNet = bed.net
        self.detail["connect_ms_before"] = connect_ms(bed.hosts[self.name].addr)
        net.shape(self.name, 0, spec)
        # ssh into a VM under emulation can take seconds (20 s seen): the moments the
        # qdisc was really there, on the history's clock, besides the fault's start and end
        self.detail["applied_at"] = time.monotonic()
        self.detail["mechanism"] = (f"tc netem on {net.devs[self.name]} inside the VM "
                                    "(egress: everything the host sends)")
        self.detail["loss"] = None

    def before_heal(self) -> None:
        bed: VmBed = self.bed  # type: ignore[assignment]
        during = connect_ms(bed.hosts[self.name].addr)
        text = bed.net.qdisc(self.name)
        counters = qdisc_counters(text)
        before = self.detail.get("connect_ms_before")
        delay = netem_delay_ms(self.detail["netem"])
        self._evidence(counters["netem"] and counters["sent"] > 0
                       and delay_seen(before, during, delay),
                       qdisc=text.strip(), qdisc_sent_packets=counters["sent"],
                       qdisc_dropped_packets=counters["dropped"],
                       connect_ms_before=before, connect_ms_during=during)

    def heal(self) -> None:
        bed: VmBed = self.bed  # type: ignore[assignment]
        bed.net.unshape(self.name)
        self.detail["removed_at"] = time.monotonic()
        left = qdisc_counters(bed.net.qdisc(self.name))["netem"]
        self.detail["healed"] = not left
        self.detail["connect_ms_after"] = connect_ms(bed.hosts[self.name].addr)
        if left:
            raise RuntimeError(f"{self.name}: netem still on {bed.net.devs[self.name]}")


class _StateCopy:
    """A host's ``layout``: ``root`` copies the VM's ``state.slots`` over ssh each time it is
    read, so :func:`.testbed.recorder.snapshot_state` reads the VM's state as it is then."""

    def __init__(self, ssh: Ssh, host: str, rack: str, services: dict[str, int],
                 local: Path) -> None:
        self.ssh, self.host, self.rack, self.services = ssh, host, rack, services
        self.local = local
        local.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        target = self.local / STATE_FILE
        proc = self.ssh.run(self.host, f"sudo cat {STATE_ROOT}/{STATE_FILE}", check=False)
        if proc.returncode == 0:
            target.write_bytes(proc.stdout)
        else:
            target.unlink(missing_ok=True)  # none on the VM yet: read_state says so
        return self.local


@dataclass
class VmHost:
    name: str
    addr: str
    layout: _StateCopy
    ns: str = ""  # no namespace of its own: a VM


@dataclass
class VmBed:
    """What :func:`run_deploy` uses of a Testbed, for the Vagrant VMs."""

    store_url: str
    hosts: dict[str, VmHost]
    net: VmNet
    serve_on: str
    port: int
    workdir: Path
    session_timeout: float
    services: dict[str, ServiceDef] = field(default_factory=dict)
    store: Any = None

    def __post_init__(self) -> None:
        quorum = max(1, len(self.hosts) - 1)  # what vmdemo.py defined
        self.services = {s: ServiceDef(s, port, quorum, ("a",) if s == "b" else ())
                         for s, port in SERVICES.items()}
        hosts_part = self.store_url.removeprefix("zk://").split("/", 1)[0]
        self.ensemble = SimpleNamespace(connect_string=hosts_part)
        self.config = SimpleNamespace(disk_host=None, session_timeout=self.session_timeout)

    def release(self, svc: str, version: str, broken: bool = False) -> tuple[Path, str]:
        return build_release(self.workdir, svc, version, broken=broken)

    def stage(self, svc: str, version: str, broken: bool = False,
              sha256: str | None = None) -> tuple[Path, str]:
        path, sha = self.release(svc, version, broken)
        ops.stage(self.store, svc, version, sha256=sha256 or sha, size=path.stat().st_size,
                  urls=[f"http://{self.serve_on}:{self.port}/{path.name}"])
        return path, sha

    def deploy(self, names: list[str]) -> list[Any]:
        return ops.deploy(self.store, names)

    def version(self, name: str, svc: str, timeout: float = 2.0) -> str | None:
        ok, body = probe_once(self.hosts[name].addr, self.services[svc].port, "/", timeout)
        return body.get("version") if ok and body else None

    def topology(self) -> dict[str, Any]:
        return {"hosts": {n: {"rack": h.layout.rack, "address": h.addr,
                              "services": dict(h.layout.services)}
                          for n, h in self.hosts.items()},
                "services": {s.name: {"quorum": s.quorum, "depends_on": list(s.depends_on)}
                             for s in self.services.values()},
                "session_timeout": self.session_timeout}


def private_dev(ssh: Ssh, host: str, addr: str) -> str:
    """The VM's interface holding ``addr`` (the private network)."""
    out = ssh.text(host, f"ip -o addr show to {addr}").split()
    if len(out) < 2:
        raise RuntimeError(f"{host}: no interface with {addr}")
    return out[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmtrial", description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--host", action="append", required=True, help="NAME=ADDRESS")
    parser.add_argument("--rack", action="append", default=[], help="NAME=RACK")
    parser.add_argument("--serve-on", required=True)
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--ssh-config", type=Path, required=True,
                        help="the output of `vagrant ssh-config` for the host VMs")
    parser.add_argument("--out", type=Path, required=True, help="histories go here")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--first-version", type=int, default=3)
    parser.add_argument("--delay-ms", default="100-300")
    parser.add_argument("--loss-pct", default="1-5")
    parser.add_argument("--duration", default="20-40")
    parser.add_argument("--at", default="2-6", help="seconds after the deploy is queued")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to converge after the heal (software emulation)")
    args = parser.parse_args(argv)

    def span(text: str, kind=float) -> tuple[Any, Any]:
        lo, _, hi = text.partition("-")
        return kind(lo), kind(hi or lo)

    hosts = dict(item.partition("=")[::2] for item in args.host)
    racks = dict(item.partition("=")[::2] for item in args.rack)
    ssh = Ssh(args.ssh_config)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-vmtrial-"))
    first = next(iter(hosts))
    conf = ssh.text(first, f"sudo cat {STATE_ROOT}/agent.conf")
    session = float(conf_value(conf, "session_timeout") or "nan")
    if session != session:  # NaN: not in the config
        print(f"vmtrial: no session_timeout in {first}:{STATE_ROOT}/agent.conf",
              file=sys.stderr)
        return 2
    devs = {h: private_dev(ssh, h, addr) for h, addr in hosts.items()}
    bed = VmBed(args.store, {h: VmHost(h, addr, _StateCopy(
                    ssh, h, racks.get(h, f"r{(i % 2) + 1}"), dict(SERVICES),
                    workdir / "state" / h)) for i, (h, addr) in enumerate(hosts.items())},
                VmNet(ssh, devs), args.serve_on, args.port, workdir, session)
    server = serve(workdir, args.serve_on, args.port)
    bed.store = open_store(args.store)
    bed.store.start(timeout=120.0)
    summary = []
    try:
        for i in range(args.trials):
            planned = schedule(args.seed + i, list(hosts), span(args.delay_ms, int),
                               span(args.loss_pct), span(args.duration), span(args.at))
            version = f"{args.first_version + i}.0"
            history = args.out / f"trial{i + 1}-{version}.jsonl"
            history.unlink(missing_ok=True)
            print(f"[{time.strftime('%H:%M:%S')}] trial {i + 1}: deploy {version}, "
                  f"{planned.kind} {planned.detail['netem']} on {planned.host} at "
                  f"+{planned.at}s for {planned.duration}s", flush=True)
            started = time.monotonic()
            result = run_deploy(bed, version, [planned], history, timeout=args.timeout,
                                kinds={"netem": VmNetem})
            took = time.monotonic() - started
            faults = [e for e in result.events if e["kind"] == "fault" and e["phase"] == "end"]
            print(checker.format_table(result.results))
            print(json.dumps({"converged": result.converged, "seconds": round(took, 1),
                              "fault": faults[-1]["detail"] if faults else None},
                             sort_keys=True, default=str), flush=True)
            summary.append({"trial": i + 1, "version": version, "history": str(history),
                            "planned": vars(planned), "converged": result.converged,
                            "seconds": round(took, 1),
                            "results": [r.__dict__ for r in result.results]})
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2,
                                                              default=str))
    finally:
        server.shutdown()
        bed.store.stop()
    return 0 if all(s["converged"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
