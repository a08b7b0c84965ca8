"""Prober stall bench (issue 14, item 4): does the testbed's prober turn a machine stall into
a longer one?

Runs prober variants (``variants.py``: ``current`` is ``testbed.recorder.Prober`` itself)
against 8 local endpoints (the sample app, one process each, 127.0.0.1; no namespaces),
under CPU load (``load.py``), beside one SCHED_FIFO 10 sampler pinned per CPU
(``sampler.py``: 5 ms sleeps, every wake-up more than 2 ms late logged), optionally with
injected stalls (``stall.py``: a SCHED_FIFO 50 spinner per CPU at the same instants).
Prints one JSON line per run: the worst gap as the checker's P computes it, each sample's
lateness against its own schedule (its previous sample's start + one period, or that
sample's end when later), the samplers' worst lateness, and per cluster of late prober
wake-ups the prober's worst against the samplers' at the same moments (``excess_ms``).
Root only (SCHED_FIFO). Injected stalls hit everything on the machine: run it under
``flock /tmp/dcdeploy-netns.lock`` so that no testbed trial runs beside it.

  flock /tmp/dcdeploy-netns.lock .venv/bin/python bench/proberstall/run.py \
      --secs 45 --rounds 2 --stall 2.37,50,0+1 current a_sleep b_procs c_async
"""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent)); sys.path.insert(0, str(HERE))
from supervisor_dcdeploy.lab.testbed.history import HistoryWriter
from supervisor_dcdeploy.lab.testbed.recorder import Endpoint
import variants

PORTS = list(range(18101, 18109))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids):
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError):
            pass
    return total / TICK


