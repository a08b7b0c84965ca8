"""Quorum verified by probes (issue 10 item 5, docs/policy.md "Verified peers").

A presence says a host serves; it stays in the store until the host's session expires
(ZooKeeper: the session timeout; Consul: up to twice the TTL), so a host ``kill -9``ed
counts as online, and keeps its ready-queue slot, for that long. With ``verify_peers``
on a service, the host at the gate probes the other online hosts' published endpoints
(``probe`` in their presence: the health check rendered with each host's own
``probe_address``) in parallel with a short timeout, and counts only those that answer.

What is probed and when to stop is decided here; the probes are the only I/O.
"""

from __future__ import annotations

import time
import random
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Callable

from . import health
from .decisions import ServiceView, ready_queue, rollout_target
from .model import ServiceSpec

PEER_TIMEOUT = 0.5  # seconds per probe: a host that is up answers its check at once
MAX_PROBE_WORKERS = 64
PROBE_SLACK = 2  # probes beyond the answers still needed: one slow host does not stall


def verify_peers(spec: ServiceSpec | None) -> bool:
    """The spec asks for verified peers (its policy's ``verify_peers``)."""
    return spec is not None and spec.verify_peers


def probe_target(spec: ServiceSpec | None, cfg: Any, svc: str) -> str | None:
    """What this host publishes for others to probe: its http or tcp check rendered with
    ``[service:NAME] probe_address`` (else ``[agent] probe_address``); None without one,
    or for a check other hosts cannot run (cmd, none)."""
    if spec is None or spec.health.kind not in ("http", "tcp"):
        return None
    variables = dict(cfg.variables(svc))
    address = variables.get("probe_address") or cfg.extra.get("probe_address")
    if not address:
        return None
    variables["address"] = address
    try:
        probe = health.resolve(spec.health, health.Local(svc, variables, {}))
    except health.HealthError:
        return None
    if probe.kind == "http":
        return probe.url
    host, port = probe.address
    return f"tcp://{f'[{host}]' if ':' in host else host}:{port}"


def parse_probe(target: str, timeout: float = PEER_TIMEOUT) -> health.Probe:
    if target.startswith("http://"):
        return health.Probe("http", f"GET {target}", timeout, url=target)
    rest = target.removeprefix("tcp://")
    host, _, port = rest.rpartition(":")
    return health.Probe("tcp", f"connect {rest}", timeout, address=(host.strip("[]"), int(port)))


@dataclass(frozen=True)
class Verified:
    probes: int  # probes sent
    seconds: float  # added to the gate
    answered: tuple[str, ...]
    silent: tuple[str, ...]  # did not answer: not online, no slot
    unknown: tuple[str, ...]  # not waited for (enough had answered) or nothing to probe


def needed(view: ServiceView, host: str) -> tuple[int, set[str]]:
    """How many other hosts must answer (the quorum, when ``host`` is online), and which
    hosts must be heard in any case: the online ones ahead of ``host`` in the ready queue
    (each holds a ``max_parallel`` slot; a silent one gives it up)."""
    spec = view.spec
    quorum = spec.quorum if spec and host in view.current else 0
    target, _ = rollout_target(view)
    ahead: set[str] = set()
    if target is not None:
        hosts = [e.host for e in ready_queue(view, target)]
        if host in hosts:
            ahead = {h for h in hosts[:hosts.index(host)] if h in view.current}
    return quorum, ahead


