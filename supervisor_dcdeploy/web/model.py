"""What the page shows, as plain JSON: a pure function of ``ops.status``, the history and
the samples the server has taken (no I/O; unit-tested on dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHART_SAMPLES = 2000  # ~ half an hour of changes at a few a second


@dataclass
class Timeline:
    """Hosts serving per service, sampled at each refresh that changed a count; and when
    this server first saw each deploy item, for durations (the store keeps no start time)."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    first_seen: dict[str, float] = field(default_factory=dict)

    def add(self, t: float, status: dict[str, Any]) -> None:
        serving = serving_counts(status)
        if not self.samples or self.samples[-1]["serving"] != serving:
            self.samples.append({"t": t, "serving": serving})
            del self.samples[:-CHART_SAMPLES]
        for item in status.get("deploy", []):
            self.first_seen.setdefault(item["item"], t)


def serving_counts(status: dict[str, Any]) -> dict[str, int]:
    return {svc: sum(1 for e in data["current"].values() if e.get("state") == "serving")
            for svc, data in sorted(status.get("services", {}).items())}


def cell_class(state: str | None, failed: bool) -> str:
    """serving / switching / down / failed: the grid's four colours."""
    if failed:
        return "failed"
    if state == "serving":
        return "serving"
    if state == "switching":
        return "switching"
    return "down"


def item_progress(status: dict[str, Any], item: dict[str, Any]) -> tuple[int, int]:
    """(hosts serving the item's version, hosts that run the service)."""
    svc = status.get("services", {}).get(item["service"])
    if svc is None:
        return 0, 0
    total = sum(1 for h in status.get("hosts", {}).values() if item["service"] in h["services"])
    done = sum(1 for e in svc["current"].values()
               if e.get("version") == item["version"] and e.get("state") == "serving")
    return done, max(total, len(svc["current"]))


def page(status: dict[str, Any], history: list[dict[str, Any]], timeline: Timeline,
         now: float) -> dict[str, Any]:
    services = sorted(status.get("services", {}))
    failed_at = {(i.get("host"), i["service"]) for i in status.get("deploy", [])
                 if i["state"] == "failed"}
    racks: dict[str, list[dict[str, Any]]] = {}
    for name, host in sorted(status.get("hosts", {}).items()):
        cells: dict[str, dict[str, Any] | None] = {}
        for svc in services:
            entry = host["services"].get(svc)
            if entry is None:
                cells[svc] = None  # this host does not run the service
                continue
            fetch = entry.get("fetch") or {}
            cells[svc] = {"version": entry.get("version"), "state": entry.get("state"),
                          "cls": cell_class(entry.get("state"), (name, svc) in failed_at),
                          "fetch": fetch.get("state"), "fetch_error": fetch.get("error")}
        racks.setdefault(host.get("rack") or "-", []).append(
            {"name": name, "online": host.get("online", False), "cells": cells})
    queue = []
    for item in status.get("deploy", []):
        done, total = item_progress(status, item)
        cls = {"failed": "failed", "blocked": "failed", "rolling": "switching",
               "paused": "paused"}.get(item["state"], "waiting")
        queue.append({**item, "done": done, "total": total, "cls": cls})
    finished = []
    for record in reversed(history):
        started = timeline.first_seen.get(record.get("item", ""))
        ended = record.get("updated")
        finished.append({"item": record.get("item"), "service": record.get("service", "?"),
                         "version": record.get("version", "?"), "state": record.get("state"),
                         "reason": record.get("reason"), "finished": ended,
                         "duration": (ended - started) if isinstance(ended, (int, float))
                         and started is not None and ended >= started else None})
    quorum = {svc: status["services"][svc].get("quorum") for svc in services}
    return {"t": now, "services": services,
            "racks": [{"rack": r, "hosts": hs} for r, hs in sorted(racks.items())],
            "queue": queue, "problems": list(status.get("problems", [])),
            "history": finished, "chart": {"samples": list(timeline.samples),
                                           "quorum": quorum}}
