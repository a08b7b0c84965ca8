"""The agent's worker: one reconcile cycle per wake-up, per service (docs/design.md §4).

Each cycle reads a snapshot, asks the pure functions in :mod:`..decisions` what to do, and
does it. The store is the only shared truth; supervisord and the release directories are
this host's. Rules kept here, in one place:

* store not CONNECTED (suspended, lost, down): nothing destructive starts; a service that is
  not running is started from local state (L3); running services are left alone.
* a take-down happens only through the gate transaction, after ``sync()`` and a fresh read.
* a switch that started is always finished or rolled back locally, store or no store.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, NamedTuple

import structlog

from .. import decisions, health, trust
from ..coord import RereadCoordinator, coordinator_for
from ..localstate import STATUS_FILE, LocalState, ReleaseDir, atomic_write
from ..metrics import AgentMetrics
from ..model import DeployItem, HostInfo, InvalidData, ServiceSpec, dumps
from ..store import (NoNode, SessionState, Store, StoreError, StoreUnauthorized,
                     StoreUnavailable, TransactionFailed, layout, open_store)
from ..supervisorctl_client import Supervisor, SupervisorError, SupervisorShuttingDown
from .config import AgentConfig
from .distribution import Distribution, fetch_transport

RUNNING_STATES = ("RUNNING",)
TRANSIENT_STATES = ("STARTING", "STOPPING", "BACKOFF")
FETCH_RETRY_SECS = 10.0
RECOVER_RETRY_SECS = 5.0
RECONNECT_SECS = 3.0  # between attempts to open the store session while it is unreachable
# Completing an item needs every presence's version; the host that switched last reads
# them. Others do only when the item is still open this long after the queue emptied (the
# last switcher died mid-switch): short enough that a dead host does not hold the deploy
# (L2 is judged 20 s after every reachable host runs the target), long enough that a
# normal last switch (start + healthy_secs) ends first and nobody else reads.
COMPLETE_FALLBACK_SECS = 10.0


class FetchFailure(NamedTuple):
    """The last failed download of a service's staged release: paces retries, reports it."""

    sha256: str
    when: float  # time.monotonic()
    reason: str  # in full, for status.json
    public: str  # for the store: no digest or size learnt from the fetched bytes
    permanent: bool  # verified bytes that are an unsafe archive: never retried for this sha
    kind: str  # "verify": the bytes are not a usable release; "fetch": network, disk...


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
        self.dirs = {svc: ReleaseDir(cfg.root, svc) for svc in cfg.services}
        self._fetch = fetch
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.session = SessionState.LOST
        self._started = False
        self._last_connect = 0.0
        self._prepared = False
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch")
        self._fetches: dict[str, tuple[str, Future]] = {}
        self._fetch_progress: dict[str, dict[str, Any]] = {}
        self._fetch_failed: dict[str, FetchFailure] = {}
        self._recover_after: dict[str, float] = {}
        self._switched: set[str] = set()  # services this host just switched: completes them
        self._queue_empty_since: dict[str, float] = {}
        self._pending_fail: dict[str, tuple[str, str]] = {}  # svc -> (item node, reason)
        self._staged_version: dict[str, str] = {}
        self._published: tuple[dict[str, Any], tuple[str, ...]] | None = None
        self._denied = False  # this cycle, the store refused our credentials
        self._was_denied = False  # a cycle before this one was refused
        self._next_access_check = 0.0
        self._access_check_secs = float(cfg.extra.get("store_check_secs") or 60.0)
        self._views: dict[str, decisions.ServiceView] = {}
        self.dist = Distribution(cfg, self.store) if Distribution.enabled(cfg) else None
        # What this host knows of the store: a mirror followed by watches where the backend
        # can (ZooKeeper), else re-read each cycle (coord.py).
        self.coord = coordinator_for(self.store, cfg.host, sorted(cfg.services), self._wake)
        self.status: dict[str, dict[str, Any]] = {svc: {} for svc in cfg.services}
        # In status.json, so tests and bench/fuzz_store.py count without reading logs:
        # cycles started (the status a cycle writes, at its end or when it raised, carries
        # its own number), and exceptions that ended a cycle or a service's part of it.
        self.cycles = 0
        self.cycle_errors = 0
        self._status_written = b""
        self.cycles = 0  # in status.json: a cycle reads nothing from the store when idle
        self.metrics = AgentMetrics(self)  # served only when agent.conf has metrics_listen
        if self.local.problem:
            self.log.warning("state.rebuilt", problem=self.local.problem)
        # Operator data is acted on only when signed by a pinned key (trust.py); the
        # highest counter accepted per kind/service survives restarts (trust.json).
        self.counters = trust.CounterLog(cfg.root)
        self._refused: dict[str, list[str]] = {svc: [] for svc in cfg.services}
        if self.counters.problem:
            self.log.warning("trust.counters_rebuilt", problem=self.counters.problem)

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
            self.wake.wait(self.cfg.poll_interval if self._started else 1.0)
        self.shutdown()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
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
        for svc in self.cfg.services:
            try:
                self.cycle_service(svc, queue if online else None, queue_invalid)
            except StoreUnavailable as exc:
                self.log.warning("store.unavailable", svc=svc, error=str(exc))
                self._set(svc, store="unavailable")
            except SupervisorShuttingDown:
                # A normal `supervisorctl shutdown`: supervisord stops its programs, then us.
                # Nothing to fix and nothing to start: stop the loop (the session closes and
                # the host's presence goes with it).
                self.log.info("supervisord.shutting_down", svc=svc)
                for name in self.cfg.services:
                    self._set(name, phase="stopping", reason="supervisord is shutting down")
                self.stopping.set()
                break
            except (StoreError, SupervisorError, OSError, health.HealthError) as exc:
                self.log.error("cycle.error", svc=svc, error=str(exc), kind=type(exc).__name__)
                self._set(svc, error=str(exc))
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
            try:
                self.dist.maintain({s: v.staged for s, v in self._views.items()},
                                   {s: v.released for s, v in self._views.items()},
                                   deploying=bool(queue))
            except Exception as exc:  # noqa: BLE001 - seeding upkeep must not stop the cycle
                self.log.warning("swarm.maintain_failed", error=str(exc))
        self.write_status()

    def _check_access(self) -> None:
        """Every ``store_check_secs`` (each cycle while refused), one read the store checks
        against our rights: a revoked host notices, and a readmitted one rebuilds what it
        follows (events may have been missed meanwhile)."""
        now = time.monotonic()
        if not self._was_denied and now < self._next_access_check:
            return
        self.coord.check_access()
        self._next_access_check = now + self._access_check_secs
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
            self.coord = RereadCoordinator(self.store, self.host, sorted(self.cfg.services),
                                           self._wake)
            self.coord.follow()

    def _prune_cache(self) -> None:
        """Drop cached artifacts no longer needed: keep only those being fetched and those
        staged but not installed yet (an installed release needs no archive)."""
        from ..fetch import installed_sha256, prune_cache
        if set(self._views) != set(self.cfg.services):
            return  # not every staged release known yet
        keep = {sha for sha, _ in self._fetches.values()}
        for svc, view in self._views.items():
            staged = view.staged
            if staged is not None and \
                    installed_sha256(self.dirs[svc].path(staged.version)) != staged.sha256:
                keep.add(staged.sha256)
        try:
            prune_cache(self.cfg.root / ".cache", keep)
        except OSError as exc:
            self.log.warning("cache.prune_failed", error=str(exc))

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
        fetch = {svc: {k: v for k, v in (self.status[svc].get("fetch") or {}).items()
                       if k in ("version", "state", "error", "kind")}
                 for svc in self.cfg.services}
        fetch = {svc: entry if entry.get("error") or entry.get("state") in ("failed", "error")
                 else {} for svc, entry in fetch.items()}  # a retry keeps its last error
        for svc, entry in fetch.items():  # no digest or size learnt from the fetched bytes
            failed = self._fetch_failed.get(svc)
            if failed and entry.get("error") == failed.reason:
                entry["error"] = failed.public
        refused = tuple(sorted({r for rs in self._refused.values() for r in rs}))
        if (fetch, refused) == self._published:
            return
        info = HostInfo(self.host, self.cfg.rack, tuple(sorted(self.cfg.services)),
                        time.time(), fetch, refused).to_json()
        try:
            self.store.set(layout.host(self.host), info)
        except NoNode:
            self.store.create(layout.host(self.host), info)
        self._published = (fetch, refused)

    def cycle_service(self, svc: str, queue: list[DeployItem] | None,
                      queue_invalid: list[str]) -> None:
        st = self.local.get(svc)
        rd = self.dirs[svc]
        view = None
        if queue is not None:
            # No herd (docs/design.md §4.6): only hosts that may pass the gate now watch current
            # and the gate; the others watch the queue entries just ahead of them.
            view = self._trusted(svc, self.coord.view(svc, queue, queue_invalid))
            if view.spec is not None and view.spec.to_json().decode() != st.spec:
                self._record(svc, spec=view.spec.to_json().decode())
                st = self.local.get(svc)
            self._views[svc] = view
            self._set(svc, store="connected", invalid=list(view.invalid) or None)
            if view.staged is not None:
                self._staged_version[svc] = view.staged.version
        else:
            self._set(svc, store="not authorized" if self._denied else
                      self.session.value if self._started else "unreachable")
        spec = self._spec(svc, view)
        program = spec.program if spec else svc
        state = self.sup.state(program)
        self._set(svc, program=program, process=state, version=st.active)

        if state in TRANSIENT_STATES:
            return
        if state not in RUNNING_STATES:
            if view is not None and self.host in view.current:
                self._unregister(svc)  # not serving: stop counting as online at once
            self.recover(svc, program, spec, view)
            return
        if st.active is None or st.active != rd.active():
            # Adopt what runs (first start of the agent on a host set up by hand).
            self._record(svc, active=rd.active(), verified=True)
            st = self.local.get(svc)
        if view is None:
            self._set(svc, phase="serving", reason="store unreachable: serving the last "
                                                   "known version, starting nothing")
            return
        if view.spec is None:
            refused = [r for r in self._refused[svc] if r.startswith(f"{layout.service(svc)}:")]
            self._set(svc, phase="serving", reason=refused[0] if refused else
                      f"service {svc} is not defined in the store")
            return
        # A check this host cannot run (it names a local check or port variable that its
        # agent.conf lacks) is reported every cycle; the gate below refuses to switch on it.
        self._set(svc, health_problem=health.problem(view.spec.health, self.cfg.health(svc)))
        self.retry_pending_failure(svc)
        self.ensure_presence(svc, view, st.active, spec)
        self.prefetch(svc, view)
        self.enqueue(svc, view, st.active)
        decision = decisions.may_take_down(view, self.host, st.active)
        self._set(svc, phase="serving", reason=decision.reason)
        self._arm_queue_watches(svc, view, st.active)
        if decision:
            self.pass_gate_and_switch(svc, program, view.spec)
        else:
            self.maybe_complete(svc, view)

    def _trusted(self, svc: str, view: decisions.ServiceView) -> decisions.ServiceView:
        """The view with only the operator data this host trusts (trust.check_all):
        refused specs and staged releases are left out, a refused deploy item blocks the
        queue at its place. Refusals go to status.json and the host registry."""
        spec, staged, queue, refused, counters = trust.check_all(
            view.spec, view.staged, view.queue, self.cfg.trust_policy, time.time(),
            self.counters.seen)
        try:
            self.counters.record(counters)
        except OSError as exc:  # kept in memory; a full disk must not stop the cycle
            self.log.error("trust.counters_write_failed", error=str(exc))
            self._set(svc, error=f"cannot write {self.counters.path}: {exc.strerror or exc}")
        for reason in refused:
            if reason not in self._refused[svc]:
                self.log.error("trust.refused", svc=svc, refused=reason)
        self._refused[svc] = refused
        self._set(svc, refused=refused or None)
        return replace(view, spec=spec, staged=staged, queue=queue)

    # -- presence ---------------------------------------------------------------------
    def ensure_presence(self, svc: str, view: decisions.ServiceView, version: str | None,
                        spec: ServiceSpec | None) -> None:
        entry = view.current.get(self.host)
        if version is None or (entry is not None and entry.version == version):
            return
        if entry is None and spec is not None:
            problem = health.probe(spec.health, self.cfg.health(svc))
            if problem:
                self._set(svc, reason=f"running but unhealthy, not registered: {problem}")
                return
        self._register(svc, version)

    def _register(self, svc: str, version: str) -> None:
        self.coord.register(svc, version, self.cfg.rack)
        self.log.info("presence.registered", svc=svc, version=version)

    def _unregister(self, svc: str) -> None:
        self.coord.unregister(svc)
        self.log.info("presence.removed", svc=svc)

    # -- prefetch and the ready queue -------------------------------------------------
    def prefetch(self, svc: str, view: decisions.ServiceView) -> None:
        staged = view.staged
        if staged is None:
            return
        from ..fetch import installed_sha256
        rd = self.dirs[svc]
        have = installed_sha256(rd.path(staged.version))
        if have == staged.sha256:
            via = self._fetch_progress.get(svc, {}).get("via")  # how this agent fetched it
            self._set(svc, fetch={"version": staged.version, "state": "installed",
                                  **({"via": via} if via else {})})
            return
        if have is not None:
            self._set(svc, fetch={"version": staged.version, "state": "error", "kind": "verify",
                                  "error": f"version {staged.version} is installed here with "
                                           f"sha256 {have[:12]}..., the staged one is "
                                           f"{staged.sha256[:12]}...: stage a new version "
                                           "number"})
            return
        running = self._fetches.get(svc)
        failed = self._fetch_failed.get(svc)
        # A retry keeps the last failure in view (dcdeploy status: "N hosts failed to verify").
        last_error = {"error": failed.reason, "kind": failed.kind} \
            if failed and failed.sha256 == staged.sha256 else {}
        if running and running[0] == staged.sha256 and not running[1].done():
            self._set(svc, fetch={"version": staged.version, "state": "downloading",
                                  **self._fetch_progress.get(svc, {}), **last_error})
            return
        if running and running[0] == staged.sha256 and running[1].done():
            del self._fetches[svc]
            exc = running[1].exception()
            if exc is not None:
                from ..fetch import FetchError, UnsafeArchive, VerificationError
                public = exc.public_reason if isinstance(exc, FetchError) else str(exc)
                bad_bytes = isinstance(exc, (VerificationError, UnsafeArchive))
                self._fetch_failed[svc] = FetchFailure(
                    staged.sha256, time.monotonic(), str(exc), public,
                    permanent=isinstance(exc, UnsafeArchive),
                    kind="verify" if bad_bytes else "fetch")
                self.log.error("fetch.failed", svc=svc, version=staged.version, error=str(exc),
                               kind=type(exc).__name__)
            else:
                self.log.info("fetch.installed", svc=svc, version=staged.version)
                self.wake.set()
                return
        failed = self._fetch_failed.get(svc)
        if failed and failed.sha256 == staged.sha256 and \
                (failed.permanent or time.monotonic() - failed.when < FETCH_RETRY_SECS):
            self._set(svc, fetch={"version": staged.version, "state": "failed",
                                  "error": failed.reason, "kind": failed.kind})
            return
        hosts = max(len(view.current), sum(svc in h.services for h in view.hosts.values()))
        transport = fetch_transport(staged, hosts, self.dist.link_bps if self.dist else 0,
                                    self.dist is not None)
        self.log.info("fetch.start", svc=svc, version=staged.version, urls=list(staged.urls),
                      via=transport)
        self._fetch_progress[svc] = {"via": transport}
        preload = bool(view.spec and view.spec.preload)
        future = self._executor.submit(self._do_fetch, svc, staged, preload, transport)
        self._fetches[svc] = (staged.sha256, future)
        self._set(svc, fetch={"version": staged.version, "state": "downloading", **last_error})

    def _do_fetch(self, svc: str, staged, preload: bool, transport: str) -> None:
        """Fetch thread: download (swarm or URL, see ``fetch_transport``), verify, install,
        then warm the page cache when the spec asks for it. The host joins the ready queue
        only after all of it. A swarm download that fails for any reason but a full disk or
        a wrong checksum is retried from the URLs, when there are some."""
        from ..fetch import DiskFull, DownloadError, VerificationError, install_release
        rd = self.dirs[svc]
        via = {"via": transport}

        def progress(done: int, total: int | None) -> None:
            self._fetch_progress[svc] = {**via, "done": done, "total": total}

        try:
            if self._fetch is not None:
                self._fetch(svc, staged, rd, progress)
                transport = "injected"
            if transport == "swarm" and self.dist is not None:
                try:
                    self.dist.fetch(staged, rd.path(staged.version), progress)
                except (DiskFull, VerificationError):
                    raise
                except DownloadError as exc:
                    if not staged.urls:
                        raise
                    self.log.warning("fetch.swarm_failed", svc=svc, version=staged.version,
                                     error=str(exc), action="download from the URLs")
                    transport = via["via"] = "http"
                    self._fetch_progress[svc] = dict(via)
            if transport == "http" and staged.urls:
                from ..fetch import Limits
                # allow_unknown_size: until model.py requires the staged size (issue 8); the
                # download is then bounded by fetch.MAX_UNKNOWN_SIZE_BYTES only.
                install_release(list(staged.urls), staged.sha256, rd.releases, staged.version,
                                rd.cache, size=staged.size, allow_unknown_size=True,
                                file_root=self.cfg.extra.get("file_root") or None,
                                limits=Limits.from_config(self.cfg.extra), progress=progress)
            elif transport == "http":
                raise DownloadError("the staged release has only a torrent and this host has "
                                    "no transmission_rpc in its agent.conf")
            if preload:
                from ..p2p.warm import warm
                result = warm(rd.path(staged.version),
                              mlock_cap=self.dist.mlock_cap if self.dist else 0)
                self._set(svc, preload={"bytes": result.bytes_total,
                                        "resident": result.bytes_resident,
                                        "locked": result.bytes_locked,
                                        "mlock_error": result.mlock_error})
                self.log.info("preload.done", svc=svc, version=staged.version,
                              resident=result.bytes_resident, total=result.bytes_total,
                              mlock_error=result.mlock_error)
        finally:
            self.wake.set()

    def enqueue(self, svc: str, view: decisions.ServiceView, active: str | None) -> None:
        """Join the ready-to-roll queue for the staged version once it is installed and
        verified here; leave entries for any other version."""
        from ..fetch import installed_sha256
        staged = view.staged
        want = None
        fetching = svc in self._fetches and not self._fetches[svc][1].done()
        if staged is not None and staged.version != active and not fetching and \
                installed_sha256(self.dirs[svc].path(staged.version)) == staged.sha256:
            want = staged.version  # installed, verified and (with preload) warm
        mine = [e for e in view.staging if e.host == self.host]
        for entry in mine:
            if entry.version != want:
                self.coord.drop_entry(svc, entry.node)
        if want is not None and not any(e.version == want for e in mine):
            node = self.coord.enter_queue(svc, want)
            self.log.info("staging.enqueued", svc=svc, version=want, node=node)

    def _arm_queue_watches(self, svc: str, view: decisions.ServiceView,
                           active: str | None) -> None:
        """A host at position p >= k of the ready queue can only become eligible after one
        of the k entries just ahead of it leaves (pigeonhole): watch those, nothing else."""
        target, _ = decisions.rollout_target(view)
        queue = decisions.ready_queue(view, target) if target else []
        hosts = [e.host for e in queue]
        k = view.spec.max_parallel if view.spec else 1
        if target is None or active == target or self.host not in hosts:
            self.coord.set_front(svc, target is not None and active != target)
            return
        position = hosts.index(self.host)
        self.coord.set_front(svc, position < k)
        if position >= k:
            self.coord.wait_ahead(svc, [e.node for e in queue[position - k: position]])

    def _leave_queue(self, svc: str) -> None:
        self.coord.leave_queue(svc)

    # -- the gate and the switch ------------------------------------------------------
    def pass_gate_and_switch(self, svc: str, program: str, spec: ServiceSpec) -> None:
        if self.session is not SessionState.CONNECTED:
            return
        fresh = self._trusted(svc, self.coord.fresh_view(svc))  # as fresh as sync() makes it
        active = self.local.get(svc).active
        decision = decisions.may_take_down(fresh, self.host, active)
        if not decision:
            self._set(svc, reason=decision.reason)  # the synced read overrules the cycle's
            return
        target, _ = decisions.rollout_target(fresh)
        assert target is not None and fresh.staged is not None and fresh.spec is not None
        from ..fetch import installed_sha256
        if installed_sha256(self.dirs[svc].path(target)) != fresh.staged.sha256:
            return  # S3: never start bytes that do not match the staged sha256
        head = fresh.head
        unusable = health.problem(fresh.spec.health, self.cfg.health(svc))
        if unusable is not None:
            # Stopping what runs for a release this host could never verify would only
            # end in a rollback: keep serving, and fail the item with the reason instead.
            reason = f"host {self.host}: cannot check {target}: {unusable}"
            self._set(svc, phase="serving", reason=reason, last_failure=reason)
            if head is not None and svc not in self._pending_fail:
                self._pending_fail[svc] = (head.node, reason)
                self.retry_pending_failure(svc)
            return
        gate = {"host": self.host, "online": decisions.online_count(fresh),
                "was_online": self.host in fresh.current,
                "quorum": fresh.spec.quorum, "version": target,
                "item": head.node if head else None, "t": time.time()}
        try:
            self.coord.try_gate(svc, fresh, gate, head)
        except TransactionFailed as exc:
            self.log.info("gate.contended", svc=svc, op=exc.index, error=str(exc.cause))
            self.wake.set()
            return
        self.log.info("gate.passed", svc=svc, version=target, online=gate["online"],
                      quorum=gate["quorum"], item=gate["item"])
        self.switch(svc, program, fresh.spec, target, head.node if head else None)

    def switch(self, svc: str, program: str, spec: ServiceSpec, target: str,
               item: str | None) -> bool:
        """Stop, repoint ``current``, start, health-check; roll back on failure."""
        rd = self.dirs[svc]
        previous = self.local.get(svc).active
        self._set(svc, phase="switching", reason=f"{previous} -> {target}")
        self.log.info("switch.start", svc=svc, version=target, previous=previous)
        started = time.monotonic()
        back: Path | None = None
        prepared: Path | None = None
        try:
            prepared = rd.prepare_current(target)
            # The way back is made now too, so that a rollback on a disk that filled up
            # meanwhile needs no new directory entry: it is a rename.
            if previous is not None and previous != target and rd.path(previous).is_dir():
                back = rd.prepare_current(previous)
        except OSError as exc:
            # Nothing is stopped yet: give the slot back by registering again.
            if prepared is not None:
                prepared.unlink(missing_ok=True)
            self.log.error("switch.not_started", svc=svc, version=target, error=str(exc))
            self._set(svc, phase="serving", error=f"cannot prepare the switch: {exc}")
            if previous is not None:
                self._after_switch(svc, previous)
            return False
        self.sup.stop(program)
        rd.commit_current(prepared)
        self._record(svc, active=target, previous=previous, verified=False)
        problem = self._start_and_check(svc, program, spec, hold=True)
        if problem is None:
            self._record(svc, verified=True)
            if back is not None:
                back.unlink(missing_ok=True)
            self.log.info("switch.done", svc=svc, version=target)
            self.metrics.on_switch(svc, time.monotonic() - started, "ok")
            self._after_switch(svc, target)
            self._prune(svc)
            return True
        self.log.error("switch.failed", svc=svc, version=target, reason=problem)
        self.sup.stop(program)
        if previous is not None:
            self.metrics.on_rollback(svc)
            try:
                if back is not None:
                    rd.commit_current(back)
                else:
                    rd.point_current(previous)
            except OSError as exc:
                self.log.error("switch.repoint_failed", svc=svc, error=str(exc))
            self._record(svc, active=previous, previous=None, verified=False)
            back = self._start_and_check(svc, program, spec, hold=False)
            if back is None:
                self._record(svc, verified=True)
                self.log.info("switch.rolled_back", svc=svc, version=previous)
            else:
                self.log.error("switch.rollback_failed", svc=svc, version=previous, reason=back)
        self.metrics.on_switch(svc, time.monotonic() - started,
                               "rolled_back" if previous is not None else "failed")
        reason = f"host {self.host}: {target} failed its health check: {problem}"
        self._set(svc, phase="failed", reason=reason, last_failure=reason)
        if item is not None:
            self._pending_fail[svc] = (item, reason)
        self._after_failure(svc, previous)
        return False

    def _after_switch(self, svc: str, version: str) -> None:
        self._switched.add(svc)
        try:
            self.coord.rejoin(svc, version, self.cfg.rack)  # register + leave the queue
            self.log.info("presence.registered", svc=svc, version=version)
        except StoreError as exc:
            # The next cycle registers again (presence is checked every cycle).
            self.log.warning("presence.deferred", svc=svc, error=str(exc))
        self.wake.set()

    def _after_failure(self, svc: str, previous: str | None) -> None:
        try:
            self.retry_pending_failure(svc)
            if previous is not None and self.local.get(svc).verified:
                self._register(svc, previous)
            self._leave_queue(svc)
        except StoreError as exc:
            self.log.warning("failure.report_deferred", svc=svc, error=str(exc))

    def retry_pending_failure(self, svc: str) -> None:
        """Mark the deploy item failed (CAS), retried every cycle until the store takes it."""
        pending = self._pending_fail.get(svc)
        if pending is None:
            return
        node, reason = pending
        if self.coord.mark_failed(node, reason):
            self.log.error("deploy.failed", svc=svc, item=node, reason=reason)
        self._pending_fail.pop(svc, None)

    def _start_and_check(self, svc: str, program: str, spec: ServiceSpec | None,
                         hold: bool) -> str | None:
        try:
            self.sup.start(program)
        except SupervisorError as exc:
            return str(exc)
        if spec is None:
            return None

        def alive() -> str | None:
            state = self.sup.state(program)
            return None if state in ("RUNNING", "STARTING") else f"process is {state}"

        problem = health.wait_healthy(spec.health, self.cfg.health(svc),
                                      start_timeout=self.cfg.start_timeout,
                                      healthy_secs=spec.healthy_secs if hold else 0.0,
                                      alive=alive)
        if problem is not None:
            self.metrics.on_health_failure(svc)
        return problem

    def _prune(self, svc: str) -> None:
        st = self.local.get(svc)
        protect = {v for v in (st.active, st.previous, self._staged_version.get(svc)) if v}
        removed = self.dirs[svc].prune(self.cfg.keep_releases, protect)
        if removed:
            self.log.info("releases.pruned", svc=svc, versions=removed)

    # -- recovery ---------------------------------------------------------------------
    def recover(self, svc: str, program: str, spec: ServiceSpec | None,
                view: decisions.ServiceView | None) -> None:
        """Start the right version of a service that is not running (docs/design.md §4.7)."""
        if time.monotonic() < self._recover_after.get(svc, 0.0):
            return
        st = self.local.get(svc)
        rd = self.dirs[svc]
        installed = rd.installed()
        local_active = st.active
        if not st.verified and st.previous in installed:
            local_active = st.previous  # the switch to `active` never passed its check
        target = None
        if view is not None and view.head is not None and view.head.service == svc:
            target = view.head.version
        if view is not None:
            view = self.coord.resolve(svc, view)  # the versions online decide
        current = list(view.current.values()) if view is not None else []
        version, why = decisions.recovery_version(current, installed, local_active, target)
        if version is None:
            if view is not None and view.staged is not None:
                self._set(svc, phase="installing", reason="no release installed yet: "
                          f"fetching staged {view.staged.version}")
                self.prefetch(svc, view)
            else:
                self._set(svc, phase="down", reason=why)
            return
        self.log.info("recover.start", svc=svc, version=version, why=why)
        self._set(svc, phase="recovering", reason=why)
        if rd.active() != version:
            try:
                rd.point_current(version)
            except OSError as exc:
                self.log.error("recover.repoint_failed", svc=svc, version=version,
                               error=str(exc))
                self._set(svc, phase="down", reason=f"cannot point current at {version}: "
                                                    f"{exc}")
                self._recover_after[svc] = time.monotonic() + RECOVER_RETRY_SECS
                return
        self._record(svc, active=version, verified=False,
                     previous=st.previous if version == st.previous else st.active)
        problem = self._start_and_check(svc, program, spec, hold=False)
        if problem is not None:
            self.log.error("recover.failed", svc=svc, version=version, reason=problem)
            self._set(svc, phase="down", reason=f"recovery with {version} failed: {problem}")
            self._recover_after[svc] = time.monotonic() + RECOVER_RETRY_SECS
            return
        self._record(svc, verified=True)
        self.log.info("recover.done", svc=svc, version=version)
        if view is not None and self.session is SessionState.CONNECTED:
            self._register(svc, version)
        self.wake.set()

    # -- completion -------------------------------------------------------------------
    def maybe_complete(self, svc: str, view: decisions.ServiceView) -> None:
        done = decisions.item_complete(view)
        if not done and self._may_resolve(svc, view):
            view = self.coord.resolve(svc, view)
            done = decisions.item_complete(view)
        if not done:
            return
        head = view.head
        assert head is not None
        if not self.coord.complete(svc, head, done.reason):
            self.log.info("deploy.complete_contended", svc=svc, item=head.node)
            return
        self.log.info("deploy.done", svc=svc, item=head.node, version=head.version)
        self.wake.set()

    def _may_resolve(self, svc: str, view: decisions.ServiceView) -> bool:
        """Whether to read the presences not read yet to see if the item is complete:
        when this host just switched (the last to switch sees the ready queue empty), or
        when the item has stayed open with an empty queue for COMPLETE_FALLBACK_SECS."""
        head = view.head
        just_switched = svc in self._switched
        self._switched.discard(svc)
        if head is None or head.service != svc or decisions.ready_queue(view, head.version) \
                or not any(e.version == "" for e in view.current.values()):
            self._queue_empty_since.pop(svc, None)
            return False
        now = time.monotonic()
        since = self._queue_empty_since.setdefault(svc, now)
        if just_switched or now - since >= COMPLETE_FALLBACK_SECS:
            self._queue_empty_since[svc] = now
            return True
        return False

    # -- status -----------------------------------------------------------------------
    def _record(self, svc: str, **changes: Any) -> None:
        """Save local state; a failure (full disk) is reported, never fatal to a switch:
        the ``current`` symlink is what supervisord starts."""
        try:
            self.local.update(svc, **changes)
        except OSError as exc:
            self.log.error("state.write_failed", svc=svc, error=str(exc))
            self._set(svc, error=f"cannot write {self.local.path}: {exc.strerror or exc}")

    def _spec(self, svc: str, view: decisions.ServiceView | None) -> ServiceSpec | None:
        if view is not None and view.spec is not None:
            return view.spec
        cached = self.local.get(svc).spec
        if cached:
            try:
                return ServiceSpec.parse(svc, cached)
            except InvalidData:
                return None
        return None

    def _set(self, svc: str, **fields: Any) -> None:
        self.status[svc].update(fields)

    def write_status(self) -> None:
        """``<root>/status.json``: what ``supervisorctl dcdeploy status`` shows."""
        for svc in self.cfg.services:
            self.status[svc]["version"] = self.local.get(svc).active
        ops = self.store.ops
        status = {"host": self.host, "rack": self.cfg.rack,
                  "store": self.session.value if self._started else "unreachable",
                  "store_ops": {"reads": ops.reads, "writes": ops.writes},
                  "cycles": self.cycles,
                  "trust": {"keys": sorted(self.cfg.trust_policy.keys),
                            "insecure_unsigned": self.cfg.trust_policy.insecure_unsigned},
                  "cycles": self.cycles, "cycle_errors": self.cycle_errors,
                  "services": self.status}
        if self.dist is not None:
            status["swarm"] = self.dist.status()
        data = dumps(status)
        if data != self._status_written:
            try:
                # Rewritten every cycle (its cycle counter): no fsync, it is a report.
                atomic_write(self.cfg.root / STATUS_FILE, data, durable=False)
                self._status_written = data
            except OSError as exc:
                self.log.error("status.write_failed", error=str(exc))
