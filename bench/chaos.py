#!/usr/bin/env python3
"""Chaos runs on the namespace testbed (issue #4).

Each trial deploys a new version of a dependency chain (b depends on a, quorum 2 of 4 hosts
in 2 racks) while faults of random kinds hit random hosts at random moments; the prober and
the store recorder write the trial's history and the checker evaluates S1-S5, L1-L3 on it.
A trial's fault plan depends only on (--seed, trial number): rerun one with
``--seed S --only-trial K``. Timing (when a process dies relative to a switch) is the
machine's; the plan is not.

    python bench/chaos.py --trials 5 --seed 42            # tables and a summary
    python bench/chaos.py --trials 2 --seed 7 --json      # one JSON object on stdout

The hosts run the testbed's default swarm engine, libtorrent; ``--engine transmission``
runs transmission-daemon instead.

With --json stdout holds exactly {"trials", "seed", "faults", "during_deploy", "mid_switch",
"violations", "interrupted"} (trials counts the trials that finished; faults by kind: injected, injected while the deploy queue was not empty,
landed inside a switch); the summary (leader election and deploy-resume times) goes to
stderr. ``--cover`` makes the run draw every fault kind at least once (trials x faults per
trial must be at least the number of kinds); the plan then depends on --trials too.

SIGINT or SIGTERM ends the run between two steps: the testbed is torn down and the trials that
finished are reported (``"interrupted": true``). Exit status 1 when any property was violated,
2 when the testbed could not be built, 130 when interrupted without a violation.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor_dcdeploy.lab.testbed import checker  # noqa: E402
from supervisor_dcdeploy.lab.testbed.bed import BedConfig, ServiceDef, Testbed  # noqa: E402
from supervisor_dcdeploy.lab.testbed.faults import KINDS  # noqa: E402
from supervisor_dcdeploy.p2p.engine import ENGINES  # noqa: E402
from supervisor_dcdeploy.lab.testbed.trial import (  # noqa: E402
    abort_if_stuck, cover, plan, run_deploy)


def trial_seed(seed: int, trial: int) -> int:
    return seed * 1_000_003 + trial


def _target(p) -> str:
    """The host a planned fault names. A mid-switch fault hits whichever host is switching
    when it fires (trial.py; its fault record names it), except disk_full, which waits for
    its own host: printing the planned host there would name the wrong one."""
    if p.mid_switch and p.kind != "disk_full":
        return "/(a switching host) mid-switch"
    return ("/" + p.host if p.host else "") + (" mid-switch" if p.mid_switch else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only-trial", type=int, default=None,
                        help="run just this trial number of the seed (to reproduce it)")
    parser.add_argument("--faults-per-trial", type=int, default=3)
    parser.add_argument("--window", type=float, default=15.0,
                        help="faults start within this many seconds of the deploy")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated fault kinds (default all: {','.join(KINDS)})")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--healthy-secs", type=float, default=1.0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="write each trial's history here (default: a temp dir)")
    parser.add_argument("--cover", action="store_true",
                        help="every kind at least once over the run (needs trials x faults "
                             ">= kinds)")
    parser.add_argument("--engine", choices=ENGINES,
                        default=BedConfig.swarm_engine,
                        help=f"the hosts' BitTorrent engine (default {BedConfig.swarm_engine}, "
                             "the testbed's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"unknown fault kind(s) {unknown}; known: {', '.join(KINDS)}")
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    if args.cover and args.trials * args.faults_per_trial < len(kinds):
        parser.error(f"--cover: {args.trials} x {args.faults_per_trial} faults cannot cover "
                     f"{len(kinds)} kinds")
    orders = cover(args.seed, kinds, args.trials, args.faults_per_trial) if args.cover \
        else None
    _quiet()
    out = sys.stderr if args.json else sys.stdout
    keep = args.keep or Path(tempfile.mkdtemp(prefix="dcdt-chaos-"))
    keep.mkdir(parents=True, exist_ok=True)
    services = (ServiceDef("a", 8001, 2, healthy_secs=args.healthy_secs),
                ServiceDef("b", 8002, 2, ("a",), healthy_secs=args.healthy_secs))
    bed = Testbed(BedConfig(hosts=args.hosts, racks=2, services=services,
                            base=Path(tempfile.mkdtemp(prefix="dcdt-chaos-bed-")),
                            disk_host="h1", swarm_engine=args.engine))
    faults: Counter = Counter()
    during: Counter = Counter()
    mid: Counter = Counter()
    violations: list[dict] = []
    elections: list[float] = []
    resumes: list[float] = []
    trials = [args.only_trial] if args.only_trial is not None else list(range(args.trials))
    started = time.monotonic()
    finished = 0
    interrupted = ""
    _interruptible()
    try:
        try:
            bed.up()
        except Exception as exc:  # noqa: BLE001 - reported, exit 2
            print(f"chaos: the testbed did not come up: {exc}", file=sys.stderr)
            return 2
        for n, trial in enumerate(trials):
            schedule = plan(trial_seed(args.seed, trial), list(bed.hosts), kinds,
                            args.faults_per_trial, args.window, bed.config.disk_host,
                            orders[trial] if orders else None)
            history = keep / f"trial-{args.seed}-{trial}.jsonl"
            print(f"trial {trial} (seed {args.seed}): "
                  + ", ".join(f"{p.kind}@{p.at:.1f}s{_target(p)} {p.duration:.0f}s"
                              for p in schedule), file=out, flush=True)
            try:
                result = run_deploy(bed, str(n + 2), schedule, history)
            except Exception as exc:  # noqa: BLE001 - a broken harness is a failed trial
                violations.append({"trial": trial, "property": "harness",
                                   "detail": f"{type(exc).__name__}: {exc}"})
                abort_if_stuck(bed)
                continue
            abort_if_stuck(bed)
            faults.update(result.injected)
            during.update(result.during_deploy)
            mid.update(result.mid_switch)
            elections += result.metrics["election_s"]
            resumes += result.metrics["resume_s"]
            for r in result.violations:
                violations.append({"trial": trial, "property": r.prop,
                                   "detail": r.counterexample})
            print(checker.format_table(result.results), file=out)
            print(f"  history {history}; converged {result.converged}", file=out, flush=True)
            finished += 1
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "SIGINT"
        print(f"chaos: {interrupted} after {finished} finished trial(s); tearing the testbed "
              f"down", file=sys.stderr, flush=True)
    finally:
        bed.down()
    report = {"trials": finished, "interrupted": bool(interrupted), "seed": args.seed, "faults": dict(sorted(faults.items())),
              "during_deploy": dict(sorted(during.items())),
              "mid_switch": dict(sorted(mid.items())), "violations": violations}
    summary = [f"chaos: {finished} trial(s){' (interrupted)' if interrupted else ''}, seed {args.seed}, "
               f"{sum(faults.values())} faults {dict(sorted(faults.items()))}, "
               f"{len(violations)} violation(s), {time.monotonic() - started:.0f}s"]
    if elections:
        summary.append(f"  leader election after kill -9 of the leader: "
                       f"{_stats(elections)} s (n={len(elections)})")
    if resumes:
        summary.append(f"  deploy moved again after the leader kill: {_stats(resumes)} s "
                       f"(n={len(resumes)})")
    print("\n".join(summary), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 1 if violations else 130 if interrupted else 0


def _interruptible() -> None:
    """Make SIGINT and SIGTERM stop the run cleanly.

    A shell starts a background job with SIGINT ignored, and Python's default SIGTERM ends the
    process without running ``finally``: either way the testbed's namespaces and processes
    stayed behind. Both signals now raise KeyboardInterrupt in the main thread; a second one
    is ignored so the teardown is not cut short."""
    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _stats(values: list[float]) -> str:
    return (f"median {statistics.median(values):.2f}, min {min(values):.2f}, "
            f"max {max(values):.2f}")


def _quiet() -> None:
    """Keep stdout for the report: library logs go to stderr at warning level."""
    import logging
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
