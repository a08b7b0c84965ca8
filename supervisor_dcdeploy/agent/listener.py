"""supervisord's event-listener protocol (stdout carries the protocol and nothing else)."""

from __future__ import annotations

from typing import Callable, TextIO


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
