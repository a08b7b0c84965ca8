"""The agent's status as values: what ``<root>/status.json``, ``/metrics`` and the host
registry show about this host.

Every type here is a frozen dataclass. A service's reconciler replaces its
:class:`ServiceStatus` with :func:`dataclasses.replace` (the only writer, on the agent's
thread); the fetch threads publish their own immutable values (:mod:`.fetching`); the
serializers (``status.json`` at the end of a cycle, the metrics server's thread at scrape
time) read whole values and never see one half-written.

``to_json`` leaves out fields that are ``None``: a field that was never set is absent from
``status.json``, as it always was (``supervisorctl dcdeploy status`` and the tests read
it with ``.get``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

_NAMES: dict[type, tuple[str, ...]] = {}  # field names per class (fields() is slow per call)


def _present(obj: Any) -> dict[str, Any]:
    """The dataclass's fields that are not None, by name."""
    names = _NAMES.get(type(obj))
    if names is None:
        names = _NAMES[type(obj)] = tuple(f.name for f in fields(obj))
    return {name: value for name in names if (value := getattr(obj, name)) is not None}


@dataclass(frozen=True)
class FetchProgress:
    """How far a download is (published by the fetch thread, read by anyone)."""

    via: str  # "http", "swarm" or "injected"
    done: int | None = None
    total: int | None = None
    swarm_error: str | None = None  # why the swarm download failed, when via fell to "http"

    def to_json(self) -> dict[str, Any]:
        return _present(self)


@dataclass(frozen=True)
class FetchStatus:
    """The staged release's download on this host (``services.<svc>.fetch``).

    ``state`` is downloading, installed, failed (the download) or error (what is installed
    under that version differs from the staged sha256); ``error``/``kind`` name the last failure
    (kept while a retry runs: ``dcdeploy status`` counts hosts that failed to verify).
    ``swarm_error``: the swarm download failed with it and this fetch went on from the
    release's URLs (``via`` is then "http"), whether that then succeeded or not."""

    version: str
    state: str
    via: str | None = None
    done: int | None = None
    total: int | None = None
    error: str | None = None
    kind: str | None = None  # "verify": the bytes are not a usable release; "fetch": other
    swarm_error: str | None = None

    def failed(self) -> bool:
        return bool(self.error) or self.state in ("failed", "error")

    def to_json(self) -> dict[str, Any]:
        return _present(self)


@dataclass(frozen=True)
class PreloadStatus:
    """What warming the release into the page cache achieved (``services.<svc>.preload``)."""

    bytes: int
    resident: int
    locked: int
    mlock_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "resident": self.resident, "locked": self.locked,
                "mlock_error": self.mlock_error}


@dataclass(frozen=True)
class VerifyPeersStatus:
    """The last gate's peer probes (``services.<svc>.verify_peers``, peers.py): probes sent,
    seconds they added, the hosts that did not answer, whether the verified view let this
    host pass, and its ready-queue position before and after the silent ones left it."""

    probes: int
    seconds: float
    silent: tuple[str, ...]
    passed: bool
    position: int | None
    verified_position: int | None

    def to_json(self) -> dict[str, Any]:
        return {"probes": self.probes, "seconds": self.seconds, "silent": list(self.silent),
                "passed": self.passed, "position": self.position,
                "verified_position": self.verified_position}


@dataclass(frozen=True)
class ServiceStatus:
    """One service on this host, as its reconciler last saw it. A field once set keeps its
    value until set again (``error`` is the last error, ``last_failure`` the last failed
    switch)."""

    store: str | None = None  # "connected", "suspended", "lost", "unreachable", ...
    program: str | None = None
    process: str | None = None  # supervisord's state of the program
    version: str | None = None  # the active release
    phase: str | None = None  # metrics.PHASES, or "stopping"
    reason: str | None = None  # the last decision's reason, in words
    error: str | None = None
    last_failure: str | None = None
    health_problem: str | None = None  # a check this host cannot run
    invalid: tuple[str, ...] | None = None  # problems found in the store's nodes
    refused: tuple[str, ...] | None = None  # operator data this host does not trust
    fetch: FetchStatus | None = None
    preload: PreloadStatus | None = None
    verify_peers: VerifyPeersStatus | None = None

    def to_json(self) -> dict[str, Any]:
        out = _present(self)
        for name in ("invalid", "refused"):
            if name in out:
                out[name] = list(out[name])
        for name in ("fetch", "preload", "verify_peers"):
            if name in out:
                out[name] = out[name].to_json()
        return out


@dataclass(frozen=True)
class HostStatus:
    """The whole of ``status.json``: one consistent snapshot, made at the end of a cycle."""

    host: str
    rack: str
    store: str  # the session's state, "unreachable" before the first session
    reads: int
    writes: int
    cycles: int  # cycles started (an idle cycle reads nothing from the store)
    cycle_errors: int  # exceptions that ended a cycle or a service's part of it
    trusted_keys: tuple[str, ...]
    insecure_unsigned: bool
    services: Mapping[str, ServiceStatus] = field(default_factory=dict)
    swarm: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "host": self.host, "rack": self.rack, "store": self.store,
            "store_ops": {"reads": self.reads, "writes": self.writes},
            "cycles": self.cycles, "cycle_errors": self.cycle_errors,
            "trust": {"keys": list(self.trusted_keys),
                      "insecure_unsigned": self.insecure_unsigned},
            "services": {svc: s.to_json() for svc, s in self.services.items()}}
        if self.swarm is not None:
            out["swarm"] = dict(self.swarm)
        return out


__all__ = ["FetchProgress", "FetchStatus", "HostStatus", "PreloadStatus",
           "ServiceStatus", "VerifyPeersStatus"]
