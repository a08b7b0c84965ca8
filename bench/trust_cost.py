#!/usr/bin/env python3
"""What checking signatures costs an agent per cycle (trust.check_all).

A cycle checks, per service, the spec, the staged release and the deploy queue. This
times that check for one service with ``--items`` queued items, and prints it against the
agent's default poll interval (5 s) as a baseline: the share of one core a host spends on
signatures when it runs ``--services`` services and polls at that interval.

    python bench/trust_cost.py [--calls 2000] [--items 1] [--services 10] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from supervisor_dcdeploy import trust
from supervisor_dcdeploy.model import DeployItem, HealthCheck, ServiceSpec, StagedRelease

POLL_INTERVAL = 5.0  # agent.conf default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1)
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        private, _, _ = trust.generate(Path(tmp))
        signer = trust.load_signer(private)
        policy = trust.Policy(trust.load_trusted(str(Path(tmp) / "*.pub")))
    expires = time.time() + 3600

    def signed(value, counter):
        return dataclasses.replace(value, signature=trust.sign(
            signer, trust.payload_of(value), counter, expires))

    spec = signed(ServiceSpec("api", "api", 3, ("db",), 2,
                              HealthCheck(kind="http", path="/health", port="port", timeout=1.0),
                              1.0), 1)
    release = signed(StagedRelease("api", "2.1", "ab" * 32, 1 << 30,
                                   ("https://builds/api-2.1.tar.gz",), None, time.time()), 2)
    queue = [signed(DeployItem(f"item-{i:010d}", i, f"svc{i}", "2.1"), 3 + i)
             for i in range(args.items)]
    start = time.perf_counter()
    for _ in range(args.calls):
        _, _, _, refused, _ = trust.check_all(spec, release, queue, policy, time.time(), {})
        assert not refused, refused
    per_call = (time.perf_counter() - start) / args.calls
    share = per_call * args.services / POLL_INTERVAL
    result = {"calls": args.calls, "items": args.items, "services": args.services,
              "check_us": round(per_call * 1e6, 1), "poll_interval_s": POLL_INTERVAL,
              "cpu_share_of_one_core": round(share, 6)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"check_all (spec + release + {args.items} item(s)): {per_call * 1e6:.0f} us; "
              f"{args.services} services every {POLL_INTERVAL:g} s: "
              f"{share * 100:.3f}% of one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
