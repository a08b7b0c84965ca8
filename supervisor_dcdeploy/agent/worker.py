"""The agent's worker: the loop that runs one reconcile cycle per wake-up (docs/design.md §4).

The worker is glue: it keeps the store session (connect, session events, access checks,
following the store through the coordinator), reads the deploy queue once per cycle, and
calls each service's :class:`~.reconciler.ServiceReconciler`, which decides (through the
pure functions in :mod:`..decisions`) and acts. Downloads run in the background under the
:class:`~.fetching.FetchManager`. At the end of a cycle the worker publishes what this host
does: ``/dc/hosts/<host>`` (failed downloads, refused data) and ``status.json``, an
immutable :class:`~.status.HostStatus`.

A cycle survives anything a service's step raises: the error is reported in that service's
status and counted; the other services still get their step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from .. import health, trust
from ..coord import Coordinator, RereadCoordinator, coordinator_for
from ..files import atomic_write
from ..localstate import STATUS_FILE, LocalState
from ..metrics import AgentMetrics
from ..model import MAX_HOST_PARALLEL, DeployItem, HostInfo, dumps
from ..store import (
    NoNode,
    SessionState,
    Store,
    StoreError,
    StoreUnauthorized,
    StoreUnavailable,
    layout,
    open_store,
)
from ..supervisorctl_client import Supervisor, SupervisorError, SupervisorShuttingDown
from .access import access_check_due, events_prove_access
from .config import AgentConfig
from .distribution import Distribution
from .fetching import FetchManager
from .reconciler import HostContext, ServiceReconciler
from .status import HostStatus
from .switches import SwitchRunner

RECONNECT_SECS = 3.0  # between attempts to open the store session while it is unreachable
PRUNE_SECS = 60.0  # the download cache is listed at least this often (see _prune_cache)


class Agent:
    def __init__(self, cfg: AgentConfig, store: Store | None = None,
                 supervisor: Supervisor | None = None,
                 fetch: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.host = cfg.host
        self.log = structlog.get_logger("dcdeploy.agent").bind(host=cfg.host)
        self.store = store or open_store(cfg.store, cfg.session_timeout)
        self.sup = supervisor or Supervisor(cfg.supervisor_url)
        self.local = LocalState(cfg.root)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.session = SessionState.LOST
        self._started = False
        self._last_connect = 0.0
        self._prepared = False
        self._published: tuple[dict[str, Any], tuple[str, ...]] | None = None
        self._denied = False  # this cycle, the store refused our credentials
        self._was_denied = False  # a cycle before this one was refused
        self._access_checked_at: float | None = None  # time.monotonic() of the last pass
        self._access_check_secs = float(cfg.extra.get("store_check_secs") or 60.0)
        self._events_prove_access = events_prove_access(cfg.extra)
        self._wake_at: float | None = None  # time.time() of an earlier wake-up (soak end)
        self.dist = Distribution(cfg, self.store) if Distribution.enabled(cfg) else None
        self.fetches = FetchManager(cfg, self.dist, self._wake, self.log, fetch)
        # In status.json, so tests and bench/fuzz_store.py count without reading logs:
        # cycles started (the status a cycle writes, at its end or when it raised, carries
        # its own number; a cycle reads nothing from the store when idle), and exceptions
        # that ended a cycle or a service's part of it.
        self.cycles = 0
        self.cycle_errors = 0
        self._status_written = b""
        self._pruned_keep: set[str] | None = None
        self._pruned_at = 0.0
        self.reconcilers: dict[str, ServiceReconciler] = {}  # below; the metrics read it
        self.metrics = AgentMetrics(self)  # served only when agent.conf has metrics_listen
        if self.local.problem:
            self.log.warning("state.rebuilt", problem=self.local.problem)
        # Operator data is acted on only when signed by a pinned key (trust.py); the
        # highest counter accepted per kind/service survives restarts (trust.json).
        self.counters = trust.CounterLog(cfg.root)
        if self.counters.problem:
            self.log.warning("trust.counters_rebuilt", problem=self.counters.problem)
        # Switches run beside the cycle, up to host_parallel at once (docs/policy.md); each
        # thread gets its own supervisord client (an injected stand-in is shared).
        self.switches = SwitchRunner(
            min(len(cfg.services), MAX_HOST_PARALLEL),
            None if supervisor is not None else (lambda: Supervisor(self.sup.url)), self._wake)
        # What this host knows of the store: a mirror followed by watches where the backend
        # can (ZooKeeper), else re-read each cycle (coord.py).
        self.ctx = HostContext(
            cfg=cfg, log=self.log, sup=self.sup, local=self.local, counters=self.counters,
            metrics=self.metrics, fetches=self.fetches, dist=self.dist,
            coord=coordinator_for(self.store, cfg.host, sorted(cfg.services), self._wake),
            wake=self._wake, connected=lambda: self.session is SessionState.CONNECTED,
            wake_by=self._wake_by, switches=self.switches)
        self.reconcilers = {svc: ServiceReconciler(svc, self.ctx) for svc in cfg.services}

    @property
    def coord(self) -> Coordinator:
        return self.ctx.coord

    @property
    def status(self) -> Mapping[str, Mapping[str, Any]]:
        """{service: its status as in status.json}, from the reconcilers' current values
        (for the metrics' scrape thread and tests)."""
        return {svc: r.snapshot().to_json() for svc, r in self.reconcilers.items()}

    @property
    def fetch_progress(self) -> Mapping[str, Mapping[str, Any]]:
        """{service: how far its download is}, as the fetch threads last published it."""
        return self.fetches.progress_json()

    # -- lifecycle --------------------------------------------------------------------
    def on_session(self, state: SessionState) -> None:
        """kazoo's thread: never block here."""
        self.session = state
        self.coord.on_session(state)
        if state is not SessionState.CONNECTED:
            self._prepared = False
            self.wake.set()

    def _wake(self) -> None:
        self.wake.set()

    def _wake_by(self, when: float) -> None:
        """Run the next cycle no later than ``when`` (time.time()): a canary's soak end."""
        self._wake_at = when if self._wake_at is None else min(self._wake_at, when)

    def connect(self, timeout: float) -> bool:
        """Try to open the store session; False (and keep serving) when it cannot."""
        if self._started:
            return self.session is SessionState.CONNECTED
        self._last_connect = time.monotonic()
        try:
            self.store.start(timeout=timeout)
        except StoreUnavailable as exc:
            self.log.warning("store.unreachable", error=str(exc))
            return False
        self._started = True
        self.store.add_listener(self.on_session)
        self.session = SessionState.CONNECTED
        self.log.info("store.connected", store=self.cfg.store)
        return True

    def run(self) -> None:
        self.log.info("agent.start", services=sorted(self.cfg.services),
                      swarm=self.dist is not None)
        if self.dist is not None:
            try:
                self.dist.start()
            except OSError as exc:  # the tracker's port: downloads fall back to URLs
                self.log.error("swarm.tracker_failed", error=str(exc))
        if self.cfg.extra.get("metrics_listen"):
            try:
                bound = self.metrics.serve(self.cfg.extra["metrics_listen"])
                self.log.info("metrics.serving", address=f"{bound[0]}:{bound[1]}")
            except (OSError, ValueError) as exc:  # no metrics is no reason to stop deploying
                self.log.error("metrics.failed", error=str(exc))
        self.connect(timeout=1.0)  # with the store down, local state decides at once (L3)
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                self.cycle()
            except Exception:  # the loop must survive anything: services depend on it
                self.log.exception("cycle.crashed")
                self.cycle_errors += 1
                try:
                    self.write_status()
                except Exception:  # noqa: BLE001 - reported above; keep looping
                    pass
            timeout = self.cfg.poll_interval if self._started else 1.0
            if self._wake_at is not None:
                timeout = max(0.0, min(timeout, self._wake_at - time.time()))
                self._wake_at = None
            self.wake.wait(timeout)
        self.shutdown()

    def shutdown(self) -> None:
        self.switches.shutdown()  # a switch in progress finishes or rolls back first
        self.fetches.shutdown()
        self.metrics.stop()
        if self.dist is not None:
            self.dist.stop()
        if self._started:
            try:
                self.store.stop()
            except StoreError:
                pass
        self.log.info("agent.stop")

    # -- one cycle --------------------------------------------------------------------
    def cycle(self) -> None:
        self.cycles += 1
        if not self._started and time.monotonic() - self._last_connect > RECONNECT_SECS:
            self.connect(timeout=1.0)
        online = self._started and self.session is SessionState.CONNECTED
        queue: list[DeployItem] | None = None
        queue_invalid: list[str] = []
        self._denied = False
        if online:
            try:
                self._prepare()
                self._check_access()
                self._follow()  # only what changed since the last cycle
                queue, queue_invalid = self.coord.queue()
            except StoreUnavailable as exc:
                self.log.warning("store.unavailable", error=str(exc))
                online = False
            except StoreUnauthorized as exc:  # wrong or revoked credentials: serve on, as offline
                self.log.error("store.not_authorized", error=str(exc))
                self._denied, online = True, False
                self._was_denied = True
        self.ctx.states = self._program_states()
        for svc, reconciler in self.reconcilers.items():
            try:
                reconciler.reconcile(queue if online else None, queue_invalid,
                                     self._store_state())
            except StoreUnavailable as exc:
                self.log.warning("store.unavailable", svc=svc, error=str(exc))
                reconciler.set(store="unavailable")
            except SupervisorShuttingDown:
                # A normal `supervisorctl shutdown`: supervisord stops its programs, then us.
                # Nothing to fix and nothing to start: stop the loop (the session closes and
                # the host's presence goes with it).
                self.log.info("supervisord.shutting_down", svc=svc)
                for other in self.reconcilers.values():
                    other.set(phase="stopping", reason="supervisord is shutting down")
                self.stopping.set()
                break
            except (StoreError, SupervisorError, OSError, health.HealthError) as exc:
                self.log.error("cycle.error", svc=svc, error=str(exc), kind=type(exc).__name__)
                reconciler.set(error=str(exc))
                self.cycle_errors += 1
            except Exception:  # a bug must not take the host's services down with it
                self.log.exception("cycle.bug", svc=svc)
                self.cycle_errors += 1
        if online and self.session is SessionState.CONNECTED:
            try:
                self.publish_host()
            except StoreError as exc:
                self.log.warning("host.publish_failed", error=str(exc))
        if queue is not None:
            self._prune_cache()
        if self.dist is not None and queue is not None:
            views = {svc: r.view for svc, r in self.reconcilers.items() if r.view is not None}
            try:
                self.dist.maintain({s: v.staged for s, v in views.items()},
                                   {s: v.released for s, v in views.items()},
                                   deploying=bool(queue))
            except Exception as exc:  # noqa: BLE001 - seeding upkeep must not stop the cycle
                self.log.warning("swarm.maintain_failed", error=str(exc))
        self.write_status()

    def _program_states(self) -> dict[str, str] | None:
        """Every program's state in one XML-RPC call, for this cycle's services: one call
        a cycle instead of one per service (bench/waves.py: the agents' cycles during a
        deploy were most of supervisord's CPU). None when the call fails (each service
        then asks for its own program and reports what went wrong) or the client has no
        such call (a test's stand-in)."""
        states = getattr(self.sup, "states", None)
        if states is None:
            return None
        try:
            return states()
        except SupervisorError:
            return None

    def _store_state(self) -> str:
        """The store as a service's status shows it when the cycle cannot use it."""
        if self._denied:
            return "not authorized"
        return self.session.value if self._started else "unreachable"

    def _check_access(self) -> None:
        """One read the store checks against our rights once ``store_check_secs`` have
        passed without another proof of access (agent/access.py: a request the store
        accepted, or a notification where the server filters them by read right), and
        each cycle while refused: a revoked host notices, and a readmitted one rebuilds
        what it follows (events may have been missed meanwhile)."""
        now = time.monotonic()
        due, _reason = access_check_due(
            now, self._access_check_secs, checked_at=self._access_checked_at,
            accepted_at=self.store.accepted_at, notified_at=self.store.notified_at,
            events_prove=self._events_prove_access, refused=self._was_denied)
        if not due:
            return
        self.coord.check_access()
        self._access_checked_at = now
        if self._was_denied:
            self._was_denied = False
            self.coord.reload()

    def _follow(self) -> None:
        try:
            self.coord.follow()
        except (StoreUnavailable, StoreUnauthorized):
            raise
        except StoreError as exc:  # e.g. a server without persistent watches (< 3.6)
            self.log.error("store.follow_failed", error=str(exc),
                           action="reading the whole view each cycle instead")
            self.ctx.coord = RereadCoordinator(self.store, self.host,
                                               sorted(self.cfg.services), self._wake)
            self.coord.follow()

    def _prune_cache(self) -> None:
        """Drop cached artifacts no longer needed: keep only those being fetched and those
        staged but not installed yet (an installed release needs no archive)."""
        from ..fetch import installed_sha256, prune_cache
        if any(r.view is None for r in self.reconcilers.values()):
            return  # not every staged release known yet
        keep = self.fetches.shas()
        for r in self.reconcilers.values():
            staged = r.view.staged if r.view is not None else None
            if staged is not None and \
                    installed_sha256(r.rd.path(staged.version)) != staged.sha256:
                keep.add(staged.sha256)
        # Artifacts come only from fetches (kept while they run), so with the same set to
        # keep as at the last pruning there is nothing new to drop: list the directory
        # again only when the set changed, or after PRUNE_SECS anyway.
        now = time.monotonic()
        if keep == self._pruned_keep and now - self._pruned_at < PRUNE_SECS:
            return
        try:
            prune_cache(self.cfg.root / ".cache", keep)
        except OSError as exc:
            self.log.warning("cache.prune_failed", error=str(exc))
            return
        self._pruned_keep, self._pruned_at = keep, now

    def _prepare(self) -> None:
        """Once per session: parents for our nodes, and the host registry entry."""
        if self._prepared:
            return
        paths = list(layout.TOP_LEVEL)
        paths += [f"{base}/{svc}" for svc in self.cfg.services for base in layout.PER_SERVICE]
        for path in paths:
            try:
                self.store.ensure(path)
            # Under ACLs the operator makes these (init, service set).
            except StoreUnauthorized as exc:
                self.log.warning("store.not_authorized", path=path, error=str(exc))
        self._prepared = True
        self._published = None
        try:
            self.publish_host()
        except StoreUnauthorized as exc:  # not registered by `dcdeploy init`: report, keep going
            self.log.warning("host.publish_failed", error=str(exc))

    def publish_host(self) -> None:
        """``/dc/hosts/<host>``: rack, services and each failed download (also while it is
        retried: its last error), written on transitions only, so ``dcdeploy status`` shows
        failed downloads. A download in progress or done without an error is not published:
        two writes per host and release (status.json on the host shows it)."""
        fetch = {svc: r.published_fetch() for svc, r in self.reconcilers.items()}
        refused = tuple(sorted({x for r in self.reconcilers.values() for x in r.refused}))
        if (fetch, refused) == self._published:
            return
        info = HostInfo(self.host, self.cfg.rack, tuple(sorted(self.cfg.services)),
                        time.time(), fetch, refused).to_json()
        try:
            self.store.set(layout.host(self.host), info)
        except NoNode:
            self.store.create(layout.host(self.host), info)
        self._published = (fetch, refused)

    # -- status -----------------------------------------------------------------------
    def host_status(self) -> HostStatus:
        """This host's status now, as one immutable value."""
        ops = self.store.ops
        return HostStatus(
            host=self.host, rack=self.cfg.rack,
            store=self.session.value if self._started else "unreachable",
            reads=ops.reads, writes=ops.writes, cycles=self.cycles,
            cycle_errors=self.cycle_errors,
            trusted_keys=tuple(sorted(self.cfg.trust_policy.keys)),
            insecure_unsigned=self.cfg.trust_policy.insecure_unsigned,
            services={svc: r.snapshot() for svc, r in self.reconcilers.items()},
            swarm=self.dist.status() if self.dist is not None else None)

    def write_status(self) -> None:
        """``<root>/status.json``: what ``supervisorctl dcdeploy status`` shows."""
        for svc, r in self.reconcilers.items():
            r.set(version=self.local.get(svc).active)
        data = dumps(self.host_status().to_json())
        if data != self._status_written:
            try:
                # Rewritten every cycle (its cycle counter): no fsync, it is a report.
                atomic_write(self.cfg.root / STATUS_FILE, data, durable=False)
                self._status_written = data
            except OSError as exc:
                self.log.error("status.write_failed", error=str(exc))
