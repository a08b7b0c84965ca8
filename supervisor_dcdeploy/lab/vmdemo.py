"""The operator's side of ``vagrant/run-demo.sh``: a deploy on the Vagrant VMs, watched.

Runs where the VMs' private network is reachable (inside the ``dcvm`` namespace here). It
defines services ``a`` and ``b`` (``b`` depends on ``a``), builds releases 1.0 and 2.0 of the
sample app, serves them over HTTP on the host's side of the VMs' network, stages 1.0 by URL
and waits until every host serves it, then starts a prober against the VMs' addresses,
stages 2.0 and deploys both, prints the deploy's progress, and checks convergence and the
quorum on what the prober saw. With ``--swarm VERSION`` it then stages that version (a few
MiB) through the BitTorrent swarm only: a seeder for the build host runs here (at
``--serve-on``), ``dcdeploy stage --path --seed-dir`` stages it with no URL, and after the
deploy each host's status.json (read with ``--status-cmd``) must name the fetch's ``via`` as
"swarm". Every step's wall-clock time is printed at the end.

``python -m supervisor_dcdeploy.lab.vmdemo --store zk://10.216.1.2:2181/dc
--host h1=10.216.1.11 --host h2=10.216.1.12 --host h3=10.216.1.13 --serve-on 10.216.1.1``
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import ops
from ..model import HealthCheck
from ..p2p import seed
from ..p2p.engine import ENGINES
from ..snapshot import read_view
from ..store import layout, open_store
from .demo import timeline
from ..waiting import wait_for
from .localdc import Prober, get_version
from .sample import build_release

SERVICES = {"a": 8001, "b": 8002}  # the ports vagrant/Vagrantfile gives the hosts
# a host's status.json (the agent's root is /var/lib/dcdeploy in vagrant/Vagrantfile)
STATUS_CMD = "vagrant ssh {host} -c 'sudo cat /var/lib/dcdeploy/status.json'"


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Steps:
    """Wall-clock time per named step."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def run(self, name, fn, *args, **kwargs):
        _say(name)
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.times.append((name, time.monotonic() - started))

    def table(self) -> str:
        return "\n".join(f"  {secs:7.1f} s  {name}" for name, secs in self.times)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """No access log: a line per fetch buried the demo's progress (setting log_message on
    the functools.partial did not reach the handler class)."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's signature)
        pass


def serve(directory: Path, address: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve ``directory`` on ``address:port`` in a thread (the release URLs)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer((address, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def all_serve(hosts: dict[str, str], version: str) -> bool:
    return all(get_version(addr, port, timeout=2.0) == version
               for addr in hosts.values() for port in SERVICES.values())


def progress(store, hosts: dict[str, str]) -> str:
    parts = []
    for svc, port in SERVICES.items():
        counts: dict[str, int] = {}
        for addr in hosts.values():
            version = get_version(addr, port, timeout=2.0) or "down"
            counts[version] = counts.get(version, 0) + 1
        parts.append(f"{svc}: " + ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())))
    queue = ops.status(store)["deploy"]
    head = f"{queue[0]['service']} {queue[0]['state']}" if queue else "empty"
    return " | ".join(parts) + f" | queue: {head}"


def ready(store, svc: str, version: str) -> int:
    """How many hosts are in ``svc``'s ready-to-roll queue for ``version`` (entries for the
    version just deployed may linger a cycle)."""
    return sum(e.version == version for e in read_view(store, svc).staging)


def read_statuses(hosts: dict[str, str], status_cmd: str) -> dict[str, dict]:
    """Each host's status.json (``status_cmd`` with ``{host}`` replaced by the host's name
    prints it), parsed; :class:`ops.OpError` naming the host if the command fails or the
    output is not JSON."""
    out: dict[str, dict] = {}
    for host in hosts:
        cmd = [part.replace("{host}", host) for part in shlex.split(status_cmd)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise ops.OpError(f"{host}: {status_cmd!r} exited {done.returncode}: "
                              f"{done.stderr.strip()[-300:]}")
        try:
            out[host] = json.loads(done.stdout)
        except ValueError as exc:
            raise ops.OpError(f"{host}: status.json is not JSON: {exc}") from None
    return out


def fetch_vias(statuses: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Each host's fetch ``via`` per service ("none" if its status has no fetch). Pure."""
    return {host: {svc: (status.get("services", {}).get(svc, {}).get("fetch") or {})
                   .get("via") or "none" for svc in SERVICES}
            for host, status in statuses.items()}