def analyse(events, period, sampler_events, w0, w1):
    """Samples of the prober between ``w0`` and ``w1`` (the samplers' window) only."""
    by = {}
    for e in events:
        if e["kind"] == "probe" and w0 <= e["t"] <= w1:
            by.setdefault((e["host"], e["service"]), []).append(e)
    worst_gap, late_events, n = 0.0, [], 0
    for key, smp in by.items():
        smp.sort(key=lambda e: e["t"])
        covered = smp[0]["t"]  # as check_p, from this endpoint's first sample in the window
        for prev, cur in zip(smp, smp[1:]):
            covered = max(covered, prev["t"] + prev["dt"])
            worst_gap = max(worst_gap, cur["t"] - covered)
            sched = max(prev["t"] + period, prev["t"] + prev["dt"])
            late = cur["t"] - sched
            n += 1
            late_events.append((sched, cur["t"], late, key))
    lates = sorted(l for _, _, l, _ in late_events)
    q = lambda p: lates[min(len(lates) - 1, int(p * len(lates)))]
    # clusters of prober wake-ups more than 10 ms late
    big = sorted((e for e in late_events if e[2] > 0.010), key=lambda e: e[0])
    clusters = []
    for s, t, l, k in big:
        if clusters and s <= clusters[-1]["e"]:
            c = clusters[-1]; c["e"] = max(c["e"], t); c["late"] = max(c["late"], l)
            c["ts"].append(t); c["n"] += 1
        else:
            clusters.append({"s": s, "e": t, "late": l, "ts": [t], "n": 1})
    out = []
    for c in clusters:
        m = max([x["late"] for x in sampler_events if x["s"] < c["e"] and x["e"] > c["s"]],
                default=0.0)
        both = min(max([x["late"] for x in sampler_events if x["cpu"] == cpu
                        and x["s"] < c["e"] and x["e"] > c["s"]], default=0.0) for cpu in (0, 1))
        out.append({"at": round(c["s"], 3), "prober_ms": round(c["late"] * 1e3, 1),
                    "machine_ms": round(m * 1e3, 1), "both_cpus_ms": round(both * 1e3, 1),
                    "excess_ms": round((c["late"] - m) * 1e3, 1), "wakes": c["n"],
                    "spread_ms": round((max(c["ts"]) - min(c["ts"])) * 1e3, 1)})
    return {"samples": n + len(by), "worst_gap_ms": round(worst_gap * 1e3, 1),
            "late_p50_ms": round(q(0.5) * 1e3, 2), "late_p99_ms": round(q(0.99) * 1e3, 1),
            "late_max_ms": round(lates[-1] * 1e3, 1),
            "machine_max_ms": round(max([x["late"] for x in sampler_events], default=0) * 1e3, 1),
            "machine_events_over_15ms": sum(1 for x in sampler_events if x["late"] > 0.015),
            "max_excess_ms": max([c["excess_ms"] for c in out], default=0.0),
            "top": sorted(out, key=lambda c: -c["prober_ms"])[:4]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--secs", type=float, default=90)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-load", action="store_true")
    ap.add_argument("--rate", type=float, default=25.0, help="probe rate, Hz (the testbed's: 25)")
    ap.add_argument("--out", default="/tmp/probestall")
    ap.add_argument("--stall", default="", help="EVERY_S,MS,CPUS e.g. 2.37,50,0+1: inject stalls")
    a = ap.parse_args()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up below
    out = Path(a.out); out.mkdir(exist_ok=True)
    py = sys.executable
    srv = Path(tempfile.mkdtemp(prefix="proberstall-"))
    shutil.copy(HERE.parent.parent / "supervisor_dcdeploy" / "lab" / "sample" / "app.py", srv)
    (srv / "release.json").write_text(json.dumps({"service": "svc", "version": "1.0"}))
    servers = [subprocess.Popen([py, str(srv / "app.py"), "--port", str(p), "--bind",
                                 "127.0.0.1"]) for p in PORTS]
    total = a.secs * a.rounds * len(a.variants) + 60
    load = None if a.no_load else subprocess.Popen([py, str(HERE / "load.py"), str(total)])
    stall = None
    if a.stall:
        every, ms, cpus = a.stall.split(",")
        stall = subprocess.Popen([py, str(HERE / "stall.py"), every, ms, cpus.replace("+", ","), str(total)])
    time.sleep(1.0)
    pr, samp = None, []
    eps = [Endpoint(f"h{i // 2 + 1}", "ab"[i % 2], "127.0.0.1", p) for i, p in enumerate(PORTS)]
    try:
        for r in range(a.rounds):
            for v in a.variants:
                w = HistoryWriter(None)
                pr = variants.VARIANTS[v](w, eps, rate=a.rate, timeout=1.0)
                pr.start()
                c0, s0 = cpu_of(pr.pids()), os.times()
                files = [out / f"sampler-{r}-{v}-{cpu}.jsonl" for cpu in (0, 1)]
                w0 = time.monotonic()
                samp = [subprocess.Popen([py, str(HERE / "sampler.py"), str(cpu), str(f),
                                          str(a.secs)]) for cpu, f in zip((0, 1), files)]
                for p in samp:
                    p.wait()
                w1 = time.monotonic()
                c1, s1 = cpu_of(pr.pids()), os.times()
                pr.stop()
                pr = None
                sev = [json.loads(l) for f in files for l in f.read_text().splitlines()]
                sev = [x for x in sev if "late" in x]
                res = analyse(w.events, 1.0 / a.rate, sev, w0, w1)
                res.update(variant=v, round=r, secs=a.secs, rate=a.rate, stall=a.stall,
                           prober_cpu_s_per_min=round((c1 - c0) / a.secs * 60, 2),
                           parent_cpu_s_per_min=round(((s1.user + s1.system) - (s0.user + s0.system)) / a.secs * 60, 2),
                           load=os.getloadavg()[0])
                print(json.dumps(res), flush=True)
    finally:
        if pr is not None:
            pr.stop()
        for p in samp:
            p.kill()
        # load.py and stall.py kill their children when they get SIGTERM
        for p in (stall, load):
            if p:
                p.terminate()
                p.wait()
        for p in servers:
            p.kill()
        shutil.rmtree(srv, ignore_errors=True)


if __name__ == "__main__":
    main()
