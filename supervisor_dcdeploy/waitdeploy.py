"""``dcdeploy deploy --wait`` and ``dcdeploy wait``: block until queued deploy items end.

The decisions are pure functions of what ``ops.status`` returns plus the history records of
items that left the queue: :func:`item_outcome` (is this item still going, done, failed?),
:func:`overall` (what does the command exit with?) and :func:`progress_line` (one line per
item). :class:`Screen` turns successive frames into what is written: lines redrawn in place
on a terminal, and on anything else a plain line each time an item's line changes.

:func:`wait_items` is the I/O edge: one ``ops.status`` read per interval (one second by
default), plus one read of ``history/<item>`` for each awaited item that left the queue.

Exit codes: 0 every item done, 1 an item failed or was aborted (or vanished), 3 timeout,
130 interrupted (the deploy goes on: only the waiting stops)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TextIO

from .store import NoNode, Store, StoreError

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 3
EXIT_INTERRUPTED = 130

GOING = ("waiting", "rolling", "blocked", "paused")


@dataclass(frozen=True)
class ItemOutcome:
    """Where one awaited item stands. ``final`` is True once it will not change by itself
    (done, failed, aborted, gone); ``ok`` is True only for done."""

    item: str
    state: str
    final: bool
    ok: bool
    service: str = "?"
    version: str = "?"
    host: str | None = None
    reason: str | None = None


def item_node(name: str) -> str:
    """``7`` or ``item-0000000007`` -> ``item-0000000007`` (what ``deploy`` prints)."""
    return f"item-{int(name):010d}" if name.isdigit() else name


def item_outcome(item: str, queue: Sequence[Mapping[str, Any]],
                 record: Mapping[str, Any] | None) -> ItemOutcome:
    """The outcome of ``item`` given the queue as ``ops.status()["deploy"]`` shows it and,
    for an item no longer queued, its history record (None: not found in history).

    A failed item stays in the queue (an operator may resume it) but waiting ends: it is
    final and not ok. A paused or blocked item is still going: someone may resume it or
    the block may clear."""
    for entry in queue:
        if entry.get("item") != item:
            continue
        state = entry.get("state") or "?"
        common = dict(item=item, state=state, service=entry.get("service") or "?",
                      version=entry.get("version") or "?", host=entry.get("host"),
                      reason=entry.get("reason"))
        if state in GOING:
            return ItemOutcome(final=False, ok=False, **common)
        if state == "done":
            return ItemOutcome(final=True, ok=True, **common)
        return ItemOutcome(final=True, ok=False, **common)  # failed, or anything unknown
    if record is None:
        return ItemOutcome(item=item, state="gone", final=True, ok=False,
                           reason="not in the deploy queue nor in history")
    state = str(record.get("state") or "?")
    return ItemOutcome(item=item, state=state, final=True, ok=state == "done",
                       service=str(record.get("service") or "?"),
                       version=str(record.get("version") or "?"),
                       host=record.get("host"), reason=record.get("reason"))


@dataclass(frozen=True)
class Overall:
    """What the command ends with: ``code`` is None while waiting goes on."""

    code: int | None
    message: str


def why(o: ItemOutcome) -> str:
    """The reason, led by the host when one is recorded and the reason does not name it."""
    reason = o.reason or "no reason recorded"
    host = f"host {o.host}" if o.host else None
    return f"{host}: {reason}" if host and not reason.startswith(host) else reason


def failure_text(o: ItemOutcome) -> str:
    """One sentence naming the item, the host and the reason of a failure."""
    return f"{o.item} ({o.service} {o.version}) {o.state}: {why(o)}"


def overall(outcomes: Sequence[ItemOutcome]) -> Overall:
    """0 when every item is done; 1 as soon as one failed, was aborted or vanished (the
    first in queue order is named); None while any is still going."""
    for o in outcomes:
        if o.final and not o.ok:
            return Overall(EXIT_FAILED, failure_text(o))
    if all(o.ok for o in outcomes):
        return Overall(EXIT_DONE, f"{len(outcomes)} item(s) done: " + ", ".join(
            f"{o.service} {o.version}" for o in outcomes))
    return Overall(None, "waiting")


def host_progress(status: Mapping[str, Any], service: str, version: str) -> str:
    """``3/5 hosts on 2.1``: online hosts running ``version`` of all the hosts that run
    ``service`` (online or not: a host down mid-switch still counts), from ``ops.status()``."""
    svc = (status.get("services") or {}).get(service)
    if not svc:
        return ""
    versions = svc.get("versions") or {}
    total = max(sum(versions.values()),
                sum(1 for h in (status.get("hosts") or {}).values()
                    if service in (h.get("services") or {})))
    return f"{versions.get(version, 0)}/{total} hosts on {version}"


def progress_line(o: ItemOutcome, status: Mapping[str, Any]) -> str:
    """One line for one item: name, service, version, state, hosts on the version, reason
    (``status`` as ``ops.status()`` returns it)."""
    parts = [o.item, f"{o.service:<12}", f"{o.version:<10}", f"{o.state:<8}"]
    if not o.final or o.ok:
        hosts = host_progress(status, o.service, o.version)
        if hosts:
            parts.append(hosts)
    if o.final and not o.ok:
        parts.append(why(o))
    elif o.reason and o.state != "done":
        parts.append(f"({o.reason})")
    return "  ".join(p for p in parts if p).rstrip()


class Screen:
    """Writes frames (one line per item). On a terminal the previous frame is redrawn in
    place (cursor up, clear line); otherwise a line is printed only when it changed, so a
    CI log gets one line per change and no escape codes."""

    def __init__(self, out: TextIO, tty: bool, width: int = 0) -> None:
        self.out = out
        self.tty = tty
        self.width = width  # on a terminal, lines are cut to it: a wrapped line would
        self._last: list[str] = []  # throw off the count of lines to go back up

    def render(self, lines: Sequence[str]) -> str:
        """The text that shows ``lines`` after the previous frame (pure but for the
        remembered frame)."""
        if self.tty:
            if self.width > 1:
                lines = [line[: self.width - 1] for line in lines]
            up = f"\033[{len(self._last)}F" if self._last else ""
            text = up + "".join(f"\033[2K{line}\n" for line in lines)
        else:
            text = "".join(f"{line}\n" for i, line in enumerate(lines)
                           if i >= len(self._last) or self._last[i] != line)
        self._last = list(lines)
        return text

    def show(self, lines: Sequence[str]) -> None:
        text = self.render(lines)
        if text:
            self.out.write(text)
            self.out.flush()


def read_record(store: Store, item: str) -> dict[str, Any] | None:
    """``history/<item>`` as a dict, or None when absent or unreadable."""
    try:
        raw, _ = store.get(f"history/{item}")
    except NoNode:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def snapshot(store: Store, items: Sequence[str],
             status: Callable[[Store], dict[str, Any]]) -> tuple[list[ItemOutcome], dict]:
    """One read: the status, then history for the awaited items not in the queue. The
    queue is read first: an item leaves it and enters history in one transaction, so an
    item missing from this queue read is in history on the read that follows."""
    data = status(store)
    queued = {d.get("item") for d in data["deploy"]}
    outcomes = [item_outcome(i, data["deploy"], None if i in queued else read_record(store, i))
                for i in items]
    return outcomes, data


def wait_items(store: Store, items: Sequence[str], *, out: TextIO, err: TextIO, tty: bool,
               timeout: float | None, interval: float = 1.0,
               status: Callable[[Store], dict[str, Any]] | None = None,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> int:
    """Show progress until every item is done (0), one failed (1), or ``timeout`` seconds
    passed (3). A store error while waiting is shown and waiting goes on (the session
    reconnects by itself); Ctrl-C returns 130 and says the deploy goes on."""
    if status is None:
        from .ops import status as ops_status
        status = ops_status
    screen = Screen(out, tty, shutil.get_terminal_size().columns if tty else 0)
    deadline = None if timeout is None else clock() + timeout
    last: list[ItemOutcome] = []
    try:
        while True:
            try:
                outcomes, data = snapshot(store, items, status)
                last = outcomes
                screen.show([progress_line(o, data) for o in outcomes])
                result = overall(outcomes)
                if result.code is not None:
                    print(("dcdeploy: " if result.code else "") + result.message,
                          file=err if result.code else out)
                    return result.code
            except StoreError as exc:
                screen.show([f"store unavailable ({exc}); still waiting"])
            now = clock()
            if deadline is not None and now >= deadline:
                going = ", ".join(f"{o.item} ({o.service} {o.version}) {o.state}"
                                  for o in last if not o.final) or "?"
                print(f"dcdeploy: timed out after {timeout:g}s waiting for {going}; the "
                      "deploy goes on (dcdeploy status shows it)", file=err)
                return EXIT_TIMEOUT
            sleep(interval if deadline is None else max(0.0, min(interval, deadline - now)))
    except KeyboardInterrupt:
        print("\ndcdeploy: stopped waiting; the deploy goes on (dcdeploy status shows it, "
              "dcdeploy abort stops it)", file=err)
        return EXIT_INTERRUPTED