def verify(view: ServiceView, host: str,
           run: Callable[[health.Probe], str | None] = health.run,
           timeout: float = PEER_TIMEOUT, slack: int = PROBE_SLACK) -> Verified:
    """Probe the other online hosts in parallel until ``quorum`` answered (counting those
    taken at their word: a presence without a probe address) and every online host ahead
    in the ready queue was heard. Probes go out as needed: the hosts ahead first, then
    as many others as answers are still missing plus ``slack``, one more for each that
    stays silent; a host never probed is ``unknown`` and keeps counting as online."""
    quorum, ahead = needed(view, host)
    others = {h: e.probe for h, e in view.current.items() if h != host}
    unprobed = sorted(h for h, p in others.items() if not p)
    targets = {h: p for h, p in others.items() if p}
    if not targets:
        return Verified(0, 0.0, (), (), tuple(unprobed))
    started = time.monotonic()
    rest = sorted(set(targets) - ahead)
    random.shuffle(rest)  # spread the probing over the fleet
    order = sorted(ahead & set(targets)) + rest
    pending_ahead = set(ahead) & set(targets)
    must_answer = max(0, quorum - len(unprobed))
    answered: list[str] = []
    silent: list[str] = []
    pool = ThreadPoolExecutor(max_workers=min(MAX_PROBE_WORKERS, len(targets)),
                              thread_name_prefix="peer-probe")
    running: dict[Future, str] = {}
    sent = 0
    try:
        while True:
            missing = max(0, must_answer - len(answered))
            if not missing and not pending_ahead:
                break
            want = missing + len(pending_ahead) + slack
            while len(running) < want and sent < len(order):
                name = order[sent]
                running[pool.submit(run, parse_probe(targets[name], timeout))] = name
                sent += 1
            if not running:
                break  # everyone probed: not enough answered
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                pending_ahead.discard(name)
                try:
                    problem = fut.result()
                except Exception as exc:  # noqa: BLE001 - a probe that raised did not answer
                    problem = str(exc)
                (silent if problem else answered).append(name)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    unknown = sorted(set(unprobed) | set(order[sent:]) | set(running.values()))
    return Verified(sent, time.monotonic() - started, tuple(sorted(answered)),
                    tuple(sorted(silent)), tuple(unknown))


def position(view: ServiceView, host: str) -> int | None:
    """``host``'s place in the ready queue for the rollout target (0: first)."""
    target, _ = rollout_target(view)
    hosts = [e.host for e in ready_queue(view, target)] if target else []
    return hosts.index(host) if host in hosts else None


def slot_held_by_online(view: ServiceView, host: str) -> bool:
    """``host`` waits only for its ready-queue position, and a host holding one of the
    slots ahead still has a presence (it has not taken itself down: if it is dead,
    probing it frees the slot). Only then does a refused host probe at all."""
    return bool(online_ahead(view, host))


def online_ahead(view: ServiceView, host: str) -> list[str]:
    """The hosts ahead of ``host`` in the ready queue that still have a presence, when
    ``host`` waits only for its position and is among the next ``max_parallel`` after the
    slots (position < 2 × max_parallel): those further back move up as the dead host's
    slot is used, so at most ``max_parallel`` hosts probe per cycle, not the whole queue."""
    spec = view.spec
    place = position(view, host)
    if spec is None or place is None or not spec.max_parallel <= place < 2 * spec.max_parallel:
        return []
    target, _ = rollout_target(view)
    ahead = [e.host for e in ready_queue(view, target)][:place]
    return [h for h in ahead if h in view.current]


def any_silent(view: ServiceView, hosts: list[str],
               run: Callable[[health.Probe], str | None] = health.run,
               timeout: float = PEER_TIMEOUT) -> bool:
    """A cheap look before the gate: does any of ``hosts`` (with a probe address) not
    answer? Probed in parallel; at most 2 × max_parallel hosts."""
    targets = [view.current[h].probe for h in hosts if h in view.current]
    targets = [t for t in targets if t]
    if not targets:
        return False
    with ThreadPoolExecutor(max_workers=min(MAX_PROBE_WORKERS, len(targets)),
                            thread_name_prefix="peer-probe") as pool:
        return any(problem is not None for problem in
                   pool.map(lambda t: run(parse_probe(t, timeout)), targets))


def without(view: ServiceView, silent: tuple[str, ...] | list[str]) -> ServiceView:
    """The view with silent hosts neither online nor in the ready queue."""
    if not silent:
        return view
    gone = set(silent)
    return replace(view, current={h: e for h, e in view.current.items() if h not in gone},
                   staging=[e for e in view.staging if e.host not in gone])
