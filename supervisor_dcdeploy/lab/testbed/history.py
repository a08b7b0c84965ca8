"""The recorded history of a testbed run: JSON lines, one event per line.

Every event is a JSON object with a monotonic time ``t`` (seconds, same clock for every
writer of one history) and a ``kind``. The kinds and their fields:

``topology``  {hosts: {host: {rack, address, services: {svc: port}}}, session_timeout,
              services: {svc: {quorum, depends_on: [svc]}}, initial: {svc: version},
              present: {svc: [version]}, installed: {svc: [version]}} (the majority
              version, every version served, and every version a host could start from
              its disk: its local state's active and previous, and its release
              directories, when recording began)
              written once, first.
``probe``     {host, service, ok, version, healthy, dt}: one sample of ``GET /`` on the
              host's service endpoint, begun at ``t`` and taking ``dt`` seconds. ``ok`` is
              True (200 with a JSON body), False (connection refused or reset, or a
              non-200 answer) or None (a timeout or no route); the checker counts both
              False and None as "not serving". ``healthy`` is the ``GET /health`` answer
              when it was sampled, else None.
``store``     {path, data, zversion, mzxid}: the store node ``path`` (relative to the root,
              e.g. ``gate/api``) was seen holding ``data`` (text, possibly garbage) at node
              version ``zversion``; ``data`` None means the node was seen deleted.
``fault``     {fault, phase: start|end, id, hosts: [host], effects: [effect], detail: {}}.
              The end event's detail carries ``took_effect`` (bool) and ``evidence`` (what
              showed it: the pid gone, the process state, dropped-packet counters, the new
              leader...), ``crashed_at`` ([t]) when the fault crashed the host's services,
              and ``mid_switch``/``landed_mid_switch`` for a fault timed into a switch.
              Effects: ``process`` (the host's processes were disturbed), ``unobservable``
              (the prober cannot reach the host), ``store_cut`` (the host cannot reach the
              store), ``reboot`` (the host was restarted during the fault), ``store``
              (store-side), ``network``, ``disk``, ``garbage`` (detail.path was overwritten).
``op``        {action, ...}: an operator action (``service_set``, ``stage``, ``deploy``,
              ``resume``, ``abort``, ``pause``) with its arguments.
``artifact``  {service, version, sha256, broken}: the true digest of the bytes served at the
              release URL (a corrupt-artifact scenario publishes bytes whose digest differs
              from the staged one).
``state``     {host, ok, data | error, fault}: a snapshot of the host's local
              ``state.json``; ``fault`` names the kill it was taken after, if any.
``recorder``  {status: connected | disconnected}: the store watcher's own session.
``final``     {settled, converged}: the end of the run; ``settled`` says every fault was
              healed and the testbed waited for convergence, so liveness properties apply.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

KINDS = ("topology", "probe", "store", "fault", "op", "artifact", "state", "recorder", "final")


class HistoryWriter:
    """Append events to a JSON-lines file from many threads.

    ``emit`` stamps ``t`` (``time.monotonic()`` unless given) and writes one line, flushed,
    under a lock; it never raises for a closed writer (late prober threads are ignored).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fh: TextIO | None = open(path, "a", encoding="utf-8") if path else None
        self.events: list[dict[str, Any]] = []  # kept in memory too, for the checker

    def emit(self, kind: str, t: float | None = None, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"unknown history event kind {kind!r} (one of {KINDS})")
        event = {"t": time.monotonic() if t is None else t, "kind": kind, **fields}
        line = json.dumps(event, sort_keys=True, default=str)
        with self._lock:
            self.events.append(event)
            if self._fh is not None:
                self._fh.write(line + "\n")
                self._fh.flush()
        return event

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def load(path: Path) -> list[dict[str, Any]]:
    """Read a history file; a truncated last line (writer killed mid-write) is dropped."""
    return list(parse_lines(Path(path).read_text(encoding="utf-8").splitlines()))


def parse_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "t" in event and "kind" in event:
            yield event


def dump(events: Iterable[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event, sort_keys=True, default=str) + "\n")
