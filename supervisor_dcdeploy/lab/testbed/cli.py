"""``dcdeploy testbed up|down|status|check``: the namespace testbed from a shell.

``main(argv)`` is mounted by the project's CLI under ``testbed``; it is also runnable as
``python -m supervisor_dcdeploy.lab.testbed.cli``. ``up`` leaves the testbed running (its
processes are detached) and records it in ``<base>/testbed.json``; ``down`` removes
everything with the ``dcdt`` prefix, whether the testbed came up completely or not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import checker
from .bed import DEFAULT_BASE, BedConfig, Testbed, leftovers, status, teardown
from ...p2p.engine import ENGINES
from .history import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcdeploy testbed",
                                     description="hosts in network namespaces, a 3-node "
                                                 "ZooKeeper ensemble, faults and a checker")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help=f"testbed directory (default {DEFAULT_BASE})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the testbed and leave it running")
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--racks", type=int, default=2)
    up.add_argument("--engine", choices=ENGINES, default="libtorrent",
                    help="the hosts' BitTorrent engine (default libtorrent)")
    up.add_argument("--no-transmission", action="store_true",
                    help="no BitTorrent engine on the hosts (the name is historical)")
    sub.add_parser("down", help="tear down everything (also after a failed run)")
    st = sub.add_parser("status", help="what runs, ZooKeeper modes, versions served")
    st.add_argument("--json", action="store_true")
    ck = sub.add_parser("check", help="check S1-S5, L1-L3 on a recorded history")
    ck.add_argument("history", type=Path)
    ck.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.cmd == "up":
        if args.hosts < 1 or args.racks < 1:
            parser.error(f"--hosts and --racks must be >= 1, got {args.hosts}, {args.racks}")
        bed = Testbed(BedConfig(hosts=args.hosts, racks=args.racks, base=args.base,
                                transmission=not args.no_transmission,
                                swarm_engine=args.engine))
        try:
            bed.up()
        except Exception as exc:  # noqa: BLE001 - up() tore down; say what failed
            print(f"dcdeploy testbed: up failed: {exc}", file=sys.stderr)
            return 1
        bed.detach()
        print(f"testbed up: {len(bed.hosts)} hosts, store {bed.store_url}")
        print(f"DCDEPLOY_STORE={bed.store_url}")
        return 0
    if args.cmd == "down":
        removed = teardown(args.base)
        left = {k: v for k, v in leftovers(args.base).items() if v}
        print(f"testbed down: removed {len(removed)} item(s)")
        if left:
            print(f"dcdeploy testbed: still present after down: {left}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "status":
        info = status(args.base)
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
        elif not info["up"]:
            print("testbed: not up" + (f" (namespaces left: {info['namespaces']}; run "
                                       "'dcdeploy testbed down')" if info["namespaces"] else ""))
        else:
            print(f"store {info['store']}")
            for sid, zk in sorted(info["zk"].items()):
                print(f"  zk{sid} {zk['addr']:<14} {zk['mode'] or 'DOWN'}")
            for name, h in sorted(info["hosts"].items()):
                svcs = " ".join(f"{s}={v or 'DOWN'}" for s, v in sorted(h["services"].items()))
                print(f"  {name:<4} {h['addr']:<14} rack {h['rack']:<4} "
                      f"processes {h['processes']:<3} {svcs}")
        return 0
    events = load(args.history)
    results = checker.check(events)
    if args.json:
        print(json.dumps({"results": [r.__dict__ for r in results],
                          "metrics": checker.metrics(events)}, sort_keys=True))
    else:
        print(checker.format_table(results))
    return 1 if checker.violations(results) else 0


if __name__ == "__main__":
    sys.exit(main())
