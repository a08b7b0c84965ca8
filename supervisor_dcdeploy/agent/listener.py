"""supervisord's event-listener protocol (stdout carries the protocol and nothing else)."""

from __future__ import annotations

from typing import Callable, TextIO


# A program passing through one of these states is followed by another event (RUNNING,
# BACKOFF then FATAL, STOPPED, EXITED): a cycle woken by it would find the program in a
# transient state and leave it be (reconciler.TRANSIENT_STATES), so it would only spend
# CPU on the host's other services. Each switch passes through two of them.
PASSING_STATES = ("PROCESS_STATE_STARTING", "PROCESS_STATE_STOPPING",
                  "PROCESS_STATE_BACKOFF")


def wakes_the_cycle(eventname: str) -> bool:
    """Does this supervisord event call for a cycle now (a program settled in a state
    the agent acts on)? Other events wait for the next one, or the poll interval."""
    return eventname.startswith("PROCESS_STATE") and eventname not in PASSING_STATES


def parse_header(line: str) -> dict[str, str]:
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def listen(stdin: TextIO, stdout: TextIO, on_event: Callable[[str, str], None]) -> None:
    """Serve events until stdin closes. ``on_event`` must be quick: it runs between READY
    and RESULT, while supervisord buffers further events for us."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return
        headers = parse_header(line)
        payload = stdin.read(int(headers.get("len", "0")))
        try:
            on_event(headers.get("eventname", ""), payload)
        finally:
            stdout.write("RESULT 2\nOK")
            stdout.flush()
