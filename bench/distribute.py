#!/usr/bin/env python3
"""Release distribution through one engine: a BitTorrent swarm or plain HTTP from one origin.

N hosts (default 8, in 2 racks) and an origin/build host, each in its own network namespace
on one bridge, each capped at B (default 100 Mbit/s) both ways with tc tbf. An artifact of S
bytes (default 256 MiB, random) is distributed by ``--engine``:

- transmission / libtorrent: staged as a private torrent, seeded by the origin's daemon of
  that engine (libtorrent super-seeds only with ``--origin-tuning '{"super_seed": true}'``),
  fetched by every host at once through its own daemon (the Engine interface: add, wait,
  sha256 verify);
- http: every host downloads it at once with curl from a Python HTTP server on the origin.

It prints the time until the last host is complete (from the moment all fetches are
started; the swarm's includes its sha256 verification), that time over the ideal S/B, the
median host's time, the origin's egress (bytes leaving its interface, TCP/IP headers
included) over S, and the machine's CPU use during the distribution (all cores, 0..1: near
1 means the machine, not the links, was the limit).

    sudo python bench/distribute.py --engine libtorrent [--hosts 8] [--size-mib 256] \
        [--mbit 100] [--json]

``--timeline FILE`` (both engines) samples every daemon twice a second: pieces held, peers
with flags, rates and request queues (libtorrent: through the daemon's read-only ``detail``
operation), and notes when the first peer and block arrived and when every piece first
existed on some host.

The ideal is S/B with B the shaped link rate; TCP/IP headers (tbf counts whole packets)
and BitTorrent framing take ~4-5 % of B, so even a perfect transfer measures ~1.05 x S/B.

``--json`` prints one object: {"engine", "hosts", "size_bytes", "bandwidth_bps",
"last_complete_s", "ideal_s", "ratio", "origin_egress_ratio", "p50_complete_s", "cpu_util"},
plus "lab_cpu_util" (the share of all cores used by the lab's own long-lived processes:
daemons and nodes; curl processes that exited are not counted) and "load_avg" (the
machine's 1-minute load at the end), since cpu_util counts everything the machine runs.

Needs root. Namespaces "dcdb-*" on 10.215.0.0/16, torn down on exit (failures included).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from supervisor_dcdeploy.lab import netns
from supervisor_dcdeploy.lab.swarmlab import SwarmLab
from supervisor_dcdeploy.p2p.engine import ENGINES
from supervisor_dcdeploy.p2p.seed import Staged, add_seed
from supervisor_dcdeploy.p2p.torrent import artifact_sha256, make_torrent, piece_count

MiB = 1 << 20
HTTP_PORT = 8080


def quiet_logs() -> None:
    import logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def write_artifact(path: Path, size: int) -> None:
    chunk = 8 * MiB
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n


def summary(done: dict[str, float], ideal: float, egress: int, size: int) -> dict:
    import statistics
    last = max(done.values())
    return {"last_complete_s": round(last, 2), "ideal_s": round(ideal, 2),
            "ratio": round(last / ideal, 2), "origin_egress_ratio": round(egress / size, 3),
            "p50_complete_s": round(statistics.median(done.values()), 2)}


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (/proc/stat's first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_util(before: tuple[int, int], after: tuple[int, int]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(busy / total, 3) if total else 0.0


def lab_cpu_ticks(lab: SwarmLab) -> int:
    """CPU ticks (user + system) used so far by the processes inside the lab's namespaces
    (daemons, nodes, curl, the HTTP server): what the benchmark itself costs, apart from
    whatever else the machine runs."""
    total = 0
    for host in lab.hosts.values():
        out = subprocess.run(["ip", "netns", "pids", host.ns.ns], capture_output=True,
                             text=True).stdout.split()
        for pid in out:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


class Timeline:
    """Polls every daemon twice a second while the swarm runs; writes JSON lines
    ``{"t", "host", "done", "rate_down", "rate_up", "pieces", "peers": [{"host", "flags",
    "down", "up", "progress"}]}`` (libtorrent: ``pieces`` is a string of 0/1, and
    ``uploaded``, ``redundant``, ``share`` (``[rank, hosts]`` with ``--share-pieces``) and
    per-peer request queues are added) and notes when the first peer and the first block arrived
    anywhere and when every piece first existed on some host (after that the origin only
    sends duplicates). Used to find where the time goes (docs/distribution.md)."""

    def __init__(self, lab: SwarmLab, infohash: str, piece_count: int, path: Path,
                 start: float) -> None:
        self.infohash, self.piece_count, self.path, self.start = infohash, piece_count, path, start
        self.by_addr = {h.address: n for n, h in lab.hosts.items()}
        self.samplers = {n: self._sampler(h) for n, h in lab.hosts.items()}
        self.first_peer: float | None = None
        self.first_data: float | None = None
        self.all_pieces_out: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _sampler(self, h):
        if h.engine == "libtorrent":
            eng = h.fetcher()

            def sample():
                d = eng.detail(self.infohash)
                st = eng.state(self.infohash)
                if d is None or st is None:
                    return None
                return {"done": st.done_bytes / max(st.total_bytes, 1),
                        "rate_down": st.rate_down, "rate_up": st.rate_up,
                        "uploaded": d["uploaded"], "pieces": d["pieces"],
                        "redundant": d.get("redundant"), "share": d.get("share"),
                        "peers": [{"host": self.by_addr.get(p["address"], p["address"]),
                                   "flags": p["flags"], "down": p["down"], "up": p["up"],
                                   "progress": p["progress"], "queue_down": p["queue_down"],
                                   "total_down": p["total_down"], "piece": p.get("piece"),
                                   "queue_up": p["queue_up"]} for p in d["peers"]]}
            return sample
        from transmission_rpc import Client
        from supervisor_dcdeploy.p2p.daemon import RPC_USER, read_secret
        fields = ["percentDone", "rateDownload", "rateUpload", "peers", "pieces"]
        # made inside the host's namespace: its RPC is on that loopback
        c = h.runner(lambda: Client(host="127.0.0.1", port=int(urlsplit(h.rpc_url).port or 9091),
                                    username=RPC_USER, password=read_secret(h.secret_file),
                                    timeout=5))

        def sample():
            f = h.runner(lambda: c.get_torrent(self.infohash, arguments=fields).fields)
            raw = base64.b64decode(f.get("pieces", "")) if f.get("pieces") else b""
            bits = bin(int.from_bytes(raw, "big"))[2:].zfill(len(raw) * 8)[:self.piece_count]
            return {"done": f["percentDone"], "rate_down": f["rateDownload"],
                    "rate_up": f["rateUpload"], "pieces": bits,
                    "peers": [{"host": self.by_addr.get(p["address"], p["address"]),
                               "flags": p["flagStr"], "down": p["rateToClient"],
                               "up": p["rateToPeer"], "progress": round(p["progress"], 3)}
                              for p in f.get("peers", [])]}
        return sample

    def run(self) -> None:
        bitfields: dict[str, int] = {}
        with open(self.path, "w") as out:
            while not self.stop.wait(0.5):
                t = round(time.monotonic() - self.start, 2)
                for n, sample in self.samplers.items():
                    try:
                        rec = sample()
                    except Exception:  # noqa: BLE001 - a diagnostic: skip one sample
                        continue
                    if rec is None:
                        continue
                    out.write(json.dumps({"t": t, "host": n, **rec}) + "\n")
                    if n == "origin":
                        continue
                    if self.first_peer is None and rec["peers"]:
                        self.first_peer = t
                    if self.first_data is None and rec["done"] > 0:
                        self.first_data = t
                    bitfields[n] = int(rec["pieces"] or "0", 2)
                if self.all_pieces_out is None and bitfields and bin(
                        _union(bitfields.values())).count("1") >= self.piece_count:
                    self.all_pieces_out = t
                out.flush()


def _union(values) -> int:
    u = 0
    for v in values:
        u |= v
    return u


def run_swarm(lab: SwarmLab, names: list[str], staged: Staged, timeout: float,
              log: list[str], timeline: Path | None = None,
              parts: int = 1, extra: dict | None = None) -> tuple[float, int, dict[str, float]]:
    build = lab.hosts["origin"]
    lab.publish(staged)  # the trackers answer staged infohashes only
    add_seed(build.dir, build.info.get("rpc_url", ""), staged, wait=600, runner=build.runner)
    before = lab.egress_bytes("origin")
    done: dict[str, float] = {}
    errors: dict[str, BaseException] = {}
    start = time.monotonic()
    recorder = (Timeline(lab, staged.infohash, piece_count(staged.metainfo), timeline, start)
                if timeline else None)
    if recorder:
        recorder.thread.start()

    def one(name: str) -> None:
        try:
            fetcher = lab.hosts[name].fetcher()
            if parts > 1:  # experiment: each host prefers "its" part (see --parts)
                ih = fetcher.add(staged.metainfo)
                mine = names.index(name) % parts
                fetcher._rpc(lambda c: c.change_torrent(ih, priority_high=[mine]))
            fetcher.fetch(staged.metainfo_b64, staged.sha256, timeout=timeout)
            done[name] = time.monotonic() - start
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if recorder:
        recorder.stop.set()
        recorder.thread.join()
    if errors:
        raise RuntimeError(f"swarm fetch failed: {errors}")
    last = max(done.values())
    egress = lab.egress_bytes("origin") - before
    log.append("swarm per host (s): " + " ".join(f"{n}={done[n]:.1f}" for n in names))
    if recorder:
        log.append(f"timeline: first peer at {recorder.first_peer} s, first block at "
                   f"{recorder.first_data} s, every piece on some host at "
                   f"{recorder.all_pieces_out} s ({timeline})")
        if extra is not None:
            extra["timeline"] = {"first_peer_s": recorder.first_peer,
                                 "first_block_s": recorder.first_data,
                                 "all_pieces_out_s": recorder.all_pieces_out}
    return last, egress, done


def run_http(lab: SwarmLab, names: list[str], staged: Staged, timeout: float,
             log: list[str]) -> tuple[float, int, dict[str, float]]:
    origin = lab.hosts["origin"]
    server = subprocess.Popen(origin.ns.exec_args(
        sys.executable, "-m", "http.server", "--bind", origin.address,
        "--directory", str(staged.path.parent), str(HTTP_PORT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{origin.address}:{HTTP_PORT}/{staged.path.name}"
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(lab.hosts[names[0]].ns.exec_args(
                "curl", "-sf", "-o", "/dev/null", "-r", "0-0", url)).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("HTTP origin did not come up")
            time.sleep(0.2)
        before = lab.egress_bytes("origin")
        start = time.monotonic()
        procs = {}
        for n in names:
            dest = lab.hosts[n].dir / "http" / staged.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            procs[n] = (subprocess.Popen(lab.hosts[n].ns.exec_args(
                "curl", "-sf", "--max-time", str(int(timeout)), "-o", str(dest), url)), dest)
        done: dict[str, float] = {}
        while len(done) < len(procs):
            for n, (p, dest) in procs.items():
                if n not in done and p.poll() is not None:
                    if p.returncode != 0:
                        raise RuntimeError(f"curl on {n} exited with {p.returncode}")
                    done[n] = time.monotonic() - start
            time.sleep(0.05)
        last = max(done.values())
        egress = lab.egress_bytes("origin") - before
        for n, (_, dest) in procs.items():  # same bytes, or the comparison means nothing
            if artifact_sha256(dest) != staged.sha256:
                raise RuntimeError(f"HTTP copy on {n} is corrupt")
            dest.unlink()
    finally:
        server.kill()
        server.wait()
    log.append("http per host (s):  " + " ".join(f"{n}={done[n]:.1f}" for n in names))
    return last, egress, done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=[*ENGINES, "http"],
                    default="transmission")
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--racks", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--mbit", type=int, default=100)
    ap.add_argument("--piece-kib", type=int, default=0, help="override the piece size")
    ap.add_argument("--tuning", default="", help="JSON of extra engine settings")
    ap.add_argument("--origin-tuning", default="",
                    help="JSON of extra engine settings for the origin only")
    ap.add_argument("--parts", type=int, default=1,
                    help="experiment (transmission): split the artifact into N files, host i "
                         "prefers part i")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--timeline", default=None, metavar="FILE",
                    help="write the swarm's per-host timeline (JSON lines)")
    args = ap.parse_args(argv)
    if args.parts > 1 and args.engine != "transmission":
        ap.error("--parts uses Transmission's RPC: --engine transmission")
    if args.timeline and args.engine == "http":
        ap.error("--timeline needs a swarm engine")
    ok, why = netns.available()
    if not ok:
        print(f"bench/distribute.py: {why}", file=sys.stderr)
        return 2
    quiet_logs()
    size = args.size_mib * MiB
    bps = args.mbit * 1_000_000
    ideal = size * 8 / bps
    timeout = max(600.0, 3 * args.hosts * ideal)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dcdb-"))
    swarm = args.engine != "http"
    lab = SwarmLab(work, prefix="dcdb", subnet="10.215.0.0/16", root="/dcdb",
                   tuning=json.loads(args.tuning) if args.tuning else None,
                   host_tuning={"origin": json.loads(args.origin_tuning)}
                   if args.origin_tuning else None,
                   engine=args.engine if swarm else "transmission")
    notes: list[str] = []
    try:
        lab.up()
        names = [f"h{i + 1}" for i in range(args.hosts)]
        lab.add_host("origin", "build", mbit=args.mbit)
        for i, n in enumerate(names):
            lab.add_host(n, f"r{i % args.racks + 1}", mbit=args.mbit)
        if swarm:
            for n in ["origin", *names]:
                lab.start_node(n)
        art_dir = work / "artifacts"
        art_dir.mkdir()
        if args.parts > 1:
            art = art_dir / "release"
            art.mkdir()
            for i in range(args.parts):
                write_artifact(art / f"part-{i:03d}", size // args.parts)
        else:
            art = art_dir / "release.bin"
            write_artifact(art, size)
        t0 = time.monotonic()
        meta, ih = make_torrent(art, piece_size=args.piece_kib * 1024 or None)
        hash_s = time.monotonic() - t0
        staged = Staged(art, meta, ih, artifact_sha256(art), size)
        notes.append(f"torrent: {ih}, hashed in {hash_s:.1f} s")
        cpu0, lab0, wall0 = cpu_times(), lab_cpu_ticks(lab), time.monotonic()
        extra: dict = {}
        if swarm:
            _, egress, done = run_swarm(lab, names, staged, timeout, notes,
                                        Path(args.timeline) if args.timeline else None,
                                        parts=args.parts, extra=extra)
        else:
            _, egress, done = run_http(lab, names, staged, timeout, notes)
        cpu = cpu_util(cpu0, cpu_times())
        # Processes still running at the end only (a curl that exited is not counted).
        lab_cpu = (lab_cpu_ticks(lab) - lab0) / os.sysconf("SC_CLK_TCK") / (
            (time.monotonic() - wall0) * (os.cpu_count() or 1))
        result = {"engine": args.engine, "hosts": args.hosts, "size_bytes": size,
                  "bandwidth_bps": bps, **summary(done, ideal, egress, size), "cpu_util": cpu,
                  "lab_cpu_util": round(lab_cpu, 3), "load_avg": os.getloadavg()[0], **extra}
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.engine}: {args.hosts} hosts in {args.racks} racks + origin, "
          f"S = {args.size_mib} MiB, B = {args.mbit} Mbit/s per host, ideal S/B = {ideal:.1f} s")
    for line in notes:
        print("  " + line)
    print(f"  last host done {result['last_complete_s']:.1f} s = {result['ratio']:.2f} x S/B, "
          f"median host {result['p50_complete_s']:.1f} s, origin egress "
          f"{result['origin_egress_ratio']:.2f} x S, CPU {100 * cpu:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
