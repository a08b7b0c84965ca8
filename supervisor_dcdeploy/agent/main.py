"""``dcdeploy-agent``: run as a supervisord event listener (see conf/dcdeploy.conf).

The main thread speaks the event-listener protocol on stdin/stdout; the worker thread does
the work; logs go to stderr. ``--standalone`` runs without the protocol (for debugging)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import structlog

from .. import logs
from .config import ConfigError, load
from .listener import listen, wakes_the_cycle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcdeploy-agent", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("/etc/dcdeploy/agent.conf"))
    parser.add_argument("--standalone", action="store_true",
                        help="do not speak supervisord's event-listener protocol")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    log = structlog.get_logger("dcdeploy.agent")
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"dcdeploy-agent: {exc}", file=sys.stderr)
        return 2
    from .worker import Agent
    agent = Agent(cfg)

    def stop(signum, _frame):
        agent.stopping.set()
        agent.wake.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker = threading.Thread(target=agent.run, name="agent", daemon=True)
    worker.start()

    def on_event(name: str, _payload: str) -> None:
        if wakes_the_cycle(name):
            agent.wake.set()

    try:
        if args.standalone:
            worker.join()
        else:
            listen(sys.stdin, sys.stdout, on_event)
            log.info("agent.stdin_closed")
    finally:
        agent.stopping.set()
        agent.wake.set()
        worker.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