def swarm_engines(statuses: dict[str, dict]) -> dict[str, str]:
    """Each host's swarm engine as its agent reports it ("none": no swarm). Pure."""
    return {host: (status.get("swarm") or {}).get("engine") or "none"
            for host, status in statuses.items()}


def tidy(workdir: Path, ok: bool) -> str:
    """Remove the demo's work directory (the releases it built and served, the seeder's data)
    after a run that converged; keep it after a failure, for a look. Says which."""
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
        return f"removed {workdir}"
    return f"kept {workdir} (releases, seeder data) for a look"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmdemo")
    parser.add_argument("--store", required=True)
    parser.add_argument("--host", action="append", required=True, help="NAME=ADDRESS")
    parser.add_argument("--serve-on", required=True, help="the host side's address for URLs")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds for each wait (software emulation is slow)")
    parser.add_argument("--hz", type=float, default=5.0, help="prober rounds per second")
    parser.add_argument("--swarm", metavar="VERSION", default="3.0",
                        help="then stage VERSION through the swarm only, deploy it, and check "
                             "every host fetched it via the swarm (default 3.0; '': skip)")
    parser.add_argument("--engine", choices=ENGINES, default="libtorrent",
                        help="with --swarm: the seeder's BitTorrent engine, and the engine "
                             "every host's agent must report (the VMs' DCDT_ENGINE; default "
                             "libtorrent)")
    parser.add_argument("--status-cmd", default=STATUS_CMD,
                        help="with --swarm: a command printing host {host}'s status.json "
                             "(default: vagrant ssh, VAGRANT_CWD set as run-demo.sh sets it)")
    args = parser.parse_args(argv)
    if args.swarm and not args.status_cmd.strip():
        parser.error("--swarm needs --status-cmd (how to read a host's status.json)")
    hosts = dict(item.partition("=")[::2] for item in args.host)
    quorum = max(1, len(hosts) - 1)
    steps = Steps()
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-vmdemo-"))
    server = serve(workdir, args.serve_on, args.port)
    store = open_store(args.store)
    prober: Prober | None = None
    converged = False
    seed_dir = workdir / "seed"
    try:
        steps.run("connect to the store", store.start, timeout=120.0)

        def define() -> None:
            for svc in SERVICES:
                ops.service_set(store, svc, program=svc, quorum=quorum,
                                depends_on=["a"] if svc == "b" else [], max_parallel=1,
                                health=HealthCheck(kind="http", path="/health", port="port",
                                                   timeout=2.0),
                                healthy_secs=2.0)
        steps.run(f"define a and b (b depends on a), quorum {quorum} of {len(hosts)}", define)

        def stage(version: str) -> None:
            for svc in SERVICES:
                path, sha = build_release(workdir, svc, version)
                ops.stage(store, svc, version, sha256=sha, size=path.stat().st_size,
                          urls=[f"http://{args.serve_on}:{args.port}/{path.name}"])
        steps.run("stage 1.0 of a and b by URL", stage, "1.0")
        steps.run("every host fetches and serves 1.0", wait_for,
                  lambda: all_serve(hosts, "1.0"), args.timeout, "every host serving 1.0", 2.0)
        prober = Prober({(h, s): (addr, port) for h, addr in hosts.items()
                         for s, port in SERVICES.items()}, hz=args.hz, timeout=1.0).start()
        t0 = time.time()
        steps.run("stage 2.0 of a and b by URL", stage, "2.0")
        steps.run("every host ready to roll 2.0", wait_for,
                  lambda: all(len(store.children(layout.staged(s))) == len(hosts)
                              for s in SERVICES), args.timeout, "every host ready to roll", 1.0)
        items = steps.run("deploy b a (queued in dependency order)",
                          ops.deploy, store, ["b", "a"])
        _say("queued: " + ", ".join(f"{i.node} {i.service} -> {i.version}" for i in items))

        def watch(version: str) -> None:
            last = ""
            deadline = time.monotonic() + args.timeout
            while True:
                line = progress(store, hosts)
                if line != last:
                    _say(line)
                    last = line
                if not ops.status(store)["deploy"] and all_serve(hosts, version):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the deploy did not converge in {args.timeout:.0f} s")
                time.sleep(2.0)
        steps.run("deploy until every host serves 2.0", watch, "2.0")
        final, vias, engines = "2.0", {}, {}
        if args.swarm:
            final = args.swarm
            steps.run(f"start the build host's seeder ({args.serve_on})", seed.start,
                      seed.SeedConfig(dir=seed_dir, store_url=args.store, host="build",
                                      address=args.serve_on, rack="build",
                                      engine=args.engine))

            def stage_swarm() -> None:
                for svc in SERVICES:
                    path, _ = build_release(workdir / "swarm", svc, final, padding=4 << 20)
                    done = subprocess.run(
                        [sys.executable, "-m", "supervisor_dcdeploy.cli", "--store", args.store,
                         "stage", svc, final, "--path", str(path), "--seed-dir", str(seed_dir)],
                        capture_output=True, text=True, timeout=300)
                    if done.returncode != 0:
                        raise ops.OpError(f"dcdeploy stage {svc} {final}: "
                                          f"{done.stderr.strip()[-500:]}")
            steps.run(f"stage {final} of a and b (4 MiB each) through the swarm only, no URL",
                      stage_swarm)
            steps.run(f"every host fetches {final} through the swarm, ready to roll", wait_for,
                      lambda: all(ready(store, s, final) == len(hosts) for s in SERVICES),
                      args.timeout, f"every host ready to roll {final}", 1.0)
            items = steps.run("deploy b a", ops.deploy, store, ["b", "a"])
            _say("queued: " + ", ".join(f"{i.node} {i.service} -> {i.version}" for i in items))
            steps.run(f"deploy until every host serves {final}", watch, final)
            statuses = steps.run("read each host's status.json (fetch via, engine)",
                                 read_statuses, hosts, args.status_cmd)
            vias, engines = fetch_vias(statuses), swarm_engines(statuses)
            steps.run("stop the seeder", seed.stop, seed_dir)
        prober.stop()
        worst = {s: min(prober.serving(x, s) for x in prober.samples) for s in SERVICES}
        history = {h["service"]: h["state"] for h in ops.history(store)}
        print(f"\nTimeline (the prober on the host side, {prober.rate():.1f} rounds/s, "
              f"largest gap {prober.max_gap():.2f} s):")
        print("\n".join(timeline(prober, t0)))
        print("\nfewest serving: " + ", ".join(f"{s} {n} of {len(hosts)}"
                                               for s, n in worst.items())
              + f" (quorum {quorum}); history: {history}")
        if vias:
            print(f"fetch of {final} via: " + "; ".join(
                f"{h} " + ", ".join(f"{s} {v}" for s, v in per.items())
                for h, per in vias.items()))
            print("swarm engine: " + "; ".join(f"{h} {e}" for h, e in engines.items())
                  + f" (seeder {args.engine})")
        print("\nsteps:\n" + steps.table())
        if min(worst.values()) < quorum or set(history.values()) != {"done"}:
            _say("FAILED: went below quorum, or an item is not done")
            return 1
        if any(v != "swarm" for per in vias.values() for v in per.values()):
            _say(f"FAILED: a host did not fetch {final} through the swarm")
            return 1
        if any(e != args.engine for e in engines.values()):
            _say(f"FAILED: a host's agent does not run the {args.engine} engine")
            return 1
        _say(f"converged: all {len(hosts)} hosts on a {final} and b {final}, never below "
             f"quorum" + (f"; {final} came through the swarm" if vias else ""))
        converged = True
        return 0
    except (TimeoutError, ops.OpError, RuntimeError, subprocess.SubprocessError) as exc:
        print("\nsteps:\n" + steps.table())
        _say(f"FAILED: {exc}")
        return 1
    finally:
        if prober is not None:
            prober.stop()
        seed.stop(seed_dir)
        server.shutdown()
        store.stop()
        _say(tidy(workdir, converged))


if __name__ == "__main__":
    sys.exit(main())
