"""Health checks resolved against host-local config: HTTP GET expecting 2xx, TCP connect, or
a command from the host's own ``agent.conf`` exiting 0.

The store only says *which* check a service uses (:class:`~.model.HealthCheck`); every host
turns that into something it can run (:func:`resolve`) from what its root-owned
``agent.conf`` says: the address and port from ``[service:NAME]``, a command's argv from
``[check:NAME]``. Nothing from the store reaches a shell, a command line or a host name, so
a store writer can at worst pick one of the checks a host already defines (docs/protocol.md,
"Health checks")."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping

from .model import HealthCheck

DEFAULT_ADDRESS = "127.0.0.1"
# Each argv element may name a variable of the service's [service:NAME] section; the
# value replaces it inside that one element (no shell, no word splitting).
VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Said of a check's output in a failure reason: enough to tell why, not a log.
OUTPUT_CHARS = 200
# A local command runs with this environment only (not the agent's): a health check does
# not need the agent's credentials or store URL.
CHECK_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8"}


class HealthError(Exception):
    """A check that this host cannot run: it names a local check or variable this host's
    ``agent.conf`` does not define, or a port variable that is not a port."""


@dataclass(frozen=True)
class LocalCheck:
    """``[check:NAME]`` of ``agent.conf``: a command as an argv list, run without a shell."""

    name: str
    argv: tuple[str, ...]
    timeout: float | None = None  # None: the spec's timeout


@dataclass(frozen=True)
class Local:
    """What one host knows about one service's checks: the ``[service:NAME]`` variables
    (plus ``host`` and ``rack``) and the host's ``[check:NAME]`` sections."""

    service: str
    variables: Mapping[str, str] = field(default_factory=dict)
    checks: Mapping[str, LocalCheck] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """A check resolved on this host; ``what`` says it in words for failure reasons."""

    kind: str  # http | tcp | cmd | none
    what: str
    timeout: float
    url: str = ""
    address: tuple[str, int] = ("", 0)
    argv: tuple[str, ...] = ()


def _port(check: HealthCheck, local: Local) -> int:
    if isinstance(check.port, int):
        return check.port
    raw = local.variables.get(check.port)
    if raw is None:
        raise HealthError(f"the health check of {local.service} takes its port from "
                          f"{check.port!r}, which [service:{local.service}] of this host's "
                          f"agent.conf does not set")
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise HealthError(f"[service:{local.service}] {check.port} = {raw!r} is not a port "
                          "number (the health check of this service takes its port from it)")
    return port


def _address(local: Local) -> str:
    address = local.variables.get("address") or DEFAULT_ADDRESS
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]"
    except ValueError:
        pass  # a host name from local config
    return address


def resolve(check: HealthCheck, local: Local) -> Probe:
    """Turn the store's check into one this host runs; raises :class:`HealthError` when the
    host's config lacks what the check names (never runs anything)."""
    if check.kind == "none":
        return Probe("none", "no health check", check.timeout)
    if check.kind == "http":
        url = f"http://{_address(local)}:{_port(check, local)}{check.path}"
        return Probe("http", f"GET {url}", check.timeout, url=url)
    if check.kind == "tcp":
        address = _address(local)
        port = _port(check, local)
        return Probe("tcp", f"connect {address}:{port}", check.timeout,
                     address=(address.strip("[]"), port))
    if check.kind == "cmd":
        defined = local.checks.get(check.check)
        if defined is None:
            have = ", ".join(sorted(local.checks)) or "none"
            raise HealthError(f"the health check of {local.service} is the local check "
                              f"{check.check!r}, which this host's agent.conf does not define "
                              f"(add a [check:{check.check}] section with argv = ...; "
                              f"defined here: {have})")
        argv = tuple(_render(defined, element, local) for element in defined.argv)
        timeout = defined.timeout if defined.timeout is not None else check.timeout
        return Probe("cmd", f"check {check.check!r} ({argv[0]})", timeout, argv=argv)
    raise HealthError(f"unknown health check kind {check.kind!r}")


def _render(defined: LocalCheck, element: str, local: Local) -> str:
    def value(found: re.Match) -> str:
        name = found[1]
        if name not in local.variables:
            raise HealthError(f"[check:{defined.name}] argv names {{{name}}}, which "
                              f"[service:{local.service}] of this host's agent.conf does not "
                              "set")
        return local.variables[name]
    return VAR_RE.sub(value, element)


def run(probe: Probe) -> str | None:
    """Run a resolved check once; None when healthy, else the reason in words. Never raises."""
    if probe.kind == "none":
        return None
    if probe.kind == "http":
        try:
            with urllib.request.urlopen(probe.url, timeout=probe.timeout) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"{probe.what}: HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            return f"{probe.what}: HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return f"{probe.what}: {getattr(exc, 'reason', exc)}"
    if probe.kind == "tcp":
        try:
            with socket.create_connection(probe.address, timeout=probe.timeout):
                return None
        except (OSError, ValueError) as exc:
            return f"{probe.what}: {exc}"
    if probe.kind == "cmd":
        try:
            proc = subprocess.run(list(probe.argv), shell=False, timeout=probe.timeout,
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  env=CHECK_ENV, cwd="/", check=False)
        except subprocess.TimeoutExpired:
            return f"{probe.what} timed out after {probe.timeout:g}s"
        except OSError as exc:
            return f"{probe.what} could not run: {exc.strerror or exc}"
        if proc.returncode == 0:
            return None
        said = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
        return f"{probe.what} exited {proc.returncode}" + \
            (f": {said[:OUTPUT_CHARS]}" if said else "")
    return f"unknown health check kind {probe.kind!r}"


def problem(check: HealthCheck, local: Local) -> str | None:
    """Why this host cannot run ``check`` (see :func:`resolve`), or None when it can."""
    try:
        resolve(check, local)
    except HealthError as exc:
        return str(exc)
    return None


def probe(check: HealthCheck, local: Local) -> str | None:
    """Resolve and run the check once; None when healthy, else the reason in words (a
    check this host cannot resolve is a reason too). Never raises."""
    try:
        return run(resolve(check, local))
    except HealthError as exc:
        return str(exc)


def wait_healthy(check: HealthCheck, local: Local, *, start_timeout: float,
                 healthy_secs: float, alive: Callable[[], str | None],
                 interval: float = 0.2) -> str | None:
    """Wait until the check passes, then hold it for ``healthy_secs``.

    ``alive()`` returns None while the process runs, else why not (it exited, FATAL...).
    Returns None when healthy for the whole hold, else the first reason it was not; a check
    this host cannot resolve is returned at once (waiting would not change it)."""
    try:
        resolved = resolve(check, local)
    except HealthError as exc:
        return str(exc)
    deadline = time.monotonic() + start_timeout
    last = "not checked yet"
    while True:
        dead = alive()
        if dead:
            return dead
        last = run(resolved) or ""
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
        failed = run(resolved)
        if failed:
            return f"{failed} during the {healthy_secs:g}s healthy time"
    return None
