#!/usr/bin/env python3
"""Store fuzzing under running agents (issue 8): random and mutated values written into every
node kind while a rolling deploy runs, on a real ZooKeeper with real supervisord hosts.

Each case writes one value, waits until every agent has run two full cycles after the write
(its status.json counts cycles), checks the agents' pids, their cycle_errors counters, what an
independent prober saw of each service against its quorum, and that the CLI's read paths do
not raise; then it puts the node back (see supervisor_dcdeploy/lab/storefuzz.py).
``--batch K`` writes K cases (of K distinct random kinds) at once before waiting.

    python bench/fuzz_store.py --cases 200 --seed 1 --json

With --json stdout holds exactly one object {"cases", "agent_crashes", "cycle_errors",
"services_below_quorum", "cli_errors"}; progress and problems go to stderr. Exit status 1 when
any count but cases is non-zero. SIGTERM ends the run after the current round and reports
the cases done.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor_dcdeploy.lab.storefuzz import KINDS, Fuzzer, fuzz_cluster, fuzz_prober  # noqa: E402
from supervisor_dcdeploy.store import open_store  # noqa: E402
from supervisor_dcdeploy.lab.zkserver import ZooKeeperServer, free_port  # noqa: E402


stop_requested = False


def _interrupt(signum, frame) -> None:
    """SIGTERM: finish the current round, then report the cases done so far."""
    global stop_requested
    stop_requested = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1,
                        help="cases written together per round (distinct kinds)")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=0.2,
                        help="the agents' poll_interval (seconds)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= len(KINDS):
        parser.error(f"--batch must be 1..{len(KINDS)}")

    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="dcdeploy-fuzz-"))
    zk = ZooKeeperServer(workdir / "zk", free_port())
    zk.start()
    cluster = None
    started = time.monotonic()
    try:
        zk.wait_serving()
        url = f"zk://127.0.0.1:{zk.client_port}/fuzz{uuid.uuid4().hex[:8]}"
        store = open_store(url)
        store.start(timeout=15)
        cluster, quorum = fuzz_cluster(workdir, store, url, args.hosts, args.poll_interval)
        prober = fuzz_prober(cluster)
        fuzzer = Fuzzer(cluster, quorum, prober)
        last_report = time.monotonic()
        signal.signal(signal.SIGTERM, _interrupt)
        while fuzzer.tally.cases < args.cases and not stop_requested:
            left = args.cases - fuzzer.tally.cases
            fuzzer.round(rng, rng.sample(KINDS, min(args.batch, left)))
            prober.samples[:] = [s for s in prober.samples if s.t > time.time() - 60]
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                rate = fuzzer.tally.cases / (last_report - started)
                print(f"[fuzz] {json.dumps(fuzzer.tally.summary())} deploys_done="
                      f"{fuzzer.tally.deploys_done} rate={rate:.2f}/s", file=sys.stderr,
                      flush=True)
        prober.stop()
        store.stop()
    finally:
        if cluster is not None:
            cluster.stop_all()
        zk.kill()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    tally = fuzzer.tally
    elapsed = time.monotonic() - started
    for problem in tally.problems[:50]:
        print(f"[fuzz] problem: {problem}", file=sys.stderr)
    print(f"[fuzz] {tally.cases} cases in {elapsed:.0f}s ({tally.cases / elapsed:.2f}/s), "
          f"{tally.deploys_done} deploys completed meanwhile", file=sys.stderr)
    summary = tally.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:<22} {value}")
    return 1 if any(v for k, v in summary.items() if k != "cases") else 0


if __name__ == "__main__":
    sys.exit(main())
