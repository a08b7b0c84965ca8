"""Health checks: HTTP GET expecting 2xx, TCP connect, or a command exiting 0.

Targets may name host-local variables: ``http://127.0.0.1:{port}/health`` takes ``port``
from the agent's ``[service:NAME]`` section, so one spec in the store fits every host."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping

from .model import HealthCheck


class HealthError(Exception):
    pass


def render(target: str, variables: Mapping[str, str]) -> str:
    try:
        return target.format(**variables)
    except (KeyError, IndexError, ValueError) as exc:
        raise HealthError(f"health target {target!r} names {exc}, which this host does not "
                          f"define (set it in the agent's [service:...] section)") from None


def probe(check: HealthCheck, variables: Mapping[str, str]) -> str | None:
    """Run the check once; None when healthy, else the reason in words. Never raises for an
    unhealthy service (only :class:`HealthError` for a target that cannot be rendered)."""
    if check.kind == "none":
        return None
    target = render(check.target, variables)
    if check.kind == "http":
        try:
            with urllib.request.urlopen(target, timeout=check.timeout) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"GET {target}: HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"GET {target}: HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return f"GET {target}: {getattr(exc, 'reason', exc)}"
    if check.kind == "tcp":
        host, _, port = target.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=check.timeout):
                return None
        except (OSError, ValueError) as exc:
            return f"connect {target}: {exc}"
    if check.kind == "cmd":
        try:
            proc = subprocess.run(target, shell=True, timeout=check.timeout,
                                  capture_output=True)
        except subprocess.TimeoutExpired:
            return f"command {target!r} timed out after {check.timeout:g}s"
        return None if proc.returncode == 0 else \
            f"command {target!r} exited {proc.returncode}"
    return f"unknown health check kind {check.kind!r}"


def wait_healthy(check: HealthCheck, variables: Mapping[str, str], *, start_timeout: float,
                 healthy_secs: float, alive: Callable[[], str | None],
                 interval: float = 0.2) -> str | None:
    """Wait until the check passes, then hold it for ``healthy_secs``.

    ``alive()`` returns None while the process runs, else why not (it exited, FATAL...).
    Returns None when healthy for the whole hold, else the first reason it was not."""
    deadline = time.monotonic() + start_timeout
    last = "not checked yet"
    while True:
        dead = alive()
        if dead:
            return dead
        last = probe(check, variables) or ""
        if not last:
            break
        if time.monotonic() >= deadline:
            return f"not healthy after {start_timeout:g}s: {last}"
        time.sleep(interval)
    hold_until = time.monotonic() + healthy_secs
    while time.monotonic() < hold_until:
        time.sleep(min(interval, max(0.0, hold_until - time.monotonic())))
        dead = alive()
        if dead:
            return f"{dead} during the {healthy_secs:g}s healthy time"
        problem = probe(check, variables)
        if problem:
            return f"{problem} during the {healthy_secs:g}s healthy time"
    return None
